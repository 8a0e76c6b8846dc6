"""FP8 linear (DeepSeek-V3 recipe) vs blockwise torch._scaled_mm alone vs BF16 F.linear, on CUDA.

For each M (tokens) and (K, N) of DeepSeek-V3's big linears it times, forward
+ backward (3 GEMMs, 6*M*K*N FLOPs):

* ``fp8_linear``: dsv3.fp8.linear.fp8_linear, every quantization included (the weight's too, every call);
* ``fp8_linear_wcached``: the same inside ``reuse_quantized_weights()``, as the trainer runs it: the weight's
  128x128 blocks are made once per optimizer step and reused by every micro-batch (timed here after the
  first call made them), the activations and gradients quantized every call;
* ``scaled_mm_x3``: the three blockwise torch._scaled_mm calls alone on
  pre-quantized operands (fprop 1x128 x 128x128, dgrad 1x128 x 128x128,
  wgrad 1x128 x 1x128), i.e. the ceiling for this recipe with cuBLAS;
* ``bf16_linear``: F.linear forward + backward in BF16.

``linear_fraction_of_scaled_mm`` = time(scaled_mm_x3) / time(fp8_linear): the
share of the FP8 layer's time spent in the GEMMs (1.0 = quantization is free);
``linear_fraction_wcached`` the same with the weight quantized once per step.

Before timing it checks the GPU path against the CPU reference path on a
small shape and exits non-zero on a mismatch.

    python benchmarks/fp8_linear.py --out fp8_linear.json [--m 8192 16384] [--iters 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch
import torch.nn.functional as F

from dsv3.fp8.blocks import quantize_activation_tiles, quantize_weight_blocks
from dsv3.fp8.gemm import fp8_gemm_nt, scaled_mm_blockwise_available
from dsv3.fp8.linear import fp8_linear
from dsv3.fp8.triton_quant import quantize_blocks, quantize_tiles
from dsv3.fp8.weight_cache import reuse_quantized_weights

V3_SHAPES = [(7168, 2048), (2048, 7168), (7168, 18432)]  # (K in, N out)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_numerics() -> dict:
    """GPU (scaled_mm) vs CPU reference on a small ragged shape, fwd and bwd."""
    torch.manual_seed(0)
    t, k, n = 300, 640, 384
    x = torch.randn(t, k, dtype=torch.bfloat16)
    w = torch.randn(n, k)
    gy = torch.randn(t, n, dtype=torch.bfloat16)
    res = {}
    for dev, backend in (("cpu", "reference"), ("cuda", "scaled_mm")):
        xd = x.to(dev).requires_grad_()
        wd = w.to(dev).requires_grad_()
        y = fp8_linear(xd, wd, backend=backend)
        dx, dw = torch.autograd.grad(y, (xd, wd), gy.to(dev))
        res[dev] = [v.detach().cpu() for v in (y, dx, dw)]
    errs = {name: rel(a, b) for name, a, b in zip(("y", "dx", "dW"), res["cuda"], res["cpu"])}
    y_fp32 = x.float() @ w.t()
    errs["y_vs_fp32"] = rel(res["cpu"][0], y_fp32)
    return errs


def bench(fn, iters: int, warmup: int = 5, inner: int = 4) -> float:
    """Median milliseconds per fn() over iters timings of ``inner`` back-to-back calls (CUDA events): the
    host launches ahead of the GPU as in a training step, so one call's launch latency is not timed."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / inner)
    times.sort()
    return times[len(times) // 2]


def run_shape(m: int, k: int, n: int, iters: int) -> dict:
    dev = "cuda"
    torch.manual_seed(0)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w32 = torch.randn(n, k, device=dev, requires_grad=True)  # fp32 master weight
    w16 = w32.detach().to(torch.bfloat16).requires_grad_()
    gy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)

    # torch.autograd.grad: the layer's own gradients, not accumulated into .grad (an extra add over dx and dW
    # that is the trainer's business, and that the GEMM-only timing does not pay)
    def fp8_step():
        y = fp8_linear(x, w32, backend="scaled_mm")
        torch.autograd.grad(y, (x, w32), gy)

    def bf16_step():
        y = F.linear(x, w16)
        torch.autograd.grad(y, (x, w16), gy)

    # Pre-quantized operands for the GEMM-only timing.
    xq, xs = quantize_activation_tiles(x.detach())
    wq, ws = quantize_weight_blocks(w32.detach())
    wtq, wts = wq.t().contiguous(), ws.t().contiguous()
    dq, ds = quantize_activation_tiles(gy)
    dtq, dts = quantize_activation_tiles(gy.t())
    xtq, xts = quantize_activation_tiles(x.detach().t())

    def gemm3():
        fp8_gemm_nt(xq, xs, "tile", wq, ws, "block", torch.bfloat16, "scaled_mm")
        fp8_gemm_nt(dq, ds, "tile", wtq, wts, "block", torch.bfloat16, "scaled_mm")
        fp8_gemm_nt(dtq, dts, "tile", xtq, xts, "tile", torch.float32, "scaled_mm")

    def quant_only():  # the five quantizations of one fwd+bwd, as fp8_linear runs them
        quantize_tiles(x.detach())
        quantize_tiles(x.detach().t())
        quantize_blocks(w32.detach())
        quantize_tiles(gy)
        quantize_tiles(gy.t())

    def quant_torch():  # same with the torch reference quantizer (several passes each)
        quantize_activation_tiles(x.detach())
        quantize_activation_tiles(x.detach().t())
        quantize_weight_blocks(w32.detach())
        quantize_activation_tiles(gy)
        quantize_activation_tiles(gy.t())

    flops = 6.0 * m * k * n
    out = {"M": m, "K": k, "N": n, "flops": flops}
    for name, fn in (("fp8_linear", fp8_step), ("fp8_linear_wcached", fp8_step), ("scaled_mm_x3", gemm3),
                     ("bf16_linear", bf16_step), ("quantize_only", quant_only), ("quantize_torch_ref", quant_torch)):
        if name == "fp8_linear_wcached":
            with reuse_quantized_weights():
                ms = bench(fn, iters)
        else:
            ms = bench(fn, iters)
        out[f"{name}_ms"] = ms
        if not name.startswith("quantize"):
            out[f"{name}_tflops"] = flops / (ms * 1e-3) / 1e12
    out["linear_fraction_of_scaled_mm"] = out["scaled_mm_x3_ms"] / out["fp8_linear_ms"]
    out["linear_fraction_wcached"] = out["scaled_mm_x3_ms"] / out["fp8_linear_wcached_ms"]
    out["fp8_speedup_vs_bf16"] = out["bf16_linear_ms"] / out["fp8_linear_ms"]
    return out


