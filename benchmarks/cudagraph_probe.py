"""Which part of a one-GPU training step breaks ``train.compile_mode = 'reduce-overhead'`` (CUDA graphs)?

tests/test_compile.py's CUDA test fails in bf16 (session 14, H200: "accessing tensor output of CUDAGraphs that has
been overwritten by a subsequent run", in the first block's input RMSNorm) and passes in fp32. This probe runs the
same two-micro-batch steps with one thing changed per variant and prints which variants train, so the next GPU
session knows where to look. GPU only; every variant runs in its own process (a failed cudagraph tree can leave
state behind), all at once (they are small; compilation is CPU-bound). Each one's stderr tail goes to
``--logs DIR`` when given. Usage: ``PYTHONPATH=src python3 benchmarks/cudagraph_probe.py [--logs DIR] [VARIANT ...]``.
"""
from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

VARIANTS = {
    "base": "bf16 autocast, MTP on, 2 micro-batches per step, blocks cloned (the failing test)",
    "fp32": "fp32, no autocast (the test's passing case)",
    "no_mtp": "no MTP block",
    "one_micro": "1 micro-batch per step",
    "no_clone": "blocks compiled without compile_blocks' cloning wrapper",
    "bf16_params": "bf16 parameters, no autocast",
    "one_layer": "a single decoder layer (no call takes its own function's output)",
    "per_layer": "each block compiled from its own copy of the forward's code (no graph shared by two layers)",
    "per_layer_bf16_params": "per_layer with bf16 parameters, no autocast",
    "selective": "selective recompute, as configs/small.toml trains",
    "mark_once": "one step marker per optimizer step, not per micro-batch",
    "owned_grads": "base with dsv3.train.cudagraph_grads.OwnedGradients (the fix the trainer uses)",
    "owned_no_clone": "owned_grads without compile_blocks' cloning wrapper (is the clone still needed?)",
    "owned_fp32": "owned_grads in fp32",
}


def own_code(bound):
    """``bound`` (a bound method) rebuilt on a copy of its code object, so torch.compile's cache (kept per code
    object) gives this module a graph of its own."""
    f = bound.__func__
    code = f.__code__.replace(co_name=f"{f.__code__.co_name}_{id(bound.__self__):x}")
    g = types.FunctionType(code, f.__globals__, code.co_name, f.__defaults__, f.__closure__)
    g.__kwdefaults__ = f.__kwdefaults__
    return types.MethodType(g, bound.__self__)


def run_variant(name: str) -> None:
    import torch

    from dsv3.config import preset
    from dsv3.model import DeepseekV3
    from dsv3.train.compile_blocks import _cloning_forward, compile_blocks

    torch.manual_seed(0)
    cfg = preset("tiny").replace(num_hidden_layers=1 if name == "one_layer" else 3, vocab_size=256)
    if name == "no_mtp":
        cfg = cfg.replace(num_nextn_predict_layers=0)
    m = DeepseekV3(cfg).cuda()
    if name.endswith("bf16_params"):
        m = m.to(torch.bfloat16)
    if name == "selective":
        m.set_recompute("selective")
    blocks = list(m.layers) + list(m.mtp)
    if name in ("no_clone", "owned_no_clone"):
        for b in blocks:
            b.forward = torch.compile(b.forward, mode="reduce-overhead")
    elif name.startswith("per_layer"):
        for b in blocks:
            b.forward = _cloning_forward(torch.compile(own_code(b.forward), mode="reduce-overhead"))
    else:
        compile_blocks(blocks, "reduce-overhead")
    owned = None
    if name.startswith("owned"):
        from dsv3.train.cudagraph_grads import OwnedGradients
        owned = OwnedGradients(m.parameters())
    micro = 1 if name == "one_micro" else 2
    use_autocast = name not in ("fp32", "owned_fp32") and not name.endswith("bf16_params")
    for step in range(4):
        m.zero_grad(set_to_none=True)
        if owned is not None:
            owned.reset()
        for i in range(micro):
            ids = torch.randint(0, 256, (2, 64), device="cuda")
            if name != "mark_once" or i == 0:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
                loss = m(ids, ids, return_logits=False).loss
            loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(m.parameters(), float("inf"))
    torch.cuda.synchronize()
    print(f"loss {float(loss):.4f} grad_norm {float(gnorm):.4f}")


def main() -> None:
    args = sys.argv[1:]
    if len(args) == 2 and args[0] == "--one":
        run_variant(args[1])
        return
    logs = None
    if args[:1] == ["--logs"]:
        logs, args = Path(args[1]), args[2:]
        logs.mkdir(parents=True, exist_ok=True)
    names = args or list(VARIANTS)
    procs = {n: subprocess.Popen([sys.executable, __file__, "--one", n], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for n in names}
    for name, p in procs.items():
        try:
            out, err = p.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        if logs is not None:
            (logs / f"{name}.stderr.txt").write_text("\n".join(err.splitlines()[-80:]))
        last_err = [line for line in err.splitlines() if "Error" in line][-1:] or [""]
        status = "trains" if p.returncode == 0 else "FAILS"
        print(f"{name:22s} {status:7s} {VARIANTS.get(name, '')} | {out.strip()[-44:]} {last_err[0][:300]}",
              flush=True)


if __name__ == "__main__":
    main()
