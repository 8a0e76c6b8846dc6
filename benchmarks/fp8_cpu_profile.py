"""Where the host time of the FP8 training step goes: cProfile of ours compiled with the FP8 recipe (CUDA).

The FP8 `small` step measured 2026-12-07 on an H200 ran 403 ms against 147 ms in BF16 with its GPU busy only
188 ms of it: the host could not issue the work fast enough. This prints the Python functions that take the
host's time in two steps (after three warm-up steps), sorted by own time and by cumulative time.

    PYTHONPATH=src python3 benchmarks/fp8_cpu_profile.py --config small --out fp8_cpu_profile.txt
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from train_step import bench_configs, build_ours, dsv3_adamw, ours_loss  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="small")
    ap.add_argument("--out", required=True)
    ap.add_argument("--top", type=int, default=45)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    cfg, B, S = bench_configs()[args.config]
    model = build_ours(cfg, compile_blocks=True, fp8=True)
    x = torch.randint(0, cfg.vocab_size, (B, S), device="cuda")
    opt = dsv3_adamw(model.parameters())

    def step():
        ours_loss(model, x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    prof.disable()
    text = io.StringIO()
    for key in ("tottime", "cumulative"):
        text.write(f"== sorted by {key} (two steps)\n")
        pstats.Stats(prof, stream=text).sort_stats(key).print_stats(args.top)
    with open(args.out, "w") as f:
        f.write(text.getvalue())
    print(text.getvalue()[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
