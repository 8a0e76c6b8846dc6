"""Grouped GEMMs that gather their own rows: the MoE's gate/up projections without the [T*K, D] dispatch copy.

The BF16 MoE forward gathers each token's K copies into expert order (``x[src]``, a [T*K, D] tensor written to
HBM and read back by the grouped GEMM) and saves that copy for the weight gradient. These kernels read rows
``src`` of x while they load their tiles instead, so the copy is never written and never saved:

- ``gathered_grouped_mm(x, src, w, ends, w2)``: ``y[r] = x[src[r]] @ w[e]^T`` for the rows r of expert e (rows in
  expert order, group e ending at ``ends[e]``); with ``w2`` the columns continue with ``x[src[r]] @ w2[e]^T``
  ([M, N + N2]: gate and up as one launch, each row tile of A read once for both).
- ``gathered_grouped_wgrad(g, x, src, ends)``: ``dw[e] = g[rows of e]^T @ x[src[rows of e]]`` -> [E, N, K].

Row tiles are numbered per expert (a tile never mixes experts, no padding rows), the grid is sized without a
host sync (every group's partial tile at most), and nothing is accumulated with atomics, so results are
deterministic. Both are torch custom ops (opaque to Inductor and CUDA-graph safe): Triton on CUDA, the torch
references below elsewhere. ``tests/test_gather_gemm.py`` compares the two under Triton's CPU interpreter;
``benchmarks/gather_gemm_probe.py`` times them against ``x[src]`` + ``torch._grouped_mm`` (CUTLASS).
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

BLOCK_M = 128   # one row-tile height for every config: the per-expert tile numbering is built with it on the host


def _segments(ends_E: torch.Tensor) -> list[tuple[int, int]]:
    ends = [int(v) for v in ends_E.tolist()]
    return list(zip([0] + ends[:-1], ends))


def gathered_grouped_mm_reference(x_TD: torch.Tensor, src_M: torch.Tensor, w_END: torch.Tensor,
                                  ends_E: torch.Tensor, w2_END: torch.Tensor | None = None) -> torch.Tensor:
    """[M, N (+ N2)] in x's dtype: per expert group, x[src] rows times w[e]^T (then w2[e]^T), products in fp32
    (or x's dtype if wider)."""
    acc = torch.promote_types(x_TD.dtype, torch.float32)
    xs = x_TD[src_M.long()].to(acc)
    ws = [w_END] if w2_END is None else [w_END, w2_END]
    out = xs.new_zeros(xs.shape[0], sum(w.shape[1] for w in ws))
    for e, (s, t) in enumerate(_segments(ends_E)):
        out[s:t] = torch.cat([xs[s:t] @ w[e].to(acc).t() for w in ws], dim=1)
    return out.to(x_TD.dtype)


def gathered_grouped_wgrad_reference(g_MN: torch.Tensor, x_TD: torch.Tensor, src_M: torch.Tensor,
                                     ends_E: torch.Tensor) -> torch.Tensor:
    """[E, N, D] in g's dtype: per expert, g's rows transposed times x's rows src (sums in fp32, or g's dtype if
    wider); empty experts 0."""
    acc = torch.promote_types(g_MN.dtype, torch.float32)
    xs = x_TD[src_M.long()].to(acc)
    g = g_MN.to(acc)
    return torch.stack([g[s:t].t() @ xs[s:t] for s, t in _segments(ends_E)]).to(g_MN.dtype)


if HAS_TRITON:
    def _mm_configs():
        if os.environ.get("TRITON_INTERPRET") == "1":
            return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_stages=1, num_warps=4)]
        return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_stages=s, num_warps=w)
                for bn, bk, s, w in [(128, 64, 3, 8), (128, 64, 4, 8), (256, 64, 3, 8), (128, 64, 4, 4),
                                     (256, 64, 4, 8), (128, 128, 3, 8)]]

    @triton.autotune(configs=_mm_configs(), key=["M", "N", "K", "GATHER"])
    @triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
    @triton.jit
    def _gathered_mm_kernel(x_ptr, src_ptr, w_ptr, w2_ptr, y_ptr, ends_ptr, tile_ends_ptr, M, N, N1, K, E,
                            s_xm, s_we, s_wn, s_w2e, s_w2n, s_ym,
                            E_P2: tl.constexpr, GATHER: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
        """y[r, n] = x[src[r] if GATHER else r] . (w[e, n] if n < N1 else w2[e, n - N1]) for expert e's rows r."""
        pid = tl.program_id(0)
        num_n = tl.cdiv(N, BLOCK_N)
        tile_m, pid_n = pid // num_n, pid % num_n       # column tiles of one row tile side by side: A from L2
        ge = tl.arange(0, E_P2)
        tile_ends = tl.load(tile_ends_ptr + ge, mask=ge < E, other=2147483647)
        e = tl.sum((tile_ends <= tile_m).to(tl.int32), axis=0)
        if e < E:       # the grid covers the worst case; tiles past the last expert's do nothing
            ends = tl.load(ends_ptr + ge, mask=ge < E, other=0)
            tile0 = tl.sum(tl.where(ge == e - 1, tile_ends, 0), axis=0)
            start = tl.sum(tl.where(ge == e - 1, ends, 0), axis=0)
            end = tl.sum(tl.where(ge == e, ends, 0), axis=0)
            rm = start + (tile_m - tile0) * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = rm < end
            rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = rn < N
            rk = tl.arange(0, BLOCK_K)
            if GATHER:
                rows = tl.load(src_ptr + rm, mask=m_ok, other=0)
            else:
                rows = rm
            a_ptrs = x_ptr + rows[:, None].to(tl.int64) * s_xm + rk[None, :]
            # columns past N1 read the second weight (per column, so a tile may straddle the two)
            first = rn < N1
            w_off = tl.where(first, e.to(tl.int64) * s_we + rn.to(tl.int64) * s_wn,
                             e.to(tl.int64) * s_w2e + (rn - N1).to(tl.int64) * s_w2n)
            b_ptrs = tl.where(first[None, :], w_ptr, w2_ptr) + w_off[None, :] + rk[:, None]
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for kt in range(0, tl.cdiv(K, BLOCK_K)):
                if EVEN_K:      # the model's widths: no K mask, so loads along K stay vectorized
                    a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
                    b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
                else:
                    k_ok = rk < K - kt * BLOCK_K
                    a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                    b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc = tl.dot(a, b, acc)
                a_ptrs += BLOCK_K
                b_ptrs += BLOCK_K
            y_ptrs = y_ptr + rm[:, None].to(tl.int64) * s_ym + rn[None, :]
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    def _wgrad_configs():
        if os.environ.get("TRITON_INTERPRET") == "1":
            return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_R": 32}, num_stages=1, num_warps=4)]
        return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_R": br}, num_stages=s, num_warps=w)
                for bn, bk, br, s, w in [(128, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 256, 64, 3, 8),
                                         (64, 128, 64, 4, 4), (128, 128, 32, 4, 8)]]

    @triton.autotune(configs=_wgrad_configs(), key=["M", "N", "K", "GATHER"])
    @triton.jit
    def _gathered_wgrad_kernel(g_ptr, x_ptr, src_ptr, dw_ptr, ends_ptr, M, N, K, E,
                               s_gm, s_xm, s_de, s_dn,
                               E_P2: tl.constexpr, GATHER: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        """dw[e] = g[rows of e]^T @ x[src[r] if GATHER else r]: one [BLOCK_N, BLOCK_K] tile of one expert,
        reducing over that expert's rows (an empty expert stores zeros)."""
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
            gt = tl.load(g_ptr + rr[None, :].to(tl.int64) * s_gm + rn[:, None],
                         mask=r_ok[None, :] & n_ok[:, None], other=0.0)                      # [BLOCK_N, BLOCK_R]
            xr = tl.load(x_ptr + rows[:, None].to(tl.int64) * s_xm + rk[None, :],
                         mask=r_ok[:, None] & k_ok[None, :], other=0.0)                      # [BLOCK_R, BLOCK_K]
            acc = tl.dot(gt, xr, acc)
        dw_ptrs = dw_ptr + e.to(tl.int64) * s_de + rn[:, None].to(tl.int64) * s_dn + rk[None, :]
        tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


def launch_gathered_mm(x: torch.Tensor, src_M: torch.Tensor | None, w_END: torch.Tensor, ends_E: torch.Tensor,
                       w2_END: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel on any device Triton runs on (CUDA, or the CPU interpreter in tests). ``src_M`` None:
    x's rows are already in expert order. Inner dims must be contiguous."""
    E, N1, K = w_END.shape
    w2 = w_END if w2_END is None else w2_END
    N = N1 + (0 if w2_END is None else w2_END.shape[1])
    M = src_M.numel() if src_M is not None else x.shape[0]
    counts = torch.diff(ends_E, prepend=ends_E.new_zeros(1))
    tile_ends = torch.cumsum((counts + BLOCK_M - 1) // BLOCK_M, 0).to(torch.int32)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    max_tiles = triton.cdiv(M, BLOCK_M) + E      # every group's partial tile at most: no host sync

    def grid(meta):
        return (max_tiles * triton.cdiv(N, meta["BLOCK_N"]),)
    _gathered_mm_kernel[grid](x, src_M if src_M is not None else ends_E, w_END, w2, y, ends_E, tile_ends,
                              M, N, N1, K, E, x.stride(0), w_END.stride(0), w_END.stride(1), w2.stride(0),
                              w2.stride(1), y.stride(0), E_P2=triton.next_power_of_2(E), GATHER=src_M is not None,
                              BLOCK_M=BLOCK_M)
    return y


def launch_gathered_wgrad(g_MN: torch.Tensor, x: torch.Tensor, src_M: torch.Tensor | None, ends_E: torch.Tensor
                          ) -> torch.Tensor:
    """The Triton weight-gradient kernel -> [E, N, K] in g's dtype; g may have any row stride (a column slice)."""
    M, N = g_MN.shape
    K = x.shape[1]
    E = ends_E.numel()
    dw = torch.empty(E, N, K, dtype=g_MN.dtype, device=g_MN.device)

    def grid(meta):
        return (E * triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]),)
    _gathered_wgrad_kernel[grid](g_MN, x, src_M if src_M is not None else ends_E, dw, ends_E, M, N, K, E,
                                 g_MN.stride(0), x.stride(0), dw.stride(0), dw.stride(1),
                                 E_P2=triton.next_power_of_2(E), GATHER=src_M is not None)
    return dw


def usable(x: torch.Tensor) -> bool:
    """Whether the Triton kernels run for x (16-bit on CUDA with Triton; fp32 would run as TF32 there); elsewhere
    the ops run their references."""
    return HAS_TRITON and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def _inner_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("dsv3::gathered_grouped_mm", mutates_args=())
def gathered_grouped_mm(x_TD: torch.Tensor, src_M: torch.Tensor, w_END: torch.Tensor, ends_E: torch.Tensor,
                        w2_END: torch.Tensor | None = None) -> torch.Tensor:
    """[M, N (+ N2)]: x[src[r]] @ w[e]^T (then @ w2[e]^T) for expert e's rows r; ``ends_E`` int32 cumulative
    group ends, ``src_M`` int32 token of each row. Triton on CUDA, ``gathered_grouped_mm_reference`` elsewhere."""
    if not usable(x_TD):
        return gathered_grouped_mm_reference(x_TD, src_M, w_END, ends_E, w2_END)
    return launch_gathered_mm(_inner_contiguous(x_TD), src_M.contiguous(), _inner_contiguous(w_END), ends_E,
                              None if w2_END is None else _inner_contiguous(w2_END))


@gathered_grouped_mm.register_fake
def _gathered_grouped_mm_fake(x_TD, src_M, w_END, ends_E, w2_END=None):
    n = w_END.shape[1] + (0 if w2_END is None else w2_END.shape[1])
    return x_TD.new_empty(src_M.shape[0], n)


@torch.library.custom_op("dsv3::gathered_grouped_wgrad", mutates_args=())
def gathered_grouped_wgrad(g_MN: torch.Tensor, x_TD: torch.Tensor, src_M: torch.Tensor, ends_E: torch.Tensor
                           ) -> torch.Tensor:
    """[E, N, D] in g's dtype: g[rows of e]^T @ x[src[rows of e]] per expert (the weight gradient of
    ``gathered_grouped_mm``, reading x's rows by token so no gathered copy need be kept)."""
    if not usable(x_TD):
        return gathered_grouped_wgrad_reference(g_MN, x_TD, src_M, ends_E)
    return launch_gathered_wgrad(_inner_contiguous(g_MN), _inner_contiguous(x_TD), src_M.contiguous(), ends_E)


@gathered_grouped_wgrad.register_fake
def _gathered_grouped_wgrad_fake(g_MN, x_TD, src_M, ends_E):
    return g_MN.new_empty(ends_E.shape[0], g_MN.shape[1], x_TD.shape[1])
