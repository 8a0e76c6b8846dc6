"""The FP8 quantizers' memory rate on CUDA, against a plain copy of the same tensor.

For the activation shapes of DeepSeek-V3's big linears and the small preset (bf16, tokens x features) it
times ``copy`` (``x.clone()``, the bandwidth yardstick), ``rows`` (``quantize_tiles(x)``: 1x128 tiles along
the features, for fprop/dgrad) and ``cols`` (``quantize_tiles(x.t())``: tiles along the tokens, for wgrad, a
strided read); and the 128x128 weight quantizer (fp32 master weights) per warp count. Bit equality with the
torch reference is checked first.

History: on 2026-11-26 (session 9) this probe also swept a kernel that quantized along both axes from one
read of x. It was slower than the two passes at every shape (raw/2026-11-26-fp8/session9/call4), so it was
removed; the numbers stay in the results file.

    PYTHONPATH=src python3 benchmarks/fp8_quant_probe.py --out quant.json
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from dsv3.fp8.blocks import quantize_activation_tiles, quantize_weight_blocks
from dsv3.fp8.triton_quant import quantize_tiles, quantize_weight_blocks_triton
from fp8_linear import bench   # CUDA-event timer (benchmarks/ is the script's path)

# V3 linears at 8192-16384 tokens, and the small preset: attention inputs (16384 x 1536) and routed experts
# (~100k token copies x 1536 into gate/up, x 512 into down)
ACT_SHAPES = [(8192, 7168), (8192, 2048), (16384, 7168), (16384, 18432), (16384, 1536), (16384, 2048),
              (102016, 1536), (102016, 512)]
WEIGHT_SHAPES = [(2048, 7168), (7168, 2048), (18432, 7168)]
WARPS = (4, 8, 16)


def ms(fn) -> float:
    """Median milliseconds per call, 20 timings of 5 back-to-back calls (CUDA events)."""
    return bench(fn, iters=20, warmup=3, inner=5)


def same(a, b) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("CUDA required", file=sys.stderr)
        return 2
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "activations": [], "weights": []}
    ok = True
    for m, k in ACT_SHAPES:
        torch.manual_seed(0)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        for view in (x, x.t()):
            ok &= all(same(g, r) for g, r in zip(quantize_tiles(view), quantize_activation_tiles(view)))
        moved = m * k * (2 + 1) + 4 * m * k / 128  # bf16 in, FP8 out, one fp32 scale per 128
        row = {"M": m, "K": k, "copy_ms": ms(lambda: x.clone()), "rows_ms": ms(lambda: quantize_tiles(x)),
               "cols_ms": ms(lambda: quantize_tiles(x.t()))}
        row["copy_gbps"] = 4 * m * k / row["copy_ms"] / 1e6
        row["rows_gbps"] = moved / row["rows_ms"] / 1e6
        row["cols_gbps"] = moved / row["cols_ms"] / 1e6
        res["activations"].append(row)
        print(f"{m}x{k}: copy {row['copy_ms']:.3f} ms ({row['copy_gbps']:.0f} GB/s), rows {row['rows_ms']:.3f} "
              f"({row['rows_gbps']:.0f} GB/s), cols {row['cols_ms']:.3f} ({row['cols_gbps']:.0f} GB/s)", flush=True)
    for n, k in WEIGHT_SHAPES:
        w = torch.randn(n, k, device="cuda")
        ref = quantize_weight_blocks(w)
        row = {"N": n, "K": k, "copy_ms": ms(lambda: w.clone())}
        for warps in WARPS:
            got = quantize_weight_blocks_triton(w, False, warps)
            good = same(got[0], ref[0]) and same(got[1], ref[1])
            ok &= good
            row[f"blocks_w{warps}_ms"] = ms(lambda: quantize_weight_blocks_triton(w, False, warps)) if good else None
        res["weights"].append(row)
        print(f"weight {n}x{k} fp32: copy {row['copy_ms']:.3f} ms; "
              + " ".join(f"{key}={v:.3f}" for key, v in row.items() if key.startswith("blocks_") and v), flush=True)
    res["bit_identical"] = ok
    print("bit-identical to the reference:", ok)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
