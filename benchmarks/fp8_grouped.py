"""Routed-expert grouped GEMM, forward + backward: BF16 torch._grouped_mm vs our FP8 paths, side by side (CUDA).

For each shape (E experts of [N, K] weights, M token copies routed at random, balanced on average) it times one
grouped linear ``y = x @ w[e]^T`` forward + backward (3 GEMMs, 6*M*K*N FLOPs):

* ``bf16_grouped``: ``dsv3.model.moe.grouped_linear`` (``torch._grouped_mm``), BF16, the BF16 recipe's path;
* ``fp8_triton``: ``fp8_grouped_mm(aligned=True)``: one-launch Triton kernels on 128-aligned groups,
  activation quantization included, weights quantized once (inside ``reuse_quantized_weights``, as the trainer
  runs it with gradient accumulation);
* ``fp8_triton_requant``: the same with the weight quantized in every call (one micro-batch per step);
* ``fp8_loop``: the per-group blockwise ``torch._scaled_mm`` loop (the path before the Triton kernels);
* ``fp8_kernels_only``: the three Triton GEMMs alone on pre-quantized operands (the ceiling of this path);
* ``kernels_<variant>`` and ``fp8_triton_<variant>``: the same two for each kernel variant of
  ``dsv3.fp8.triton_grouped`` (``--variants``): ``pointer_mfast`` (the first kernels: pointer loads, row tiles
  launched fastest), ``pointer`` (pointer loads, column tiles fastest), ``tma`` (TMA tensor-descriptor loads,
  column tiles fastest), ``tma_mfast``, ``tma_sT`` (TMA with the activation scales stored column-major) and
  ``tma_defer`` (TMA, each slice's product promoted after the next slice's dot is issued: DEFER_PROMOTION).

It first checks the Triton path against the fp32 reference on the first shape (exits 1 on a mismatch).

    PYTHONPATH=src python3 benchmarks/fp8_grouped.py --out grouped.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from dsv3.fp8 import triton_grouped
from dsv3.fp8.grouped import fp8_grouped_mm, triton_path_available
from dsv3.fp8.triton_grouped import GROUP_ALIGN, grouped_fp8_nt, grouped_fp8_wgrad
from dsv3.fp8.triton_quant import quantize_tiles
from dsv3.fp8.weight_cache import reuse_quantized_weights, weight_blocks, weight_blocks_transposed
from dsv3.model.moe import grouped_linear

sys.path.insert(0, os.path.dirname(__file__))
from fp8_linear import bench as bench_ms  # noqa: E402  (median ms, CUDA events)


def bench(fn, iters: int) -> float:
    """Median seconds of fn() (fp8_linear.bench, which times in ms)."""
    return bench_ms(fn, iters, warmup=3) / 1e3

# (name, E, N, K, M token copies): small preset's gate/up and down projections (16384 tokens x top-6 over
# 64 experts), and DeepSeek-V3's at EP=8 (32 local experts, 8192 tokens x top-8 / 8 ranks x 8 ... = 65536 copies)
SHAPES = [("small gate/up", 64, 512, 1536, 98304), ("small down", 64, 1536, 512, 98304),
          ("v3 gate/up ep8", 32, 2048, 7168, 65536), ("v3 down ep8", 32, 7168, 2048, 65536)]


def layouts(E: int, M: int, gen: torch.Generator):
    """Random per-expert counts summing to M; packed ends and 128-aligned ends (and the aligned row count)."""
    counts = torch.bincount(torch.randint(0, E, (M,), generator=gen), minlength=E)
    ends = counts.cumsum(0).to(torch.int32)
    padded = (counts + GROUP_ALIGN - 1) // GROUP_ALIGN * GROUP_ALIGN
    aends = padded.cumsum(0).to(torch.int32)
    rows = -(-(M + E * (GROUP_ALIGN - 1)) // GROUP_ALIGN) * GROUP_ALIGN
    return counts, ends, aends, rows


# (KERNELS, N_FASTEST, DEFER_PROMOTION) of dsv3.fp8.triton_grouped
VARIANTS = {"pointer_mfast": ("pointer", False, False), "pointer": ("pointer", True, False),
            "tma": ("tma", True, False), "tma_mfast": ("tma", False, False), "tma_sT": ("tma", True, False),
            "tma_defer": ("tma", True, True)}


def current_variant() -> tuple:
    """The (KERNELS, N_FASTEST, DEFER_PROMOTION) settings dsv3.fp8.triton_grouped runs now."""
    return triton_grouped.KERNELS, triton_grouped.N_FASTEST, triton_grouped.DEFER_PROMOTION


def restore_variant(settings: tuple) -> None:
    """Put back settings from ``current_variant``."""
    triton_grouped.KERNELS, triton_grouped.N_FASTEST, triton_grouped.DEFER_PROMOTION = settings


def set_variant(name: str) -> None:
    """Point dsv3.fp8.triton_grouped at one kernel variant (module settings; numbers are the same)."""
    restore_variant(VARIANTS[name])


def run_shape(name, E, N, K, M, iters, variants=()) -> dict:
    gen = torch.Generator().manual_seed(0)
    counts, ends, aends, rows = layouts(E, M, gen)
    dev = "cuda"
    counts, ends, aends = counts.to(dev), ends.to(dev), aends.to(dev)
    w = torch.nn.Parameter(torch.randn(E, N, K, device=dev) * K ** -0.5)
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
    xa = torch.zeros(rows, K, device=dev, dtype=torch.bfloat16)
    gya = torch.zeros(rows, N, device=dev, dtype=torch.bfloat16)
    pos = torch.cat([torch.arange(s, s + c, device=dev)  # the aligned row of each packed row
                     for s, c in zip((aends - (counts + 127) // 128 * 128).tolist(), counts.tolist())])
    xa[pos] = x.detach()
    gya[pos] = gy
    xa.requires_grad_(True)
    wb = w.detach().to(torch.bfloat16).requires_grad_(True)

    def bf16():
        y = grouped_linear(x, wb, ends, counts)
        torch.autograd.grad(y, (x, wb), gy)

    def fp8_triton():
        y = fp8_grouped_mm(xa, w, aends, aligned=True)
        torch.autograd.grad(y, (xa, w), gya)

    def fp8_cached():
        with reuse_quantized_weights():
            fp8_triton()

    def fp8_loop():
        y = fp8_grouped_mm(x, w, ends, backend="scaled_mm")
        torch.autograd.grad(y, (x, w), gy)

    xq, xs = quantize_tiles(xa.detach())
    xtq, xts = quantize_tiles(xa.detach().t())
    dq, ds = quantize_tiles(gya)
    dtq, dts = quantize_tiles(gya.t())
    wq, ws = weight_blocks(w)
    wtq, wts = weight_blocks_transposed(w, wq, ws)

    def kernels():
        grouped_fp8_nt(xq, xs, wq, ws, aends)
        grouped_fp8_nt(dq, ds, wtq, wts, aends)
        grouped_fp8_wgrad(dtq, dts, xtq, xts, aends)

    def column_major(sc):
        return sc.t().contiguous().t()

    xs_t, ds_t = column_major(xs), column_major(ds)

    def kernels_scales_t():
        grouped_fp8_nt(xq, xs_t, wq, ws, aends)
        grouped_fp8_nt(dq, ds_t, wtq, wts, aends)
        grouped_fp8_wgrad(dtq, dts, xtq, xts, aends)

    flops = 6.0 * M * N * K
    res = {"shape": name, "E": E, "N": N, "K": K, "M": M, "aligned_rows_used": int(aends[-1])}
    default = current_variant()
    for v in variants:  # each kernel variant: the GEMMs alone, and the whole cached path
        set_variant(v)
        try:
            res[f"kernels_{v}_s"] = bench(kernels_scales_t if v == "tma_sT" else kernels, iters)
            if v != "tma_sT":
                with reuse_quantized_weights():
                    fp8_triton()
                    res[f"fp8_triton_{v}_s"] = bench(fp8_triton, iters)
        except Exception as e:  # report, keep going
            res[f"{v}_error"] = repr(e)[:300]
    restore_variant(default)
    # the cached variant: quantize once in a scope that spans the timed calls (as across micro-batches)
    with reuse_quantized_weights():
        fp8_triton()
        t_cached = bench(fp8_triton, iters)
    for label, fn in (("bf16_grouped", bf16), ("fp8_triton_requant", fp8_triton), ("fp8_kernels_only", kernels),
                      ("fp8_loop", fp8_loop)):
        try:
            res[label + "_s"] = bench(fn, iters if label != "fp8_loop" else max(3, iters // 4))
        except Exception as e:  # report, keep going
            res[label + "_error"] = repr(e)[:300]
    res["fp8_triton_s"] = t_cached
    for k in [k for k in res if k.endswith("_s")]:
        res[k[:-2] + "_tflops"] = flops / res[k] / 1e12
    base = res.get("bf16_grouped_s")
    if base:
        for k in ("fp8_triton", "fp8_triton_requant", "fp8_kernels_only", "fp8_loop",
                  *[f"kernels_{v}" for v in variants], *[f"fp8_triton_{v}" for v in variants]):
            if k + "_s" in res:
                res[k + "_speedup_over_bf16"] = base / res[k + "_s"]
    return res


def check(name, E, N, K, M) -> dict:
    """Triton path vs the fp32 reference (dequantize + matmul per group) on a reduced version of the shape."""
    torch.manual_seed(1)
    M = min(M, 8192)
    counts, ends, aends, rows = layouts(E, M, torch.Generator().manual_seed(1))
    xa = torch.zeros(rows, K, device="cuda", dtype=torch.bfloat16)
    for e, c in enumerate(counts.tolist()):
        s = int(aends[e]) - (c + 127) // 128 * 128
        xa[s:s + c] = torch.randn(c, K, device="cuda", dtype=torch.bfloat16)
    xa.requires_grad_(True)
    w = torch.randn(E, N, K, device="cuda", requires_grad=True)
    gy = torch.randn(rows, N, device="cuda", dtype=torch.bfloat16) * (xa.detach().abs().sum(1, keepdim=True) > 0)
    out = {}
    for backend in ("reference", "triton"):
        y = fp8_grouped_mm(xa, w, aends.cuda(), backend=backend, aligned=backend == "triton")
        out[backend] = (y, *torch.autograd.grad(y, (xa, w), gy))
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    return {n: rel(a, b) for n, a, b in zip(("y", "dx", "dW"), out["triton"], out["reference"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--shapes", default="all", help="comma-separated indices into SHAPES, or 'all'")
    p.add_argument("--variants", default="", help=f"kernel variants to time side by side ({','.join(VARIANTS)})")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {','.join(VARIANTS)}")
    if not torch.cuda.is_available() or not triton_path_available(torch.zeros(1, device="cuda")):
        print("needs CUDA and Triton", file=sys.stderr)
        return 2
    shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    numerics = {}
    default = current_variant()
    for v in ["default"] + [v for v in variants if v != "tma_sT"]:
        if v != "default":
            set_variant(v)
        errs = numerics[v] = check(*shapes[0])
        print(f"numerics (triton {v} vs fp32 reference):", {k: f"{e:.2e}" for k, e in errs.items()}, flush=True)
        if max(errs.values()) > 4e-3:
            print("MISMATCH", file=sys.stderr)
            return 1
    restore_variant(default)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "numerics": numerics, "rows": []}
    for shp in shapes:
        r = run_shape(*shp, iters=args.iters, variants=variants)
        out["rows"].append(r)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