def profile_shape(m: int, k: int, n: int) -> int:
    """Kernel and host-op table of weight-cached fp8_linear forward + backward calls (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w32 = torch.randn(n, k, device="cuda", requires_grad=True)
    gy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)

    def step():
        torch.autograd.grad(fp8_linear(x, w32, backend="scaled_mm"), (x, w32), gy)

    with reuse_quantized_weights():
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(8):
                step()
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="JSON results path")
    p.add_argument("--m", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--profile", default=None, metavar="MxKxN",
                   help="instead of the sweep: profile 8 weight-cached fp8_linear calls at this shape and print the "
                        "kernel table (CUDA time per kernel, host time per op), to see where the layer's time goes")
    args = p.parse_args(argv)
    if args.profile:
        return profile_shape(*(int(v) for v in args.profile.split("x")))
    if not torch.cuda.is_available():
        print("CUDA required", file=sys.stderr)
        return 2
    if not scaled_mm_blockwise_available(0):
        print(f"blockwise torch._scaled_mm unavailable (torch {torch.__version__}, "
              f"{torch.cuda.get_device_name()})", file=sys.stderr)
        return 2
    errs = check_numerics()
    print("numerics (scaled_mm on GPU vs CPU reference):", {k: f"{v:.2e}" for k, v in errs.items()})
    ok = errs["y"] <= 4e-3 and errs["dx"] <= 4e-3 and errs["dW"] <= 1e-3 and errs["y_vs_fp32"] <= 0.045
    if not ok:
        print("NUMERICS MISMATCH: not timing", file=sys.stderr)
    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "numerics": errs,
        "numerics_ok": ok,
        "shapes": [],
    }
    if ok:
        print(f"{'M':>6} {'K':>6} {'N':>6} | {'fp8 lin':>8} {'w cached':>8} {'mm x3':>8} {'bf16':>8} TFLOP/s | "
              f"{'quant ms':>8} {'frac':>5} {'frac wc':>7} {'vs bf16':>7}")
        for m in args.m:
            for k, n in V3_SHAPES:
                r = run_shape(m, k, n, args.iters)
                results["shapes"].append(r)
                print(f"{m:>6} {k:>6} {n:>6} | {r['fp8_linear_tflops']:8.0f} {r['fp8_linear_wcached_tflops']:8.0f} "
                      f"{r['scaled_mm_x3_tflops']:8.0f} {r['bf16_linear_tflops']:8.0f}         | "
                      f"{r['quantize_only_ms']:8.3f} {r['linear_fraction_of_scaled_mm']:5.2f} "
                      f"{r['linear_fraction_wcached']:7.2f} {r['fp8_speedup_vs_bf16']:7.2f}", flush=True)
                torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
