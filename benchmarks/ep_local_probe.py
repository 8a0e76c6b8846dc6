"""One GPU: an EP=2 rank's local expert work under ``ep_dispatch = "allgather"`` against one GPU's experts (#9).

    PYTHONPATH=src python3 benchmarks/ep_local_probe.py --out DIR [--tokens 8192] [--preset small]

At ep = 2 a rank sees both ranks' tokens (N = 2T) and computes the copies routed to its half of the experts,
about T*K of them: the same GEMM FLOPs as one GPU's whole expert layer on T tokens. Timed forward+backward,
each compiled as the trainer compiles the block, balanced routing:

- ``one GPU``: ``experts_forward_sorted`` on T tokens, all E experts (the single-device path);
- ``ep2 rank, slot kernels``: ``local_experts_partial`` on N = 2T tokens, E/2 experts, with the Triton passes
  that skip the other rank's copies (``dsv3.kernels.local_slots``; the default);
- ``ep2 rank, torch exprs``: the same with ``ep_allgather.SLOT_KERNELS = False`` (Inductor's kernels over
  every slot).

Prints ms and the ratio to one GPU (1.0: EP's local half costs nothing extra); writes DIR/ep_local_probe.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch._dynamo

from fp8_linear import bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per rank per micro-batch (2 x 4096)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--profile", action="store_true", help="print each case's kernel table")
    args = ap.parse_args()
    from dsv3.config import preset
    from dsv3.model.moe import Routing, experts_forward_sorted
    from dsv3.parallel import ep_allgather

    cfg = preset(args.preset)
    T, D, F, E, K = (args.tokens, cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts,
                     cfg.num_experts_per_tok)
    dev, bf = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)

    def routing(n):
        idx = torch.rand(n, E, device=dev, generator=g).topk(K, dim=1).indices
        return idx, torch.rand(n, K, device=dev, generator=g)

    w = [(torch.randn(E, F, D, device=dev, generator=g) * 0.02).to(bf).requires_grad_(),
         (torch.randn(E, F, D, device=dev, generator=g) * 0.02).to(bf).requires_grad_(),
         (torch.randn(E, D, F, device=dev, generator=g) * 0.02).to(bf).requires_grad_()]
    half = [t.detach()[: E // 2].clone().requires_grad_() for t in w]
    x1 = torch.randn(T, D, device=dev, generator=g).to(bf).requires_grad_()
    x2 = torch.randn(2 * T, D, device=dev, generator=g).to(bf).requires_grad_()
    i1, w1 = routing(T)
    i2, w2 = routing(2 * T)
    w1.requires_grad_()
    w2.requires_grad_()
    g1, g2 = torch.randn(T, D, device=dev, dtype=bf), torch.randn(2 * T, D, device=dev, dtype=bf)

    def one():
        return experts_forward_sorted(x1, Routing(i1, w1, None), *w)

    def rank():
        return ep_allgather.local_experts_partial(x2, i2, w2, 0, *half)[0]

    res = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
           "config": f"{args.preset}: T={T}, D={D}, F={F}, {E} experts top-{K}; ep2 rank: N={2 * T}, "
                     f"{E // 2} local experts; bf16, compiled, forward+backward, balanced routing", "ms": {}}
    cases = [("one GPU", one, g1, True), ("ep2 rank, slot kernels", rank, g2, True),
             ("ep2 rank, torch exprs", rank, g2, False)]
    for name, fn, grad, kernels in cases:
        ep_allgather.SLOT_KERNELS = kernels
        torch._dynamo.reset()
        compiled = torch.compile(fn)
        # one timing of reps back-to-back calls (CUDA events), as fp8_linear.bench times
        res["ms"][name] = bench(lambda: compiled().backward(grad), 1, warmup=3, inner=args.reps)
        if args.profile:    # the kernels of one forward+backward, by GPU time
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                compiled().backward(grad)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
        print(f"{name:28s} {res['ms'][name]:8.3f} ms  x{res['ms'][name] / res['ms']['one GPU']:.3f} of one GPU",
              flush=True)
    ep_allgather.SLOT_KERNELS = True
    res["slot_kernels_speedup"] = res["ms"]["ep2 rank, torch exprs"] / res["ms"]["ep2 rank, slot kernels"]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "ep_local_probe.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"slot kernels: {res['slot_kernels_speedup']:.3f}x the torch expressions")


if __name__ == "__main__":
    main()
