"""FP8 grouped GEMM for routed experts (same recipe as ``dsv3.fp8.linear``).

``y[rows of e] = x[rows of e] @ w[e]^T`` for stacked expert weights
``w [E, N, K]`` (``gate_proj``/``up_proj`` are [E, F, D]; ``down_proj`` is
[E, D, F]) and token rows sorted by expert. ``offs`` is int32 [E] of
*cumulative ends*, as ``torch._grouped_mm`` takes it: group e owns rows
``offs[e-1] : offs[e]`` (``offs[-1]`` = 0). Rows past ``offs[-1]`` (padding)
give zero output and zero gradient.

Quantization per GEMM, as in the linear layer:

* fprop: x tiled 1x128 along K (per row, so groups don't matter); each
  expert's weight in its own 128x128 blocks;
* dgrad: dy tiled along N; each ``w[e]^T`` reuses the forward's blocks;
* wgrad: ``dW_e = dy_e^T x_e``, both tiled along tokens *within the group*:
  the first tile of each group starts at the group's first row, so no tile
  mixes two experts' tokens (DeepSeek-V3 pads each expert's tokens to 128).
  ``x^T`` quantized this way is what the forward saves (FP8).

GPU path: a per-group loop of blockwise ``torch._scaled_mm``
(``dsv3.fp8.gemm``). ``torch._scaled_grouped_mm`` cannot run this recipe: in
torch's ``_scaled_grouped_mm_cuda`` (``GroupedBlas.cpp``, torch 2.9-2.13) fp32
scales are accepted only as *rowwise* scales (``_check_scales_fp8_rowwise``:
one scale per row of a [M, K] operand, one per column per expert of a [E, K, N]
one), which is one scale per whole K row, not per 128; the only block-scaled
grouped mode is MXFP8 (1x32 blocks, e8m0 scales, SM100 via MSLK), which H100
lacks. The loop costs one host sync (reading ``offs``) and ~3 launches per
expert; a Triton grouped kernel is the known next step.
CPU path (the reference): dequantize and matmul per group in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsv3.fp8.blocks import BLOCK, TILE, quantize_weight_blocks
from dsv3.fp8.gemm import fp8_gemm_nt
from dsv3.fp8.triton_quant import quantize_tiles

__all__ = ["fp8_grouped_mm", "FP8GroupedMMFunction", "group_bounds", "quantize_tokens_grouped"]


def group_bounds(offs: Tensor, num_groups: int | None = None) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` per group from int32 cumulative ends (one host sync)."""
    ends = [int(v) for v in offs.tolist()]
    if num_groups is not None and len(ends) != num_groups:
        raise ValueError(f"offs has {len(ends)} entries for {num_groups} groups")
    starts = [0] + ends[:-1]
    for s, e in zip(starts, ends):
        if e < s:
            raise ValueError(f"offs must be non-decreasing cumulative ends, got {ends}")
    return list(zip(starts, ends))


def quantize_tokens_grouped(
    x: Tensor, bounds: list[tuple[int, int]], pow2_scale: bool = False, backend: str = "auto"
) -> list[tuple[Tensor, Tensor]]:
    """Per group: ``x[s:e]^T`` [K, T_g] in FP8 tiled 1x128 along tokens, with scales [K, ceil(T_g/128)]."""
    return [quantize_tiles(x[s:e].t(), pow2_scale, backend) for s, e in bounds]


class FP8GroupedMMFunction(torch.autograd.Function):
    """Autograd for ``fp8_grouped_mm``. See the module docstring for the recipe."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, offs: Tensor, pow2_scale: bool, backend: str):
        t, k = x.shape
        e_count, n, k_w = w.shape
        if k_w != k:
            raise ValueError(f"x [T, {k}] does not match w [E, N, {k_w}]")
        bounds = group_bounds(offs, e_count)
        if bounds and bounds[-1][1] > t:
            raise ValueError(f"offs ends at {bounds[-1][1]} but x has {t} rows")
        xq, xs = quantize_tiles(x, pow2_scale, backend)
        wq, ws = quantize_weight_blocks(w, BLOCK, pow2_scale)  # [E, N, K], [E, nb, kb]
        y = x.new_zeros(t, n)
        for g, (s, e) in enumerate(bounds):
            if e > s:
                y[s:e] = fp8_gemm_nt(xq[s:e], xs[s:e], "tile", wq[g], ws[g], "block",
                                     out_dtype=x.dtype, backend=backend)
        saved = []
        if ctx.needs_input_grad[1]:
            for q, sc in quantize_tokens_grouped(x, bounds, pow2_scale, backend):
                saved += [q, sc]
        ctx.save_for_backward(wq, ws, *saved)
        ctx.meta = (bounds, x.shape, x.dtype, w.dtype, pow2_scale, backend)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        wq, ws, *xt = ctx.saved_tensors
        bounds, x_shape, x_dtype, w_dtype, pow2_scale, backend = ctx.meta
        e_count, n, k = wq.shape
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dyq, dys = quantize_tiles(dy, pow2_scale, backend)
            dx = dy.new_zeros(x_shape, dtype=x_dtype)
            for g, (s, e) in enumerate(bounds):
                if e > s:
                    # w[e]^T [K, N]: the forward's bytes and block grid, transposed.
                    wtq, wts = wq[g].t().contiguous(), ws[g].t().contiguous()
                    dx[s:e] = fp8_gemm_nt(dyq[s:e], dys[s:e], "tile", wtq, wts, "block",
                                          out_dtype=x_dtype, backend=backend)
        if ctx.needs_input_grad[1]:
            dw = torch.zeros(e_count, n, k, dtype=torch.float32, device=dy.device)
            for g, (s, e) in enumerate(bounds):
                if e > s:
                    dytq, dyts = quantize_tiles(dy[s:e].t(), pow2_scale, backend)
                    xtq, xts = xt[2 * g], xt[2 * g + 1]
                    dw[g] = fp8_gemm_nt(dytq, dyts, "tile", xtq, xts, "tile",
                                        out_dtype=torch.float32, backend=backend)
            dw = dw.to(w_dtype)
        return dx, dw, None, None, None


@torch.compiler.disable  # as dsv3.fp8.linear.fp8_linear: eager inside compiled blocks
def fp8_grouped_mm(
    x: Tensor, w: Tensor, offs: Tensor, pow2_scale: bool = False, backend: str = "auto"
) -> Tensor:
    """FP8 grouped ``x @ w[e]^T``: ``x [T, K]`` sorted by expert, ``w [E, N, K]``, ``offs`` int32 [E] ends.

    Returns ``[T, N]`` in ``x.dtype``. Differentiable in ``x`` and ``w``.
    """
    if x.dim() != 2 or w.dim() != 3:
        raise ValueError(f"expected x [T, K] and w [E, N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    return FP8GroupedMMFunction.apply(x, w, offs, pow2_scale, backend)
