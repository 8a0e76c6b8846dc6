"""The two backward passes over the MoE's token copies, as Triton kernels that read each copy once.

``gather_sum``: dx[t] = sum_k g[rows[t*K + k]], the input gradient of the dispatch gather (``moe._GatherCopies``).
Left to Inductor it fused into the RMSNorm backward that consumes it, and that kernel gathered the K rows twice
(once for the norm's reduction, once for the output): 294 us per `small` layer for 302 MB of copies.

``combine_backward``: for the un-permute + weighted sum (``moe._CombineCopies``), token by token: g[t] read once,
then for each of its K copies dy[rows[t*K + k]] = w[t, k] g[t] and dw[t, k] = <g[t], y[rows[t*K + k]]>. Reading
in expert order instead gathers g K times (K x T x D reads that miss the L2 for 3.2B's 67 MB gradient).

Both are registered as torch custom ops (opaque to Inductor, so it cannot re-fuse them) with the eager torch
expressions as their CPU implementation and reference; ``tests/test_moe_permute_kernels.py`` compares the two.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


def gather_sum_reference(g_MD: torch.Tensor, rows: torch.Tensor, K: int, g2_MD: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """sum_k g[rows[t*K + k]] (+ g2[rows[t*K + k]]) -> [T, D] in g's dtype (the reduction in fp32)."""
    T = rows.numel() // K
    g = g_MD[rows].view(T, K, -1).float()
    if g2_MD is not None:
        g = g + g2_MD[rows].view(T, K, -1).float()
    return g.sum(dim=1).to(g_MD.dtype)


