"""Microbenchmarks behind the MoE choices of the `small` step (one GPU, bf16), printed as one line each:

- the routed experts' SwiGLU, forward+backward, with gate and up as two N=512 grouped GEMMs, as one stacked
  [E, 2F, D] weight (N=1024), and stacked per step with torch.cat (separate won on an H200: 3.37 vs 3.52 ms);
- one grouped GEMM forward at N=512, N=1024 and the down projection;
- passes over the [T*K, D] token copies: copy, row gather, index_copy_, compiled gather + weighted sum;
- topk over 64 experts, and the router GEMM in fp32 vs bf16.

    PYTHONPATH=src python3 benchmarks/grouped_probe.py

Results: benchmarks/results/2026-11-26-train_step.md (Microbenchmarks).
"""
import torch
torch.manual_seed(0)
dev = "cuda"
E, F_, D = 64, 512, 1536
TK = 16384 * 6
per = TK // E
offs = torch.arange(1, E + 1, device=dev, dtype=torch.int32) * per

from fp8_linear import bench as _bench   # median ms of CUDA-event-timed calls (benchmarks/ is the script's path)


def bench(fn, iters=20):
    return _bench(fn, iters, warmup=3)

x = torch.randn(TK, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
wg = (torch.randn(E, F_, D, device=dev, dtype=torch.bfloat16) * 0.02).requires_grad_()
wu = (torch.randn(E, F_, D, device=dev, dtype=torch.bfloat16) * 0.02).requires_grad_()
wgu = (torch.randn(E, 2 * F_, D, device=dev, dtype=torch.bfloat16) * 0.02).requires_grad_()
wd = (torch.randn(E, D, F_, device=dev, dtype=torch.bfloat16) * 0.02).requires_grad_()
gmm = torch._grouped_mm
def sep():
    a = gmm(x, wg.transpose(-2, -1), offs=offs); b = gmm(x, wu.transpose(-2, -1), offs=offs)
    y = gmm(torch.nn.functional.silu(a) * b, wd.transpose(-2, -1), offs=offs)
    y.backward(torch.ones_like(y))
def fused():
    h = gmm(x, wgu.transpose(-2, -1), offs=offs); a, b = h.chunk(2, dim=-1)
    y = gmm(torch.nn.functional.silu(a) * b, wd.transpose(-2, -1), offs=offs)
    y.backward(torch.ones_like(y))
def fused_cat():
    w = torch.cat([wg, wu], dim=1)
    h = gmm(x, w.transpose(-2, -1), offs=offs); a, b = h.chunk(2, dim=-1)
    y = gmm(torch.nn.functional.silu(a) * b, wd.transpose(-2, -1), offs=offs)
    y.backward(torch.ones_like(y))
fl = 6 * TK * D * F_ * 3
for name, fn in [("separate", sep), ("fused_param", fused), ("fused_cat", fused_cat)]:
    ms = bench(fn); print(f"swiglu fwd+bwd {name:12s} {ms:7.3f} ms  {fl/ms/1e9:6.0f} TFLOP/s", flush=True)
    for t in (x, wg, wu, wgu, wd): t.grad = None
# single GEMMs forward
with torch.no_grad():
    for name, w in [("N512", wg), ("N1024", wgu)]:
        ms = bench(lambda: gmm(x, w.transpose(-2, -1), offs=offs))
        print(f"fwd gemm {name} {ms:.3f} ms {2*TK*D*w.shape[1]/ms/1e9:.0f} TFLOP/s")
    ms = bench(lambda: gmm(torch.empty(TK, F_, device=dev, dtype=torch.bfloat16), wd.transpose(-2, -1), offs=offs))
    print(f"fwd gemm down {ms:.3f} ms {2*TK*D*F_/ms/1e9:.0f} TFLOP/s")
    # passes over [TK, D]
    y = torch.randn(TK, D, device=dev, dtype=torch.bfloat16)
    perm = torch.randperm(TK, device=dev)
    print(f"copy [TK,D] bf16 {bench(lambda: y.clone()):.3f} ms; gather rows {bench(lambda: y[perm]):.3f} ms;"
          f" index_copy {bench(lambda: torch.empty_like(y).index_copy_(0, perm, y)):.3f} ms")
    w = torch.rand(TK // 6, 6, device=dev)
    f = torch.compile(lambda y, p, w: (y[p].view(-1, 6, D).float() * w[..., None]).sum(1).to(torch.bfloat16))
    print(f"compiled gather+weighted sum {bench(lambda: f(y, perm, w)):.3f} ms")
    topk_in = torch.randn(16384, 64, device=dev)
    print(f"topk(6) of [16384,64] fp32 {bench(lambda: topk_in.topk(6, dim=-1)):.3f} ms; "
          f"sort {bench(lambda: topk_in.sort(dim=-1, descending=True)):.3f} ms")
    xr = torch.randn(16384, D, device=dev, dtype=torch.bfloat16); wr = torch.randn(64, D, device=dev)
    print(f"router fp32 gemm {bench(lambda: torch.nn.functional.linear(xr.float(), wr)):.3f} ms; bf16 "
          f"{bench(lambda: torch.nn.functional.linear(xr, wr.bfloat16())):.3f} ms")
