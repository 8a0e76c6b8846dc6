"""Which part of a one-GPU training step breaks ``train.compile_mode = 'reduce-overhead'`` (CUDA graphs)?

tests/test_compile.py's CUDA test fails in bf16 (session 14, H200: "accessing tensor output of CUDAGraphs that has
been overwritten by a subsequent run", in the first block's input RMSNorm) and passes in fp32. This probe runs the
same two-micro-batch steps with one thing changed per variant and prints which variants train, so the next GPU
session knows where to look. GPU only; each variant runs in its own process (a failed cudagraph tree can leave
state behind). Usage: ``PYTHONPATH=src python3 benchmarks/cudagraph_probe.py [VARIANT ...]``.
"""
from __future__ import annotations

import subprocess
import sys

VARIANTS = {
    "base": "bf16 autocast, MTP on, 2 micro-batches per step, blocks cloned (the failing test)",
    "no_mtp": "no MTP block",
    "one_micro": "1 micro-batch per step",
    "no_clone": "blocks compiled without compile_blocks' cloning wrapper",
    "bf16_params": "bf16 parameters, no autocast",
    "one_layer": "a single decoder layer (no call takes its own function's output)",
}


def run_variant(name: str) -> None:
    import torch

    from dsv3.config import preset
    from dsv3.model import DeepseekV3
    from dsv3.train.compile_blocks import compile_blocks

    torch.manual_seed(0)
    cfg = preset("tiny").replace(num_hidden_layers=1 if name == "one_layer" else 3, vocab_size=256)
    if name == "no_mtp":
        cfg = cfg.replace(num_nextn_predict_layers=0)
    m = DeepseekV3(cfg).cuda()
    if name == "bf16_params":
        m = m.to(torch.bfloat16)
    blocks = list(m.layers) + list(m.mtp)
    if name == "no_clone":
        for b in blocks:
            b.forward = torch.compile(b.forward, mode="reduce-overhead")
    else:
        compile_blocks(blocks, "reduce-overhead")
    micro = 1 if name == "one_micro" else 2
    use_autocast = name != "bf16_params"
    for step in range(4):
        m.zero_grad(set_to_none=True)
        for _ in range(micro):
            ids = torch.randint(0, 256, (2, 64), device="cuda")
            torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
                loss = m(ids, ids, return_logits=False).loss
            loss.backward()
    torch.cuda.synchronize()
    print(f"loss {float(loss):.4f}")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        run_variant(sys.argv[2])
        return
    names = sys.argv[1:] or list(VARIANTS)
    for name in names:
        r = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True, timeout=180)
        err = [line for line in r.stderr.splitlines() if "Error" in line][-1:] or [""]
        status = "trains" if r.returncode == 0 else "FAILS"
        print(f"{name:12s} {status:7s} {VARIANTS.get(name, '')} | {r.stdout.strip()[-40:]} {err[0][:300]}", flush=True)


if __name__ == "__main__":
    main()
