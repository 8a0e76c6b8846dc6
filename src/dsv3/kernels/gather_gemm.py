"""Grouped GEMMs that gather (and scale) their own rows: the MoE's expert GEMMs without [T*K, D] copies in HBM.

The BF16 MoE gathers each token's K copies into expert order (``x[src]``, a [T*K, D] tensor written to HBM and
read back by the grouped GEMM, and saved for the weight gradient); its backward writes two [T*K, D] input
gradients (gate and up) for the gather-sum to read, and the combine's backward writes dy = w * g[token] as one
more [T*K, D] tensor. These kernels read rows ``src`` of their operand while they load its tiles, optionally
times a per-row scale, so none of those copies is written:

- ``gathered_grouped_mm(x, w, ends, src, scale, w2)``: ``y[r] = a[r] @ w[e]^T`` for the rows r of expert e
  (rows in expert order, group e ending at ``ends[e]``), ``a[r] = x[src[r]] * scale[r]``; with ``w2`` the
  columns continue with ``a[r] @ w2[e]^T`` ([M, N + N2]: gate and up as one launch).
- ``gathered_grouped_mm_nn(x, w, ends, src, scale, w2)``: ``y[r] = a[r] @ w[e]`` for weights stored [E, K, N]
  (the input gradients); with ``w2`` the reduction continues over a's next columns:
  ``a[r, :K1] @ w[e] + a[r, K1:] @ w2[e]`` (gate's and up's input gradients as ONE [M, D] output).
- ``gathered_grouped_wgrad(g, x, ends, x_src, g_src, g_scale)``: ``dw[e] = G_e^T @ X_e`` -> [E, N, K] with
  ``G[r] = g[g_src[r]] * g_scale[r]`` and ``X[r] = x[x_src[r]]`` over expert e's rows.

A missing ``src`` reads rows in order, a missing ``scale`` is 1. A scaled row is rounded to the operand's dtype
before the product, as ``(g.float() * w).to(bf16)`` would be. Row tiles are numbered per expert (a tile never
mixes experts, no padding rows), the grid is sized without a host sync, and nothing is accumulated with
atomics, so results are deterministic. The three are torch custom ops (opaque to Inductor, CUDA-graph safe):
Triton for 16-bit CUDA tensors, the torch references below elsewhere. ``tests/test_gather_gemm.py`` compares the
two under Triton's CPU interpreter; ``benchmarks/gather_gemm_probe.py`` times them against ``x[src]`` +
``torch._grouped_mm`` (CUTLASS).
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

# How the forward / input-gradient kernel loads the weight tiles: "pointer" (cp.async loads, the tested default)
# or "tma" (Hopper's tensor memory accelerator: one descriptor load per tile; out-of-range rows and columns of
# w[e] arrive as zeros). The gathered activation side is always pointer loads: Hopper's TMA has no row gather.
# "tma" is untimed (written in session 21 with no device); ``benchmarks/gather_gemm_probe.py`` times both.
B_LOADS = "pointer"

BLOCK_M = 128   # one row-tile height for every config: the per-expert tile numbering is built with it on the host


def _rows(x: torch.Tensor, src: torch.Tensor | None, scale: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor:
    """x[src] * scale, the scaled rows rounded to x's dtype first (as the kernels do), then in ``acc``."""
    a = x if src is None else x[src.long()]
    if scale is not None:
        a = (a.to(torch.promote_types(a.dtype, torch.float32)) * scale[:, None]).to(x.dtype)
    return a.to(acc)


def gathered_grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, ends_E: torch.Tensor,
                                  src_M: torch.Tensor | None = None, scale_M: torch.Tensor | None = None,
                                  w2: torch.Tensor | None = None, w_kn: bool = False) -> torch.Tensor:
    """The grouped product in fp32 (or x's dtype if wider), returned in x's dtype. ``w_kn`` False: w [E, N, K],
    y = a w[e]^T, w2 adds columns; True: w [E, K, N], y = a w[e], w2 continues the reduction over a's columns."""
    from dsv3.fp8.grouped import group_bounds     # (lazy: the FP8 stack is not the model's import)
    acc = torch.promote_types(x.dtype, torch.float32)
    a = _rows(x, src_M, scale_M, acc)
    mats = [w] if w2 is None else [w, w2]
    b = [m.to(acc) if w_kn else m.to(acc).transpose(1, 2) for m in mats]        # each [E, K_i, N_i]
    n = b[0].shape[2] if w_kn else sum(m.shape[2] for m in b)
    out = a.new_zeros(a.shape[0], n)
    for e, (s, t) in enumerate(group_bounds(ends_E)):
        if w_kn:
            k1 = b[0].shape[1]
            out[s:t] = a[s:t, :k1] @ b[0][e] + (a[s:t, k1:] @ b[1][e] if len(b) > 1 else 0)
        else:
            out[s:t] = torch.cat([a[s:t] @ m[e] for m in b], dim=1)
    return out.to(x.dtype)


