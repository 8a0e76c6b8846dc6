"""The MoE's passes over the token copies at the `small` step's shapes (one GPU, bf16), each variant side by side:

- combine backward (dy and dw of the un-permute + weighted sum): the Triton kernel against the torch expressions
  in expert order compiled by Inductor (the session-6 code);
- gather_sum (the dispatch gather's backward): Triton against the compiled torch expression;
- the routed experts' gate/up/down SwiGLU forward+backward with autograd's two input-gradient GEMMs and their sum
  against ``_GroupedSwiGLUInput``'s single one.

    PYTHONPATH=src python3 benchmarks/moe_permute_probe.py [--tokens 16384 --dim 1536]

Prints ms and the bytes each pass must move over the elapsed time (GB/s); results go to the train_step results file.
"""
import argparse

import torch

from fp8_linear import bench   # median ms of CUDA-event-timed calls (benchmarks/ is the script's path)

ITERS = 20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--topk", type=int, default=6)
    ap.add_argument("--ffn", type=int, default=512)
    a = ap.parse_args()
    from dsv3.kernels import moe_permute
    from dsv3.model import moe

    torch.manual_seed(0)
    T, D, E, K, F_ = a.tokens, a.dim, a.experts, a.topk, a.ffn
    dev, bf = "cuda", torch.bfloat16
    idx = torch.rand(T, E, device=dev).topk(K, dim=-1).indices
    order, inverse, counts = moe.sort_copies(idx, E)
    M = T * K
    y = torch.randn(M, D, device=dev, dtype=bf)
    g = torch.randn(T, D, device=dev, dtype=bf)
    gM = torch.randn(M, D, device=dev, dtype=bf)
    w = torch.rand(T, K, device=dev)
    copy_bytes = M * D * 2
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  T {T} D {D} E {E} K {K}: copies "
          f"{copy_bytes / 1e6:.0f} MB")

    def line(name, ms, nbytes):
        print(f"{name:58s} {ms * 1e3:8.1f} us  {nbytes / ms / 1e6:7.0f} GB/s", flush=True)

    cb_bytes = 2 * copy_bytes + T * D * 2          # y read, dy written, g read once
    line("combine_backward Triton", bench(lambda: moe_permute.combine_backward(g, y, inverse, w), ITERS), cb_bytes)

    @torch.compile
    def expert_order(g_TD, y_MD, rows, order, w_TK):
        g_MD = g_TD.float()[order // K]
        dy = (g_MD * w_TK.reshape(-1)[order, None]).to(y_MD.dtype)
        dw = (g_MD * y_MD.float()).sum(dim=-1)[rows].view(T, K)
        return dy, dw
    line("combine backward, torch in expert order (Inductor)",
         bench(lambda: expert_order(g, y, inverse, order, w), ITERS), cb_bytes)

    gs_bytes = copy_bytes + T * D * 2
    line("gather_sum Triton", bench(lambda: moe_permute.gather_sum(gM, inverse, K), ITERS), gs_bytes)
    ref = torch.compile(lambda g_MD, rows: g_MD[rows].view(T, K, -1).sum(dim=1))
    line("gather_sum, torch (Inductor)", bench(lambda: ref(gM, inverse), ITERS), gs_bytes)

    ends = torch.cumsum(counts, 0).to(torch.int32)
    x = torch.randn(M, D, device=dev, dtype=bf, requires_grad=True)
    ws = [(torch.randn(*s, device=dev, dtype=bf) * 0.02).requires_grad_() for s in ((E, F_, D), (E, F_, D), (E, D, F_))]
    cot = torch.randn(M, D, device=dev, dtype=bf)
    flops = 6 * M * D * F_ * 3
    for fused in (False, True):
        moe.FUSED_GATE_UP_DGRAD = fused

        def step():
            out = moe.grouped_swiglu(x, *ws, moe.grouped_linear, ends, counts)
            torch.autograd.backward(out, cot)
        ms = bench(step, ITERS)
        label = "experts SwiGLU fwd+bwd, " + ("one dgrad GEMM (_GroupedSwiGLUInput)" if fused
                                              else "autograd (2 dgrads + add)")
        print(f"{label:58s} {ms * 1e3:8.1f} us  {flops / ms / 1e9:7.0f} TFLOP/s", flush=True)
    moe.FUSED_GATE_UP_DGRAD = False


if __name__ == "__main__":
    main()
