"""Where does FP8 lose accuracy? A fixed-batch probe: N AdamW steps on one repeated batch, per variant.

Adam's first steps move every weight by about lr * sign(gradient), so how far the loss falls in a few steps on a
fixed batch is a sensitive, seconds-long measure of gradient quality. Each variant starts from the same weights
and batch; the table prints the loss drop and its ratio to the BF16 (or fp32 on CPU) baseline:

* ``bf16``: the baseline (autocast on CUDA, fp32 on CPU);
* ``fp8``: the recipe on attention, MLPs and experts, fastest kernels (Triton / cuBLAS on CUDA);
* ``fp8-ref``: the same recipe with the reference kernels (dequantize, fp32 matmul), i.e. the recipe's math
  without our GPU kernels: a gap between ``fp8`` and ``fp8-ref`` is a kernel defect, a gap between
  ``fp8-ref`` and ``bf16`` is the recipe;
* ``fp8-experts`` / ``fp8-experts-ref``, ``fp8-dense`` (attention + MLPs): which GEMM family carries it;
* ``fp8-nocache``: ``fp8`` without the trainer's per-step ``reuse_quantized_weights()`` scope (every other
  variant runs each step inside it, as the trainer does): a gap here is the weight cache;
* ``--compile`` runs every variant with compiled blocks too.

    PYTHONPATH=src python3 benchmarks/fp8_probe.py --out probe.json                   # small preset, CUDA
    PYTHONPATH=src python3 benchmarks/fp8_probe.py --device cpu --preset tiny --out /tmp/p.json   # smoke
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext

import torch

from dsv3.config import preset
from dsv3.fp8.recipe import FP8Recipe, convert_to_fp8
from dsv3.fp8.weight_cache import reuse_quantized_weights
from dsv3.model import DeepseekV3

VARIANTS = {  # name -> (families, backend)
    "bf16": (None, None),
    "fp8": (("attention", "mlp", "experts"), "auto"),
    "fp8-ref": (("attention", "mlp", "experts"), "reference"),
    "fp8-experts": (("experts",), "auto"),
    "fp8-experts-ref": (("experts",), "reference"),
    "fp8-dense": (("attention", "mlp"), "auto"),
    "fp8-nocache": (("attention", "mlp", "experts"), "auto"),
}


def run_variant(name: str, cfg, batch: torch.Tensor, steps: int, lr: float, device: str, compile_blocks: bool,
                use_autocast: bool):
    fams, backend = VARIANTS[name]
    torch.manual_seed(0)
    model = DeepseekV3(cfg).to(device)
    model.init_weights()
    if fams is not None:
        convert_to_fp8(model, FP8Recipe(attention="attention" in fams, mlp="mlp" in fams,
                                        experts="experts" in fams, backend=backend))
    if compile_blocks:
        for layer in model.layers:
            layer.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    t = time.perf_counter()
    for _ in range(steps):
        scope = nullcontext() if fams is None or name == "fp8-nocache" else reuse_quantized_weights()
        with scope:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=use_autocast):
                out = model(batch, batch)
            out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
    return {"first": losses[0], "last": losses[-1], "drop": losses[0] - losses[-1], "losses": losses,
            "seconds": time.perf_counter() - t}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--batch", type=int, default=2)  # 4 x 4096 of `small` without recompute OOMs an 80 GB H100
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=11)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--compile", action="store_true", help="also run each variant with compiled blocks")
    p.add_argument("--autocast", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast (auto: on for CUDA, off for CPU)")
    args = p.parse_args(argv)
    names = args.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown:
        print(f"unknown variant(s) {sorted(unknown)}: use {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    cfg = preset(args.preset).replace(num_nextn_predict_layers=0)
    seq = min(args.seq, cfg.max_position_embeddings) if args.device == "cuda" else min(args.seq, 128)
    batch = torch.randint(0, cfg.vocab_size, (args.batch, seq), generator=torch.Generator().manual_seed(1))
    batch = batch.to(args.device)
    res = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
           "preset": args.preset, "batch": args.batch, "seq": seq, "steps": args.steps, "lr": args.lr, "runs": {}}
    for compiled in ([False, True] if args.compile else [False]):
        for name in names:
            label = name + (" compiled" if compiled else "")
            r = run_variant(name, cfg, batch, args.steps, args.lr, args.device, compiled,
                            args.autocast == "on" or (args.autocast == "auto" and args.device == "cuda"))
            res["runs"][label] = r
            base = res["runs"].get("bf16" + (" compiled" if compiled else ""))
            ratio = r["drop"] / base["drop"] if base and base["drop"] else float("nan")
            print(f"{label:24s} first {r['first']:.4f} last {r['last']:.4f} drop {r['drop']:.4f} "
                  f"({ratio:.3f} of bf16) {r['seconds']:.1f}s", flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