def combine_weight_grad_reference(g_TD: torch.Tensor, y_MD: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """dw [T, K] fp32 of out[t] = sum_k w[t, k] y[rows[t*K + k]]: <g[t], y[rows[t*K + k]]>."""
    T = g_TD.shape[0]
    return (g_TD.float()[:, None, :] * y_MD[rows].view(T, rows.numel() // T, -1).float()).sum(dim=-1)


def combine_backward_reference(g_TD: torch.Tensor, y_MD: torch.Tensor, rows: torch.Tensor, w_TK: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy [M, D] in y's dtype, rows not named in ``rows`` zero; dw [T, K] fp32) of
    out[t] = sum_k w[t, k] y[rows[t*K + k]]."""
    T, K = w_TK.shape
    g = g_TD.float()
    dw = combine_weight_grad_reference(g_TD, y_MD, rows)
    dy = y_MD.new_zeros(y_MD.shape).index_copy(0, rows, (g[:, None, :] * w_TK[..., None]).view(T * K, -1)
                                              .to(y_MD.dtype))
    return dy, dw


if HAS_TRITON:
    @triton.jit
    def _gather_sum_kernel(g_ptr, g2_ptr, rows_ptr, out_ptr, D, K: tl.constexpr, HAS_G2: tl.constexpr,
                           BLOCK_D: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = offs < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(K):
            row = tl.load(rows_ptr + t * K + k).to(tl.int64)
            acc += tl.load(g_ptr + row * D + offs, mask=mask).to(tl.float32)
            if HAS_G2:
                acc += tl.load(g2_ptr + row * D + offs, mask=mask).to(tl.float32)
        tl.store(out_ptr + t * D + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _combine_backward_kernel(g_ptr, y_ptr, rows_ptr, w_ptr, dy_ptr, dw_ptr, D, K: tl.constexpr,
                                 KP: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_DY: tl.constexpr = True):
        # one token per program, its K copies as one [KP, BLOCK_D] tile per step along D (K padded to a power
        # of two), so K row loads are in flight at once (a copy-at-a-time loop measured 225 us against 213 in
        # the `small` step on an H200); g[t] is read once per step, y and dy touched once each
        t = tl.program_id(0).to(tl.int64)
        ks = tl.arange(0, KP)
        kmask = ks < K
        rows = tl.load(rows_ptr + t * K + ks, mask=kmask, other=0).to(tl.int64)
        w = tl.load(w_ptr + t * K + ks, mask=kmask, other=0.0).to(tl.float32)
        acc = tl.zeros([KP, BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            dmask = offs < D
            g = tl.load(g_ptr + t * D + offs, mask=dmask, other=0.0).to(tl.float32)
            m2 = kmask[:, None] & dmask[None, :]
            ptrs = rows[:, None] * D + offs[None, :]
            y = tl.load(y_ptr + ptrs, mask=m2, other=0.0).to(tl.float32)
            if WRITE_DY:
                tl.store(dy_ptr + ptrs, (w[:, None] * g[None, :]).to(dy_ptr.dtype.element_ty), mask=m2)
            acc += g[None, :] * y
        tl.store(dw_ptr + t * K + ks, tl.sum(acc, axis=1), mask=kmask)


def _use_triton(*tensors: torch.Tensor) -> bool:
    return HAS_TRITON and all(t.is_cuda for t in tensors)


@torch.library.custom_op("dsv3::gather_sum", mutates_args=())
def gather_sum(g_MD: torch.Tensor, rows: torch.Tensor, K: int, g2_MD: torch.Tensor | None = None) -> torch.Tensor:
    """dx[t] = sum_k g[rows[t*K + k]] (+ g2[rows[t*K + k]]: a second gradient of the same rows, summed in the same
    pass instead of added as [M, D] tensors first) -> [T, D] in g's dtype, fp32 sums (Triton on CUDA)."""
    if not _use_triton(g_MD, rows):
        return gather_sum_reference(g_MD, rows, K, g2_MD)
    g_MD, rows = g_MD.contiguous(), rows.contiguous()
    g2 = g_MD if g2_MD is None else g2_MD.contiguous()
    T, D = rows.numel() // K, g_MD.shape[1]
    out = g_MD.new_empty(T, D)
    block = min(1024, triton.next_power_of_2(D))
    _gather_sum_kernel[(T, triton.cdiv(D, block))](g_MD, g2, rows, out, D, K=K, HAS_G2=g2_MD is not None,
                                                   BLOCK_D=block)
    return out


@gather_sum.register_fake
def _gather_sum_fake(g_MD, rows, K, g2_MD=None):
    return g_MD.new_empty(rows.numel() // K, g_MD.shape[1])


@torch.library.custom_op("dsv3::combine_backward", mutates_args=())
def combine_backward(g_TD: torch.Tensor, y_MD: torch.Tensor, rows: torch.Tensor, w_TK: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy, dw) of out[t] = sum_k w[t, k] y[rows[t*K + k]] (``combine_backward_reference``; Triton on CUDA)."""
    if not _use_triton(g_TD, y_MD, rows, w_TK):
        return combine_backward_reference(g_TD, y_MD, rows, w_TK)
    # rows not named (padding between expert groups) get a zero gradient; a permutation names them all
    dy = torch.empty_like(y_MD) if y_MD.shape[0] == rows.numel() else torch.zeros_like(y_MD)
    return dy, _launch_combine_backward(g_TD, y_MD, rows, w_TK, dy)


def _launch_combine_backward(g_TD, y_MD, rows, w_TK, dy_MD: torch.Tensor | None) -> torch.Tensor:
    """The Triton kernel: dw [T, K] fp32, and dy into ``dy_MD`` unless it is None (its store compiled out)."""
    g_TD, y_MD, rows = (t.contiguous() for t in (g_TD, y_MD, rows))
    T, K = w_TK.shape
    D = y_MD.shape[1]
    dw = torch.empty(T, K, dtype=torch.float32, device=w_TK.device)
    kp = triton.next_power_of_2(K)
    block = max(64, min(triton.next_power_of_2(D), 4096 // kp))
    _combine_backward_kernel[(T,)](g_TD, y_MD, rows, w_TK.float().contiguous(), y_MD if dy_MD is None else dy_MD,
                                   dw, D, K=K, KP=kp, BLOCK_D=block, WRITE_DY=dy_MD is not None, num_warps=8)
    return dw


@combine_backward.register_fake
def _combine_backward_fake(g_TD, y_MD, rows, w_TK):
    return torch.empty_like(y_MD), torch.empty(w_TK.shape, dtype=torch.float32, device=w_TK.device)


@torch.library.custom_op("dsv3::combine_weight_grad", mutates_args=())
def combine_weight_grad(g_TD: torch.Tensor, y_MD: torch.Tensor, rows: torch.Tensor, w_TK: torch.Tensor
                        ) -> torch.Tensor:
    """Only the routing weights' gradient of the combine (``combine_backward`` without dy): for a backward
    whose expert GEMMs read w * g[token] themselves (``moe._GatheredDownCombine``). Triton on CUDA."""
    if not _use_triton(g_TD, y_MD, rows):
        return combine_weight_grad_reference(g_TD, y_MD, rows)
    return _launch_combine_backward(g_TD, y_MD, rows, w_TK, None)


@combine_weight_grad.register_fake
def _combine_weight_grad_fake(g_TD, y_MD, rows, w_TK):
    return torch.empty(w_TK.shape, dtype=torch.float32, device=w_TK.device)
