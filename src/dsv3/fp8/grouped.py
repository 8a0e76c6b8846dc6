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

GPU paths: with ``aligned=True`` (every group starts at a multiple of 128 rows,
as ``dsv3.model.moe`` lays them out for FP8) and Triton installed, two
one-launch Triton kernels for all experts (``dsv3.fp8.triton_grouped``), no
host sync; otherwise a per-group loop of blockwise ``torch._scaled_mm``
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

from dsv3.fp8 import triton_grouped
from dsv3.fp8.gemm import fp8_gemm_nt
from dsv3.fp8.triton_quant import quantize_tiles, quantize_tiles_axes
from dsv3.fp8.weight_cache import weight_blocks, weight_blocks_transposed

__all__ = ["fp8_grouped_mm", "FP8GroupedMMFunction", "group_bounds", "quantize_tokens_grouped",
           "triton_path_available"]


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
    """Autograd for ``fp8_grouped_mm``. See the module docstring for the recipe.

    ``ws``: one stacked weight [E, N, K], or several [E, N_i, K] run as their concatenation along N (one
    quantization of x, one GEMM); their gradients come back split.
    """

    @staticmethod
    def forward(ctx, x: Tensor, offs: Tensor, pow2_scale: bool, backend: str, fast: bool, *ws: Tensor):
        t, k = x.shape
        for w in ws:
            if w.shape[-1] != k or w.shape[0] != ws[0].shape[0]:
                raise ValueError(f"x [T, {k}] does not match w {tuple(w.shape)} (expected [E, N, {k}])")
        e_count = ws[0].shape[0]
        key = ws[0] if len(ws) == 1 else tuple(ws)
        wq, ws_ = weight_blocks(key, pow2_scale)  # [E, N, K], [E, nb, kb]
        n = wq.shape[1]
        wgrad = any(ctx.needs_input_grad[5:])
        ctx.fast = fast
        if fast:  # one Triton launch for all groups; the group ends stay on the device
            bounds = None
            # x^T tiled along tokens over all rows at once: groups start at multiples of 128, so no tile
            # mixes two groups
            xq, xs, xtq, xts = quantize_tiles_axes(x, True, wgrad, pow2_scale, backend)
            saved = [xtq, xts] if wgrad else []
            y = triton_grouped.grouped_fp8_nt(xq, xs, wq, ws_, offs, out_dtype=x.dtype)
        else:
            xq, xs = quantize_tiles(x, pow2_scale, backend)
            bounds = group_bounds(offs, e_count)
            if bounds and bounds[-1][1] > t:
                raise ValueError(f"offs ends at {bounds[-1][1]} but x has {t} rows")
            y = x.new_zeros(t, n)
            for g, (s, e) in enumerate(bounds):
                if e > s:
                    y[s:e] = fp8_gemm_nt(xq[s:e], xs[s:e], "tile", wq[g], ws_[g], "block",
                                         out_dtype=x.dtype, backend=backend)
            saved = []
            if wgrad:
                for q, sc in quantize_tokens_grouped(x, bounds, pow2_scale, backend):
                    saved += [q, sc]
        ctx.save_for_backward(wq, ws_, offs, *saved)
        ctx.key = key  # the cache key of the transposed copy (references, no data)
        ctx.meta = (bounds, x.shape, x.dtype, [w.dtype for w in ws], [w.shape[1] for w in ws], pow2_scale, backend)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        wq, ws, offs, *xt = ctx.saved_tensors
        bounds, x_shape, x_dtype, w_dtypes, w_rows, pow2_scale, backend = ctx.meta
        e_count, n, k = wq.shape
        dx = dw = None
        wgrad = any(ctx.needs_input_grad[5:])
        if ctx.fast:
            # dy along N (dgrad) and dy^T along tokens (wgrad), as needed
            dyq, dys, dytq, dyts = quantize_tiles_axes(dy, ctx.needs_input_grad[0], wgrad, pow2_scale, backend)
            if ctx.needs_input_grad[0]:
                wtq, wts = weight_blocks_transposed(ctx.key, wq, ws, pow2_scale)
                dx = triton_grouped.grouped_fp8_nt(dyq, dys, wtq, wts, offs, out_dtype=x_dtype)
            if wgrad:
                # joined equal weights (gate, up) come back as separate contiguous gradients: [parts, E, N_i, K]
                parts = len(w_rows) if len(set(w_rows)) == 1 else 1
                dw = triton_grouped.grouped_fp8_wgrad(dytq, dyts, xt[0], xt[1], offs, out_dtype=torch.float32,
                                                      parts=parts)
        else:
            if ctx.needs_input_grad[0]:
                dyq, dys = quantize_tiles(dy, pow2_scale, backend)
                wtq, wts = weight_blocks_transposed(ctx.key, wq, ws, pow2_scale)  # as the fast path
                dx = dy.new_zeros(x_shape, dtype=x_dtype)
                for g, (s, e) in enumerate(bounds):
                    if e > s:
                        dx[s:e] = fp8_gemm_nt(dyq[s:e], dys[s:e], "tile", wtq[g], wts[g], "block",
                                              out_dtype=x_dtype, backend=backend)
            if wgrad:
                dw = torch.zeros(e_count, n, k, dtype=torch.float32, device=dy.device)
                for g, (s, e) in enumerate(bounds):
                    if e > s:
                        dytq, dyts = quantize_tiles(dy[s:e].t(), pow2_scale, backend)
                        xtq, xts = xt[2 * g], xt[2 * g + 1]
                        dw[g] = fp8_gemm_nt(dytq, dyts, "tile", xtq, xts, "tile",
                                            out_dtype=torch.float32, backend=backend)
        dws = [None] * len(w_rows)
        if dw is not None:
            per_weight = dw.unbind(0) if dw.dim() == 4 else dw.split(w_rows, dim=1)
            dws = [part.to(dt) for part, dt in zip(per_weight, w_dtypes)]
        return (dx, None, None, None, None, *dws)


