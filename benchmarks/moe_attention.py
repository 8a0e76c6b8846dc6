"""Microbenchmarks of the two hot layers, forward+backward, BF16 on one GPU.

MoE layer (router + sorted grouped-GEMM experts + shared expert) against (a) torch._grouped_mm alone on the same
routed shapes (the grouped-GEMM ceiling) and (b) one dense GEMM chain of the same FLOPs. MLA attention core
(q/k dim 192, v dim 128, causal) on each SDPA backend that accepts it, plus v padded to 192 for FlashAttention.

    PYTHONPATH=src python3 benchmarks/moe_attention.py --out moe_attention.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from dsv3.config import preset  # noqa: E402
from dsv3.model.moe import MoE, init_moe_  # noqa: E402


def bench(fn, warmup=3, iters=10) -> float:
    """Median seconds of fn() (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def moe_bench(tokens: int, compiled: bool) -> dict:
    cfg = preset("small")
    D, Fd, E, K = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    torch.manual_seed(0)
    moe = MoE(cfg).cuda()
    init_moe_(moe, 0.02)
    moe = moe.to(torch.bfloat16)
    x = torch.randn(1, tokens, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    fwd = torch.compile(moe) if compiled else moe

    def step():
        y, _ = fwd(x)
        y.backward(torch.ones_like(y))

    t = bench(step)
    # model FLOPs: routed K experts + shared, 3 matmuls each, fwd+bwd = 3x forward
    flops = 3 * 2 * tokens * 3 * D * Fd * (K + cfg.n_shared_experts)
    # grouped GEMM ceiling on the same shapes, forward+backward (6 GEMMs worth of the 3 forward ones)
    per = tokens * K // E
    offs = torch.arange(1, E + 1, device="cuda", dtype=torch.int32) * per
    xs = torch.randn(per * E, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w1 = torch.randn(E, Fd, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w2 = torch.randn(E, D, Fd, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def grouped():
        h = torch._grouped_mm(xs, w1.transpose(-2, -1), offs=offs)
        h2 = torch._grouped_mm(xs, w1.transpose(-2, -1), offs=offs)
        y = torch._grouped_mm(F.silu(h) * h2, w2.transpose(-2, -1), offs=offs)
        y.backward(torch.ones_like(y))

    tg = bench(grouped)
    g_flops = 3 * 2 * per * E * 3 * D * Fd
    a = torch.randn(tokens * (K + 1), D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    wd1 = torch.randn(Fd, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    wd3 = torch.randn(Fd, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    wd2 = torch.randn(D, Fd, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def dense():
        y = F.linear(F.silu(F.linear(a, wd1)) * F.linear(a, wd3), wd2)
        y.backward(torch.ones_like(y))

    td = bench(dense)
    return {"tokens": tokens, "compiled": compiled, "moe_ms": t * 1e3, "moe_tflops": flops / t / 1e12,
            "grouped_mm_tflops": g_flops / tg / 1e12, "dense_same_flops_tflops": flops / td / 1e12,
            "moe_fraction_of_grouped": (flops / t) / (g_flops / tg)}


def attention_bench(B=4, H=12, S=4096) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(B, H, S, 192, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, H, S, 192, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, H, S, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    flops_fwd = 2 * B * H * S * S * (192 + 128) / 2
    out = {}
    for name, backend in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
        try:
            def fwd():
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=192 ** -0.5)

            tf = bench(fwd)

            def fb():
                fwd().backward(torch.ones(B, H, S, 128, device="cuda", dtype=torch.bfloat16))

            tb = bench(fb)
            out[name] = {"fwd_tflops": flops_fwd / tf / 1e12, "fwd_bwd_tflops": 3.5 * flops_fwd / tb / 1e12}
        except Exception as e:
            out[name] = {"error": repr(e)[:200]}
    vp = F.pad(v.detach(), (0, 64)).requires_grad_()
    try:
        def flash():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, vp, is_causal=True, scale=192 ** -0.5)[..., :128]
        tf = bench(flash)
        tb = bench(lambda: flash().backward(torch.ones(B, H, S, 128, device="cuda", dtype=torch.bfloat16)))
        out["flash_pad_v192"] = {"fwd_tflops": flops_fwd / tf / 1e12, "fwd_bwd_tflops": 3.5 * flops_fwd / tb / 1e12}
    except Exception as e:
        out["flash_pad_v192"] = {"error": repr(e)[:200]}
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, S, S)
        flex = torch.compile(flex_attention)
        tf = bench(lambda: flex(q, k, v, block_mask=mask, scale=192 ** -0.5))
        tb = bench(lambda: flex(q, k, v, block_mask=mask, scale=192 ** -0.5).backward(
            torch.ones(B, H, S, 128, device="cuda", dtype=torch.bfloat16)))
        out["flex_compiled"] = {"fwd_tflops": flops_fwd / tf / 1e12, "fwd_bwd_tflops": 3.5 * flops_fwd / tb / 1e12}
    except Exception as e:
        out["flex_compiled"] = {"error": repr(e)[:200]}
    return {"shape": [B, H, S, 192, 128], "backends": out}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "moe": [moe_bench(16384, False), moe_bench(16384, True)], "attention": attention_bench()}
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
