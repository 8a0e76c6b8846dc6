"""The FP8 quantizers' memory rate on CUDA, against a plain copy of the same tensor.

For the activation shapes of DeepSeek-V3's big linears (bf16, tokens x features) it times:

* ``copy``: ``x.clone()``, the bandwidth yardstick (reads and writes 2 bytes per element);
* ``two_passes``: ``quantize_tiles(x)`` + ``quantize_tiles(x.t())``, the one-axis kernel twice;
* ``both[chunk, warps]``: ``quantize_tiles_both_triton`` (one read of x, tiles along both axes) for each
  column slice and warp count, so the defaults in ``dsv3.fp8.triton_quant`` come from a measurement;

and the 128x128 weight quantizer (fp32 master weights) per warp count. Bit equality of every variant with
the torch reference is checked first. GB/s counts the bytes each must move (bf16 read once, FP8 + scales
written).

    PYTHONPATH=src python3 benchmarks/fp8_quant_probe.py --out quant.json
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from dsv3.fp8.blocks import quantize_activation_tiles, quantize_weight_blocks
from dsv3.fp8.triton_quant import quantize_tiles, quantize_tiles_both_triton, quantize_weight_blocks_triton

# V3 linears at 8192-16384 tokens, and the small preset: attention inputs (16384 x 1536) and routed experts
# (~100k token copies x 1536 into gate/up, x 512 into down)
ACT_SHAPES = [(8192, 7168), (8192, 2048), (16384, 7168), (16384, 18432), (16384, 1536), (16384, 2048),
              (102016, 1536), (102016, 512)]
WEIGHT_SHAPES = [(2048, 7168), (7168, 2048), (18432, 7168)]
CHUNKS = (128, 64, 32)
WARPS = (4, 8, 16)


def ms(fn, iters: int = 20, inner: int = 5) -> float:
    """Median milliseconds per call over ``iters`` timings of ``inner`` back-to-back calls (CUDA events)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) / inner)
    return sorted(out)[len(out) // 2]


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
        ref = (*quantize_activation_tiles(x), *quantize_activation_tiles(x.t()))
        moved = m * k * (2 + 2) + 2 * 4 * m * k / 128  # bf16 in, two FP8 copies out, two scale grids
        row = {"M": m, "K": k, "copy_ms": ms(lambda: x.clone()),
               "two_passes_ms": ms(lambda: (quantize_tiles(x), quantize_tiles(x.t())))}
        for chunk in CHUNKS:
            for warps in WARPS:
                got = quantize_tiles_both_triton(x, False, chunk, warps)
                good = all(same(g, r) for g, r in zip(got, ref))
                ok &= good
                row[f"both_c{chunk}_w{warps}_ms"] = ms(lambda: quantize_tiles_both_triton(x, False, chunk, warps)) \
                    if good else None
        best = min((v, key) for key, v in row.items() if key.startswith("both_") and v is not None)
        row["best"] = best[1]
        row["copy_gbps"] = 2 * 2 * m * k / row["copy_ms"] / 1e6
        row["best_gbps"] = moved / best[0] / 1e6
        row["two_passes_gbps"] = (moved + 2 * m * k) / row["two_passes_ms"] / 1e6  # x read twice
        res["activations"].append(row)
        print(f"{m}x{k}: copy {row['copy_ms']:.3f} ms ({row['copy_gbps']:.0f} GB/s), two passes "
              f"{row['two_passes_ms']:.3f}, best both {best[0]:.3f} ({best[1]}, {row['best_gbps']:.0f} GB/s); "
              + " ".join(f"{key[5:-3]}={v:.3f}" for key, v in row.items() if key.startswith("both_") and v),
              flush=True)
        del x, ref
    for n, k in WEIGHT_SHAPES:
        w = torch.randn(n, k, device="cuda")
        ref = quantize_weight_blocks(w)
        row = {"N": n, "K": k, "copy_ms": ms(lambda: w.clone())}
        for warps in (4, 8, 16):
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
