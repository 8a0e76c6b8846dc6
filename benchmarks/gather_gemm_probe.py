"""Would a gather-fused grouped GEMM pay? A probe for issue #5's largest lever (written in session 20).

The MoE forward gathers each token's K copies into expert order (a [T*K, D] tensor written to HBM and read
back) and then runs the gate/up grouped GEMMs on it. A kernel that gathers x's rows while it loads its A tiles
skips that pass. Whether that pays depends on how close a Triton grouped GEMM gets to torch's CUTLASS one,
so this probe times, same run, at the `small` and 3.2B shapes (N = 2F: gate and up as one joined weight; and
N = F):

- ``torch``: ``x[src]`` then ``torch._grouped_mm`` (CUTLASS), what the step does now;
- ``gather``: ``x[src]`` alone;
- ``triton``: the Triton kernel below on the already-gathered rows (its efficiency against CUTLASS);
- ``fused``: the same kernel reading rows ``src`` of x itself (no gathered copy);
- the weight gradient g^T x_s per expert: CUTLASS on the saved copy (``torch_wgrad``, today's backward), our
  Triton kernel on it (``triton_wgrad``), and gathering x's rows itself (``fused_wgrad``: then the forward
  need not save the copy at all).

``fused_over_torch`` > 1 means the fused kernel is faster than gather + CUTLASS. Before timing, each Triton
variant is checked against an fp32 reference (relative error in norm < 1e-2, bf16 output).

    PYTHONPATH=src python3 benchmarks/gather_gemm_probe.py --out gather_gemm.json
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gather_gemm_probe.py --check-only   # CPU, toy shapes
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import triton
import triton.language as tl

from dsv3.fp8.grouped import group_bounds

BLOCK_M = 128   # one for every config: the per-expert tile numbering is built with it on the host


def _configs():
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_stages=1, num_warps=4)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_stages=s, num_warps=w)
            for bn, bk, s, w in [(128, 64, 3, 8), (128, 64, 4, 8), (256, 64, 3, 8), (128, 64, 4, 4),
                                 (256, 64, 4, 8), (128, 128, 3, 8)]]


@triton.autotune(configs=_configs(), key=["M", "N", "K", "GATHER"])
@triton.jit
def _grouped_nt_kernel(x_ptr, src_ptr, w_ptr, y_ptr, ends_ptr, tile_ends_ptr, M, N, K, E,
                       s_xm, s_we, s_wn, s_ym,
                       E_P2: tl.constexpr, GATHER: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[r] = x[src[r] if GATHER else r] @ w[e]^T for the rows r of expert e (rows sorted by expert, group e
    ending at ends[e]). Row tiles are numbered per expert (tile_ends: cumulative tiles per expert), as a
    grouped GEMM schedules its groups, so no tile mixes experts and no padding rows exist."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    tile_m, pid_n = pid // num_n, pid % num_n       # column tiles of one row tile side by side: A read once
    ge = tl.arange(0, E_P2)
    tile_ends = tl.load(tile_ends_ptr + ge, mask=ge < E, other=2147483647)
    e = tl.sum((tile_ends <= tile_m).to(tl.int32), axis=0)
    if e < E:
        ends = tl.load(ends_ptr + ge, mask=ge < E, other=0)
        tile0 = tl.sum(tl.where(ge == e - 1, tile_ends, 0), axis=0)
        start = tl.sum(tl.where(ge == e - 1, ends, 0), axis=0)
        end = tl.sum(tl.where(ge == e, ends, 0), axis=0)
        rm = start + (tile_m - tile0) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = rm < end
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        rk = tl.arange(0, BLOCK_K)
        if GATHER:      # constexpr: two kernels, the gathering one reads each row's token index
            rows = tl.load(src_ptr + rm, mask=m_ok, other=0)
        else:
            rows = rm
        a_ptrs = x_ptr + rows[:, None].to(tl.int64) * s_xm + rk[None, :]
        b_ptrs = w_ptr + e.to(tl.int64) * s_we + rn[None, :].to(tl.int64) * s_wn + rk[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(0, tl.cdiv(K, BLOCK_K)):
            k_ok = rk < K - kt * BLOCK_K
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        y_ptrs = y_ptr + rm[:, None].to(tl.int64) * s_ym + rn[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def grouped_nt(x: torch.Tensor, w_ENK: torch.Tensor, ends_E: torch.Tensor, src_M: torch.Tensor | None = None):
    """[M, N]: rows of x (or rows src of x) times w[e]^T per expert group; ends_E int32 cumulative counts."""
    E, N, K = w_ENK.shape
    M = src_M.numel() if src_M is not None else x.shape[0]
    counts = torch.diff(ends_E, prepend=ends_E.new_zeros(1))
    tile_ends = torch.cumsum((counts + BLOCK_M - 1) // BLOCK_M, 0).to(torch.int32)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    max_tiles = triton.cdiv(M, BLOCK_M) + E     # without a host sync: every group's partial tile at most

    def grid(meta):
        return (max_tiles * triton.cdiv(N, meta["BLOCK_N"]),)
    _grouped_nt_kernel[grid](x, src_M if src_M is not None else ends_E, w_ENK, y, ends_E, tile_ends, M, N, K, E,
                             x.stride(0), w_ENK.stride(0), w_ENK.stride(1), y.stride(0),
                             E_P2=triton.next_power_of_2(E), GATHER=src_M is not None, BLOCK_M=BLOCK_M)
    return y


def _wgrad_configs():
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_R": 32}, num_stages=1, num_warps=4)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_R": br}, num_stages=s, num_warps=w)
            for bn, bk, br, s, w in [(128, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 256, 64, 3, 8),
                                     (64, 128, 64, 4, 4), (128, 128, 32, 4, 8)]]


@triton.autotune(configs=_wgrad_configs(), key=["M", "N", "K", "GATHER"])
@triton.jit
def _grouped_wgrad_kernel(g_ptr, x_ptr, src_ptr, dw_ptr, ends_ptr, M, N, K, E,
                          s_gm, s_xm, s_de, s_dn,
                          E_P2: tl.constexpr, GATHER: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """dw[e] = g[rows of e]^T @ x[src[r] if GATHER else r] -> [E, N, K]: the weight gradient of grouped_nt,
    reducing over expert e's rows; the gathering kernel reads x's rows by token (no [M, K] copy kept)."""
    pid = tl.program_id(0)
    num_n, num_k = tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K)
    e = pid // (num_n * num_k)
    pid_n, pid_k = (pid // num_k) % num_n, pid % num_k
    ge = tl.arange(0, E_P2)
    ends = tl.load(ends_ptr + ge, mask=ge < E, other=0)
    start = tl.sum(tl.where(ge == e - 1, ends, 0), axis=0)
    end = tl.sum(tl.where(ge == e, ends, 0), axis=0)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok, k_ok = rn < N, rk < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < end
        if GATHER:
            rows = tl.load(src_ptr + rr, mask=r_ok, other=0)
        else:
            rows = rr
        gt = tl.load(g_ptr + rr[None, :].to(tl.int64) * s_gm + rn[:, None], mask=r_ok[None, :] & n_ok[:, None],
                     other=0.0)                                                       # [BLOCK_N, BLOCK_R]
        xr = tl.load(x_ptr + rows[:, None].to(tl.int64) * s_xm + rk[None, :], mask=r_ok[:, None] & k_ok[None, :],
                     other=0.0)                                                       # [BLOCK_R, BLOCK_K]
        acc = tl.dot(gt, xr, acc)
    dw_ptrs = dw_ptr + e.to(tl.int64) * s_de + rn[:, None].to(tl.int64) * s_dn + rk[None, :]
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


def grouped_wgrad(g_MN: torch.Tensor, x: torch.Tensor, ends_E: torch.Tensor, src_M: torch.Tensor | None = None):
    """[E, N, K]: per expert, g's rows of that expert transposed times x's rows (or rows src of x)."""
    M, N = g_MN.shape
    K = x.shape[1]
    E = ends_E.numel()
    dw = torch.empty(E, N, K, dtype=g_MN.dtype, device=g_MN.device)

    def grid(meta):
        return (E * triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]),)
    _grouped_wgrad_kernel[grid](g_MN, x, src_M if src_M is not None else ends_E, dw, ends_E, M, N, K, E,
                                g_MN.stride(0), x.stride(0), dw.stride(0), dw.stride(1),
                                E_P2=triton.next_power_of_2(E), GATHER=src_M is not None)
    return dw


def routing(T: int, K: int, E: int, device: str):
    """Random top-K routing: (src [T*K] token of each copy in expert order, ends [E] int32)."""
    g = torch.Generator(device=device).manual_seed(0)
    idx = torch.rand(T, E, device=device, generator=g).topk(K, dim=1).indices.reshape(-1)
    order = torch.argsort(idx, stable=True)
    counts = torch.bincount(idx, minlength=E)
    return (order // K).to(torch.int32), torch.cumsum(counts, 0).to(torch.int32)


def reference(x, w_ENK, ends_E, src_M):
    xs = x[src_M.long()].float()
    return torch.cat([xs[s:e] @ w_ENK[g].float().t() for g, (s, e) in enumerate(group_bounds(ends_E))])


def reference_wgrad(g_MN, x, ends_E, src_M):
    xs = x[src_M.long()].float()
    return torch.stack([g_MN[s:e].float().t() @ xs[s:e] for s, e in group_bounds(ends_E)])


def check(T, K, E, D, N, device, dtype, empty_expert: int | None = None):
    """Both Triton variants against the fp32 reference; ``empty_expert``: a group with no rows inserted there."""
    x = torch.randn(T, D, device=device, dtype=dtype)
    w = torch.randn(E, N, D, device=device, dtype=dtype) * 0.05
    src, ends = routing(T, K, E - (empty_expert is not None), device)
    if empty_expert is not None:
        before = ends[empty_expert - 1:empty_expert] if empty_expert > 0 else ends.new_zeros(1)
        ends = torch.cat([ends[:empty_expert], before, ends[empty_expert:]])
    ref = reference(x, w, ends, src)
    errs = {}
    for name, y in (("triton", grouped_nt(x[src.long()], w, ends)), ("fused", grouped_nt(x, w, ends, src))):
        errs[name] = ((y.float() - ref).norm() / ref.norm()).item()
        assert errs[name] < 1e-2, (name, errs[name])
    g = torch.randn(src.numel(), N, device=device, dtype=dtype)
    ref_w = reference_wgrad(g, x, ends, src)
    for name, dw in (("wgrad_triton", grouped_wgrad(g, x[src.long()], ends)),
                     ("wgrad_fused", grouped_wgrad(g, x, ends, src))):
        errs[name] = ((dw.float() - ref_w).norm() / ref_w.norm()).item()
        assert errs[name] < 1e-2, (name, errs[name])
        if empty_expert is not None:
            assert (dw[empty_expert] == 0).all(), name
    return errs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--check-only", action="store_true", help="numerics at toy shapes (CPU with TRITON_INTERPRET=1)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.check_only:
        # uneven groups, an empty expert, rows and columns that do not fill a tile
        for empty in (None, 0, 2):
            print("check", empty, check(T=70, K=3, E=5, D=80, N=48, device=device, dtype=torch.float32,
                                        empty_expert=empty), flush=True)
        return
    from fp8_linear import bench   # median ms of CUDA-event-timed calls (benchmarks/ is the script's path)
    shapes = {"small N=2F": (16384, 6, 64, 1536, 1024), "small N=F": (16384, 6, 64, 1536, 512),
              "3b N=2F": (16384, 6, 48, 2048, 2048), "3b N=F": (16384, 6, 48, 2048, 1024)}
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "shapes": {}}
    for name, (T, K, E, D, N) in shapes.items():
        errs = check(T, K, E, D, N, device, torch.bfloat16)
        x = torch.randn(T, D, device=device, dtype=torch.bfloat16)
        w = torch.randn(E, N, D, device=device, dtype=torch.bfloat16) * 0.05
        src, ends = routing(T, K, E, device)
        srcl = src.long()
        xs = x[srcl]
        wt = w.transpose(-2, -1)
        g = torch.randn(T * K, N, device=device, dtype=torch.bfloat16)
        gt = g.t()
        ms = {"torch": bench(lambda: torch._grouped_mm(x[srcl], wt, offs=ends), 20, warmup=3),
              "gather": bench(lambda: x[srcl], 20, warmup=3),
              "cutlass_only": bench(lambda: torch._grouped_mm(xs, wt, offs=ends), 20, warmup=3),
              "triton": bench(lambda: grouped_nt(xs, w, ends), 20, warmup=3),
              "fused": bench(lambda: grouped_nt(x, w, ends, src), 20, warmup=3),
              # the weight gradient: today it reads the saved [M, D] copy (torch_wgrad); gathering x's rows
              # instead lets the forward keep no copy at all
              "torch_wgrad": bench(lambda: torch._grouped_mm(gt, xs, offs=ends), 20, warmup=3),
              "triton_wgrad": bench(lambda: grouped_wgrad(g, xs, ends), 20, warmup=3),
              "fused_wgrad": bench(lambda: grouped_wgrad(g, x, ends, src), 20, warmup=3)}
        flop = 2 * T * K * N * D
        row = {f"{k}_ms": round(v, 4) for k, v in ms.items()}
        row.update({f"{k}_tflops": round(flop / v / 1e9, 1) for k, v in ms.items() if k != "gather"})
        row.update(fused_over_torch=round(ms["torch"] / ms["fused"], 3),
                   triton_over_cutlass=round(ms["cutlass_only"] / ms["triton"], 3),
                   fused_wgrad_over_torch=round(ms["torch_wgrad"] / ms["fused_wgrad"], 3), rel_err=errs)
        res["shapes"][name] = row
        print(name, json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