def triton_path_available(x: Tensor, backend: str = "auto") -> bool:
    """Whether ``fp8_grouped_mm(..., aligned=True)`` runs the Triton kernels for ``x``."""
    return backend in ("auto", "triton") and triton_grouped.HAVE_TRITON and x.is_cuda


@torch.compiler.disable  # as dsv3.fp8.linear.fp8_linear: eager inside compiled blocks
def fp8_grouped_mm(
    x: Tensor, w: Tensor | tuple[Tensor, ...], offs: Tensor, pow2_scale: bool = False, backend: str = "auto",
    aligned: bool = False,
) -> Tensor:
    """FP8 grouped ``x @ w[e]^T``: ``x [T, K]`` sorted by expert, ``w [E, N, K]``, ``offs`` int32 [E] ends.

    Returns ``[T, N]`` in ``x.dtype``. Differentiable in ``x`` and ``w``. ``w`` may be a tuple of weights
    [E, N_i, K] with each N_i a multiple of 128: one GEMM against their concatenation, output [T, sum N_i]
    (gate and up projections share one quantization of x). ``aligned=True`` promises that every group starts
    at a multiple of 128 rows (``triton_grouped.GROUP_ALIGN``); on CUDA with Triton that runs the one-launch
    kernels (``backend="triton"`` or ``"auto"``), elsewhere the per-group path, same numbers. Weights are
    quantized once per ``dsv3.fp8.weight_cache.reuse_quantized_weights()`` scope.
    """
    ws = tuple(w) if isinstance(w, (tuple, list)) else (w,)
    if x.dim() != 2 or any(t.dim() != 3 for t in ws):
        raise ValueError(f"expected x [T, K] and w [E, N, K], got {tuple(x.shape)} and "
                         f"{[tuple(t.shape) for t in ws]}")
    if len(ws) > 1 and any(t.shape[1] % 128 for t in ws):
        raise ValueError("weights joined along N need N multiples of 128 (whole 128x128 blocks)")
    if backend == "triton" and not (aligned and triton_path_available(x, backend)):
        raise ValueError("backend='triton' needs aligned=True, Triton and a CUDA input")
    fast = aligned and triton_path_available(x, backend)
    gemm_backend = "auto" if backend == "triton" else backend
    with torch.autocast(x.device.type, enabled=False):  # as fp8_linear: the recipe sets every precision
        return FP8GroupedMMFunction.apply(x, offs, pow2_scale, gemm_backend, fast, *ws)