def gathered_grouped_wgrad_reference(g: torch.Tensor, x: torch.Tensor, ends_E: torch.Tensor,
                                     x_src: torch.Tensor | None = None, g_src: torch.Tensor | None = None,
                                     g_scale: torch.Tensor | None = None) -> torch.Tensor:
    """[E, N, K] in g's dtype: per expert, G's rows transposed times X's rows (sums in fp32, or wider); empty
    experts 0."""
    from dsv3.fp8.grouped import group_bounds
    acc = torch.promote_types(g.dtype, torch.float32)
    G, X = _rows(g, g_src, g_scale, acc), _rows(x, x_src, None, acc)
    return torch.stack([G[s:t].t() @ X[s:t] for s, t in group_bounds(ends_E)]).to(g.dtype)


if HAS_TRITON:
    def _weight_blocks(nargs):
        """Autotune pre-hook: the weight descriptors' block shapes follow the config's tile (TMA loads only)."""
        if nargs.get("w_desc") is None:
            return
        bn, bk = nargs["BLOCK_N"], nargs["BLOCK_K"]
        for name in ("w_desc", "w2_desc"):
            nargs[name].block_shape = [1, bk, bn] if nargs["B_KN"] else [1, bn, bk]

    def _mm_configs():
        if os.environ.get("TRITON_INTERPRET") == "1":
            return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_stages=1, num_warps=4,
                                  pre_hook=_weight_blocks)]
        return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_stages=s, num_warps=w, pre_hook=_weight_blocks)
                for bn, bk, s, w in [(128, 64, 3, 8), (128, 64, 4, 8), (256, 64, 3, 8), (128, 64, 4, 4),
                                     (256, 64, 4, 8), (128, 128, 3, 8)]]

    @triton.jit
    def _k_loop(acc, a_ptrs, b_ptrs, b_desc, e, n0, m_ok, n_ok, rk, Kc, s_bk, scale, SCALE: tl.constexpr,
                EVEN_K: tl.constexpr, B_TMA: tl.constexpr, B_KN: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
        """acc += a[:, :Kc] @ b[:Kc, n0:n0 + BLOCK_N] over BLOCK_K steps: a's columns contiguous; b by pointers
        (rows s_bk apart) or, with B_TMA, by descriptor loads of w[e] ([E, K, N] if B_KN, else [E, N, K])."""
        for kt in range(0, tl.cdiv(Kc, BLOCK_K)):
            if EVEN_K:      # the model's widths: no K mask, so loads along K stay vectorized
                a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
            else:
                k_ok = rk < Kc - kt * BLOCK_K
                a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if B_TMA:
                if B_KN:
                    b = b_desc.load([e, kt * BLOCK_K, n0]).reshape(BLOCK_K, BLOCK_N)
                else:
                    b = b_desc.load([e, n0, kt * BLOCK_K]).reshape(BLOCK_N, BLOCK_K).T
            elif EVEN_K:
                b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
            else:
                b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if SCALE:       # rounded to the operand dtype first: the bits of (g.float() * w).to(bf16)
                a = (a.to(tl.float32) * scale[:, None]).to(b.dtype)
            acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * s_bk
        return acc

    @triton.autotune(configs=_mm_configs(), key=["M", "N1", "N2", "K1", "K2", "GATHER", "SCALE", "B_TMA"])
    @triton.heuristics({"EVEN_K": lambda args: args["K1"] % args["BLOCK_K"] == 0
                        and args["K2"] % args["BLOCK_K"] == 0})
    @triton.jit
    def _gathered_mm_kernel(x_ptr, src_ptr, scale_ptr, w_ptr, w2_ptr, w_desc, w2_desc, y_ptr, ends_ptr,
                            tile_ends_ptr, M, N1, N2, K1, K2, E, s_xm, s_we, s_wn, s_w2e, s_w2n, s_wk, s_ym,
                            E_P2: tl.constexpr, GATHER: tl.constexpr, SCALE: tl.constexpr, B_TMA: tl.constexpr,
                            B_KN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
        """y[r, n] = sum_k a[r, k] B[k, n] for expert e's rows r, a[r] = x[src[r] or r] (* scale[r]);
        B[k, n] = w[e] at (n, k) by strides for n < N1, then w2[e] at (n - N1, k) for N2 more columns; with
        K2 > 0 (and N2 = 0) the reduction continues over a's columns K1.. against w2[e]. B_KN: w is [E, K, N]
        (the descriptors' layout; the strides say the same for pointer loads)."""
        pid = tl.program_id(0)
        num_n1 = tl.cdiv(N1, BLOCK_N)
        num_n = num_n1 + tl.cdiv(N2, BLOCK_N)
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
            rk = tl.arange(0, BLOCK_K)
            e64 = e.to(tl.int64)
            if GATHER:
                rows = tl.load(src_ptr + rm, mask=m_ok, other=0)
            else:
                rows = rm
            if SCALE:
                scale = tl.load(scale_ptr + rm, mask=m_ok, other=0.0).to(tl.float32)
            else:
                scale = tl.zeros((BLOCK_M,), dtype=tl.float32)
            a_row = x_ptr + rows[:, None].to(tl.int64) * s_xm
            y_row = y_ptr + rm[:, None].to(tl.int64) * s_ym
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            # a column tile reads one weight: w's N1 columns first, then w2's N2
            if pid_n < num_n1:
                n0 = pid_n * BLOCK_N
                rn = n0 + tl.arange(0, BLOCK_N)
                n_ok = rn < N1
                b_ptrs = w_ptr + e64 * s_we + rn[None, :].to(tl.int64) * s_wn + rk[:, None].to(tl.int64) * s_wk
                acc = _k_loop(acc, a_row + rk[None, :], b_ptrs, w_desc, e, n0, m_ok, n_ok, rk, K1, s_wk, scale,
                              SCALE, EVEN_K, B_TMA, B_KN, BLOCK_N, BLOCK_K)
                if K2 > 0:
                    b2_ptrs = (w2_ptr + e64 * s_w2e + rn[None, :].to(tl.int64) * s_w2n
                               + rk[:, None].to(tl.int64) * s_wk)
                    acc = _k_loop(acc, a_row + K1 + rk[None, :], b2_ptrs, w2_desc, e, n0, m_ok, n_ok, rk, K2, s_wk,
                                  scale, SCALE, EVEN_K, B_TMA, B_KN, BLOCK_N, BLOCK_K)
                tl.store(y_row + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
            else:
                n0 = (pid_n - num_n1) * BLOCK_N
                rn = n0 + tl.arange(0, BLOCK_N)
                n_ok = rn < N2
                b_ptrs = w2_ptr + e64 * s_w2e + rn[None, :].to(tl.int64) * s_w2n + rk[:, None].to(tl.int64) * s_wk
                acc = _k_loop(acc, a_row + rk[None, :], b_ptrs, w2_desc, e, n0, m_ok, n_ok, rk, K1, s_wk, scale,
                              SCALE, EVEN_K, B_TMA, B_KN, BLOCK_N, BLOCK_K)
                tl.store(y_row + N1 + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                         mask=m_ok[:, None] & n_ok[None, :])

    def _wgrad_configs():
        if os.environ.get("TRITON_INTERPRET") == "1":
            return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_R": 32}, num_stages=1, num_warps=4)]
        return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_R": br}, num_stages=s, num_warps=w)
                for bn, bk, br, s, w in [(128, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 256, 64, 3, 8),
                                         (64, 128, 64, 4, 4), (128, 128, 32, 4, 8)]]

    @triton.autotune(configs=_wgrad_configs(), key=["M", "N", "K", "GATHER_G", "SCALE_G", "GATHER_X"])
    @triton.jit
    def _gathered_wgrad_kernel(g_ptr, g_src_ptr, g_scale_ptr, x_ptr, x_src_ptr, dw_ptr, ends_ptr, M, N, K, E,
                               s_gm, s_xm, s_de, s_dn, E_P2: tl.constexpr, GATHER_G: tl.constexpr,
                               SCALE_G: tl.constexpr, GATHER_X: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        """dw[e] = G[rows of e]^T @ X[rows of e], G[r] = g[g_src[r] or r] (* g_scale[r]), X[r] = x[x_src[r] or r]:
        one [BLOCK_N, BLOCK_K] tile of one expert, reducing over that expert's rows (an empty expert stores 0)."""
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
            if GATHER_G:
                g_rows = tl.load(g_src_ptr + rr, mask=r_ok, other=0)
            else:
                g_rows = rr
            if GATHER_X:
                x_rows = tl.load(x_src_ptr + rr, mask=r_ok, other=0)
            else:
                x_rows = rr
            gt = tl.load(g_ptr + g_rows[None, :].to(tl.int64) * s_gm + rn[:, None],
                         mask=r_ok[None, :] & n_ok[:, None], other=0.0)                      # [BLOCK_N, BLOCK_R]
            if SCALE_G:
                s = tl.load(g_scale_ptr + rr, mask=r_ok, other=0.0).to(tl.float32)
                gt = (gt.to(tl.float32) * s[None, :]).to(g_ptr.dtype.element_ty)
            xr = tl.load(x_ptr + x_rows[:, None].to(tl.int64) * s_xm + rk[None, :],
                         mask=r_ok[:, None] & k_ok[None, :], other=0.0)                      # [BLOCK_R, BLOCK_K]
            acc = tl.dot(gt, xr, acc)
        dw_ptrs = dw_ptr + e.to(tl.int64) * s_de + rn[:, None].to(tl.int64) * s_dn + rk[None, :]
        tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


def launch_gathered_mm(x: torch.Tensor, w: torch.Tensor, ends_E: torch.Tensor, src_M: torch.Tensor | None = None,
                       scale_M: torch.Tensor | None = None, w2: torch.Tensor | None = None,
                       w_kn: bool = False) -> torch.Tensor:
    """The Triton kernel of ``gathered_grouped_mm`` (``w_kn`` False) / ``gathered_grouped_mm_nn`` (True) on any
    device Triton runs on (CUDA, or the CPU interpreter in tests). x's and the weights' inner dims contiguous."""
    E = w.shape[0]
    if w_kn:        # w [E, K1, N] (w2 [E, K2, N]): b[k, n] at w[e, k, n]
        K1, N1, N2 = w.shape[1], w.shape[2], 0
        K2 = 0 if w2 is None else w2.shape[1]
        s_wn, s_w2n, s_wk = 1, 1, w.stride(1)
        assert w2 is None or (w2.shape[2] == N1 and w2.stride(1) == s_wk), "w2 must match w's layout"
    else:           # w [E, N1, K] (w2 [E, N2, K]): b[k, n] at w[e, n, k]
        N1, K1, K2 = w.shape[1], w.shape[2], 0
        N2 = 0 if w2 is None else w2.shape[1]
        s_wn, s_w2n, s_wk = w.stride(1), (0 if w2 is None else w2.stride(1)), 1
    N = N1 + N2
    w2_ = w if w2 is None else w2
    M = src_M.numel() if src_M is not None else x.shape[0]
    counts = torch.diff(ends_E, prepend=ends_E.new_zeros(1))
    tile_ends = torch.cumsum((counts + BLOCK_M - 1) // BLOCK_M, 0).to(torch.int32)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    max_tiles = triton.cdiv(M, BLOCK_M) + E      # every group's partial tile at most: no host sync

    def grid(meta):
        return (max_tiles * (triton.cdiv(N1, meta["BLOCK_N"]) + triton.cdiv(N2, meta["BLOCK_N"])),)
    if B_LOADS not in ("pointer", "tma"):
        raise ValueError(f"gather_gemm.B_LOADS must be 'pointer' or 'tma', got {B_LOADS!r}")
    w_desc = w2_desc = None
    if B_LOADS == "tma":
        from dsv3.fp8.triton_grouped import TensorDescriptor, tma_ok    # the FP8 kernels' TMA conditions
        if tma_ok(w, w2_):
            # block shapes are set per config by the autotune pre-hook (_weight_blocks)
            w_desc = TensorDescriptor(w, list(w.shape), list(w.stride()), [1, 1, 1])
            w2_desc = TensorDescriptor(w2_, list(w2_.shape), list(w2_.stride()), [1, 1, 1])
    _gathered_mm_kernel[grid](x, src_M if src_M is not None else ends_E, scale_M if scale_M is not None else x,
                              w, w2_, w_desc, w2_desc, y, ends_E, tile_ends, M, N1, N2, K1, K2, E, x.stride(0),
                              w.stride(0), s_wn, w2_.stride(0), s_w2n, s_wk, y.stride(0),
                              E_P2=triton.next_power_of_2(E), GATHER=src_M is not None, SCALE=scale_M is not None,
                              B_TMA=w_desc is not None, B_KN=w_kn, BLOCK_M=BLOCK_M)
    return y


def launch_gathered_wgrad(g: torch.Tensor, x: torch.Tensor, ends_E: torch.Tensor, x_src: torch.Tensor | None = None,
                          g_src: torch.Tensor | None = None, g_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton weight-gradient kernel -> [E, N, K] in g's dtype; g may have any row stride (a column slice)."""
    M = (g_src if g_src is not None else g).shape[0]
    N, K, E = g.shape[1], x.shape[1], ends_E.numel()
    dw = torch.empty(E, N, K, dtype=g.dtype, device=g.device)

    def grid(meta):
        return (E * triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]),)
    _gathered_wgrad_kernel[grid](g, g_src if g_src is not None else ends_E, g_scale if g_scale is not None else g,
                                 x, x_src if x_src is not None else ends_E, dw, ends_E, M, N, K, E,
                                 g.stride(0), x.stride(0), dw.stride(0), dw.stride(1), E_P2=triton.next_power_of_2(E),
                                 GATHER_G=g_src is not None, SCALE_G=g_scale is not None, GATHER_X=x_src is not None)
    return dw


def usable(x: torch.Tensor) -> bool:
    """Whether the Triton kernels run for x (16-bit on CUDA with Triton; fp32 would run as TF32 there); elsewhere
    the ops run their references."""
    return HAS_TRITON and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def _inner(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("dsv3::gathered_grouped_mm", mutates_args=())
def _gathered_grouped_mm_op(x: torch.Tensor, w: torch.Tensor, ends_E: torch.Tensor, src_M: torch.Tensor | None,
                            scale_M: torch.Tensor | None, w2: torch.Tensor | None, w_kn: bool) -> torch.Tensor:
    if not usable(x):
        return gathered_grouped_mm_reference(x, w, ends_E, src_M, scale_M, w2, w_kn)
    return launch_gathered_mm(_inner(x), _inner(w), ends_E, None if src_M is None else src_M.contiguous(),
                              None if scale_M is None else scale_M.float().contiguous(), _inner(w2), w_kn)


@_gathered_grouped_mm_op.register_fake
def _gathered_grouped_mm_fake(x, w, ends_E, src_M, scale_M, w2, w_kn):
    m = x.shape[0] if src_M is None else src_M.shape[0]
    n = w.shape[2] if w_kn else w.shape[1] + (0 if w2 is None else w2.shape[1])
    return x.new_empty(m, n)


def gathered_grouped_mm(x: torch.Tensor, w_ENK: torch.Tensor, ends_E: torch.Tensor, src_M: torch.Tensor | None = None,
                        scale_M: torch.Tensor | None = None, w2_ENK: torch.Tensor | None = None) -> torch.Tensor:
    """[M, N (+ N2)]: a[r] @ w[e]^T (then @ w2[e]^T) for expert e's rows r, a[r] = x[src[r]] (* scale[r]);
    ``ends_E`` int32 cumulative group ends, ``src_M`` int32. Triton on 16-bit CUDA tensors, else the reference."""
    return _gathered_grouped_mm_op(x, w_ENK, ends_E, src_M, scale_M, w2_ENK, False)


def gathered_grouped_mm_nn(x: torch.Tensor, w_EKN: torch.Tensor, ends_E: torch.Tensor,
                           src_M: torch.Tensor | None = None, scale_M: torch.Tensor | None = None,
                           w2_EKN: torch.Tensor | None = None) -> torch.Tensor:
    """[M, N]: a[r] @ w[e] for weights stored [E, K, N] (an input gradient: w is the forward's weight), a[r] =
    x[src[r]] (* scale[r]); with w2 the reduction continues: a[r, :K1] @ w[e] + a[r, K1:] @ w2[e]."""
    return _gathered_grouped_mm_op(x, w_EKN, ends_E, src_M, scale_M, w2_EKN, True)


@torch.library.custom_op("dsv3::gathered_grouped_wgrad", mutates_args=())
def gathered_grouped_wgrad(g: torch.Tensor, x: torch.Tensor, ends_E: torch.Tensor, x_src: torch.Tensor | None = None,
                           g_src: torch.Tensor | None = None, g_scale: torch.Tensor | None = None) -> torch.Tensor:
    """[E, N, K] in g's dtype: G[rows of e]^T @ X[rows of e] per expert, G[r] = g[g_src[r]] (* g_scale[r]),
    X[r] = x[x_src[r]]: a weight gradient that reads rows by token, so no gathered copy need be kept."""
    if not usable(x):
        return gathered_grouped_wgrad_reference(g, x, ends_E, x_src, g_src, g_scale)
    return launch_gathered_wgrad(_inner(g), _inner(x), ends_E, None if x_src is None else x_src.contiguous(),
                                 None if g_src is None else g_src.contiguous(),
                                 None if g_scale is None else g_scale.float().contiguous())


@gathered_grouped_wgrad.register_fake
def _gathered_grouped_wgrad_fake(g, x, ends_E, x_src=None, g_src=None, g_scale=None):
    return g.new_empty(ends_E.shape[0], g.shape[1], x.shape[1])
