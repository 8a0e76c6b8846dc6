"""Where do compiled blocks and eager disagree on the GPU? (``tests/test_compile.py``'s CUDA test, H100, torch 2.11,
2026-12-07: in fp32 the compiled model's gradients differ from eager by a relative 1.0 somewhere, while CUDA graphs
match the compiled model to 8e-7; in bf16, 0.164.)

For fp32 and bf16 autocast: the tiny preset with 3 layers, eager vs ``layer.compile()`` blocks, same weights and
batches, one step of two micro-batches. Prints the losses, whether every MoE layer routed the same tokens
(``tokens_per_expert``), and the parameters with the largest relative gradient differences. GPU or CPU.
Usage: ``PYTHONPATH=src python3 benchmarks/compile_parity_probe.py [--device cuda] [--top 8]``.
"""
from __future__ import annotations

import argparse

import torch

from dsv3.config import preset
from dsv3.model import DeepseekV3


def compare(precision: str, device: str, top: int) -> None:
    torch.manual_seed(0)
    cfg = preset("tiny").replace(num_hidden_layers=3, vocab_size=256)
    eager = DeepseekV3(cfg).to(device)
    compiled = DeepseekV3(cfg).to(device)
    compiled.load_state_dict(eager.state_dict())
    for layer in list(compiled.layers) + list(compiled.mtp):
        layer.compile()
    batches = [torch.randint(0, 256, (2, 64), device=device) for _ in range(2)]
    losses = {}
    for name, m in (("eager", eager), ("compiled", compiled)):
        total = 0.0
        for ids in batches:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = m(ids, ids, return_logits=False)
            out.loss.backward()
            total += float(out.loss)
        losses[name] = total / len(batches)
    same_routing = [bool(torch.equal(a.tokens_per_expert, b.tokens_per_expert))
                    for a, b in zip(eager.moe_layers(), compiled.moe_layers())]
    errs = []
    for (n, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.grad is None or q.grad is None:
            errs.append((float("inf") if (p.grad is None) != (q.grad is None) else 0.0, n,
                         f"grad None: eager {p.grad is None}, compiled {q.grad is None}"))
            continue
        err = float((q.grad - p.grad).norm() / p.grad.norm().clamp_min(1e-30))
        errs.append((err, n, f"|g| eager {float(p.grad.norm()):.3g} compiled {float(q.grad.norm()):.3g}"))
    errs.sort(reverse=True)
    print(f"{precision}: loss eager {losses['eager']:.6f} compiled {losses['compiled']:.6f}; "
          f"same routing per MoE layer {same_routing}", flush=True)
    for err, n, note in errs[:top]:
        print(f"  {err:10.3g}  {n}  ({note})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--precisions", default="fp32,bf16")
    args = ap.parse_args()
    for precision in args.precisions.split(","):
        compare(precision, args.device, args.top)


if __name__ == "__main__":
    main()
