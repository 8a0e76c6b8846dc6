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
from dsv3.fp8.blocks import FP8_DTYPE, TILE
from dsv3.fp8.gemm import fp8_gemm_nt
from dsv3.fp8.triton_quant import quantize_tiles, quantize_tiles_axes
from dsv3.fp8.weight_cache import weight_blocks, weight_blocks_transposed

__all__ = ["fp8_grouped_mm", "fp8_grouped_mm_op", "FP8GroupedMMFunction", "group_bounds", "quantize_tokens_grouped",
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


def _per_group_nt(aq: Tensor, a_s: Tensor, bq: Tensor, b_s: Tensor, bounds: list[tuple[int, int]],
                  out_dtype: torch.dtype, backend: str) -> Tensor:
    """``dequant(a)[s:e] @ dequant(b[g])^T`` for each group g = (s, e), one blockwise GEMM per group (a tiled
    1x128 along K, b in 128x128 blocks); rows outside every group are zero."""
    y = torch.zeros(aq.shape[0], bq.shape[1], dtype=out_dtype, device=aq.device)
    for g, (s, e) in enumerate(bounds):
        if e > s:
            y[s:e] = fp8_gemm_nt(aq[s:e], a_s[s:e], "tile", bq[g], b_s[g], "block", out_dtype=out_dtype,
                                 backend=backend)
    return y


def _aligned_nt(aq: Tensor, a_s: Tensor, bq: Tensor, b_s: Tensor, offs: Tensor, out_dtype: torch.dtype,
                backend: str) -> Tensor:
    """Grouped ``dequant(a)[rows of e] @ dequant(b[e])^T`` on 128-aligned groups: one Triton launch on CUDA,
    else one blockwise GEMM per group (the CPU reference; reads ``offs`` on the host)."""
    if triton_path_available(aq, backend):
        return triton_grouped.grouped_fp8_nt(aq, a_s, bq, b_s, offs, out_dtype=out_dtype)
    return _per_group_nt(aq, a_s, bq, b_s, group_bounds(offs, bq.shape[0]), out_dtype, backend)


def _aligned_wgrad(dytq: Tensor, dyts: Tensor, xtq: Tensor, xts: Tensor, offs: Tensor, parts: int,
                   backend: str, w_dtype: torch.dtype = torch.float32) -> Tensor:
    """``dW_e = dy_e^T x_e`` ([E, N, K], or [parts, E, N/parts, K]) from both operands tiled along all tokens at
    once; each group starts at a multiple of 128, so its tiles are its own. Accumulated in fp32 and rounded once
    to ``w_dtype`` (the weights' dtype, what autograd hands the optimizer): the Triton kernel stores that dtype
    straight from its fp32 accumulator, where an fp32 result and a cast cost a write and a read-write of the
    whole [E, N, K] (2026-12-07, H100: ~1.5% of the FP8 step with bf16 weights, at `small` and at V3's widths)."""
    if triton_path_available(dytq, backend):
        return triton_grouped.grouped_fp8_wgrad(dytq, dyts, xtq, xts, offs, out_dtype=w_dtype, parts=parts)
    n, k, e_count = dytq.shape[0], xtq.shape[0], offs.numel()
    dw = torch.zeros(e_count, n, k, dtype=torch.float32, device=dytq.device)
    for g, (s, e) in enumerate(group_bounds(offs, e_count)):
        if e > s:
            tiles = slice(s // TILE, -(-e // TILE))
            dw[g] = fp8_gemm_nt(dytq[:, s:e].contiguous(), dyts[:, tiles].contiguous(), "tile",
                                xtq[:, s:e].contiguous(), xts[:, tiles].contiguous(), "tile",
                                out_dtype=torch.float32, backend=backend)
    if parts > 1:
        dw = dw.unflatten(1, (parts, n // parts)).transpose(0, 1).contiguous()
    return dw.to(w_dtype)


def _aligned_forward(x: Tensor, offs: Tensor, wq: Tensor, w_s: Tensor, save_xt: bool, pow2_scale: bool,
                     backend: str) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(y, x^T in FP8 tiled along tokens, its scales) of aligned groups; the last two None unless ``save_xt``.
    x^T is tiled over all rows at once: groups start at multiples of 128, so no tile mixes two groups."""
    xq, xs, xtq, xts = quantize_tiles_axes(x, True, save_xt, pow2_scale, backend)
    return _aligned_nt(xq, xs, wq, w_s, offs, x.dtype, backend), xtq, xts


def _aligned_backward(dy: Tensor, offs: Tensor, xtq: Tensor | None, xts: Tensor | None, key, wq: Tensor,
                      w_s: Tensor, need_dx: bool, need_dw: bool, parts: int, x_dtype: torch.dtype,
                      pow2_scale: bool, backend: str, w_dtype: torch.dtype = torch.float32
                      ) -> tuple[Tensor | None, Tensor | None]:
    """(dx in ``x_dtype``, dW in ``w_dtype``) of aligned groups, each None unless asked: dy tiled along N for
    dgrad (against W^T's blocks, the forward's transposed), dy^T along tokens for wgrad."""
    dyq, dys, dytq, dyts = quantize_tiles_axes(dy, need_dx, need_dw, pow2_scale, backend)
    dx = dw = None
    if need_dx:
        wtq, wts = weight_blocks_transposed(key, wq, w_s, pow2_scale)
        dx = _aligned_nt(dyq, dys, wtq, wts, offs, x_dtype, backend)
    if need_dw:
        dw = _aligned_wgrad(dytq, dyts, xtq, xts, offs, parts, backend, w_dtype)
    return dx, dw


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
        wgrad = any(ctx.needs_input_grad[5:])
        ctx.fast = fast
        if fast:  # one Triton launch for all groups; the group ends stay on the device
            bounds = None
            y, xtq, xts = _aligned_forward(x, offs, wq, ws_, wgrad, pow2_scale, backend)
            saved = [xtq, xts] if wgrad else []
        else:
            xq, xs = quantize_tiles(x, pow2_scale, backend)
            bounds = group_bounds(offs, e_count)
            if bounds and bounds[-1][1] > t:
                raise ValueError(f"offs ends at {bounds[-1][1]} but x has {t} rows")
            y = _per_group_nt(xq, xs, wq, ws_, bounds, x.dtype, backend)
            saved = []
            if wgrad:
                for q, sc in quantize_tokens_grouped(x, bounds, pow2_scale, backend):
                    saved += [q, sc]
        ctx.save_for_backward(wq, ws_, offs, *saved)
        ctx.key = key  # the cache key of the transposed copy (references, no data)
        ctx.meta = (bounds, x.dtype, [w.dtype for w in ws], [w.shape[1] for w in ws], pow2_scale, backend)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        wq, ws, offs, *xt = ctx.saved_tensors
        bounds, x_dtype, w_dtypes, w_rows, pow2_scale, backend = ctx.meta
        e_count, n, k = wq.shape
        dx = dw = None
        wgrad = any(ctx.needs_input_grad[5:])
        if ctx.fast:
            # joined equal weights (gate, up) come back as separate contiguous gradients: [parts, E, N_i, K]
            parts = len(w_rows) if len(set(w_rows)) == 1 else 1
            dx, dw = _aligned_backward(dy, offs, xt[0] if wgrad else None, xt[1] if wgrad else None, ctx.key, wq, ws,
                                       ctx.needs_input_grad[0], wgrad, parts, x_dtype, pow2_scale, backend,
                                       _grad_dtype(*w_dtypes))
        else:
            if ctx.needs_input_grad[0]:
                dyq, dys = quantize_tiles(dy, pow2_scale, backend)
                wtq, wts = weight_blocks_transposed(ctx.key, wq, ws, pow2_scale)  # as the fast path
                dx = _per_group_nt(dyq, dys, wtq, wts, bounds, x_dtype, backend)
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
    gemm_backend = "auto" if backend == "triton" else backend
    if aligned and torch.compiler.is_compiling() and _op_takes(ws):
        # compiled blocks: the custom ops below, one graph node each way (no graph break, so a block's
        # forward and backward are one CUDA graph each under 'reduce-overhead')
        with torch.autocast(x.device.type, enabled=False):
            return fp8_grouped_mm_op(x, ws, offs, pow2_scale, gemm_backend)
    return _fp8_grouped_mm_eager(x, ws, offs, pow2_scale, gemm_backend, aligned and triton_path_available(x, backend))


@torch.compiler.disable  # inside compiled blocks only for what the custom ops do not take (see _op_takes)
def _fp8_grouped_mm_eager(x: Tensor, ws: tuple[Tensor, ...], offs: Tensor, pow2_scale: bool, backend: str,
                          fast: bool) -> Tensor:
    with torch.autocast(x.device.type, enabled=False):  # as fp8_linear: the recipe sets every precision
        return FP8GroupedMMFunction.apply(x, offs, pow2_scale, backend, fast, *ws)


# ---------------------------------------------------------------------------------------- custom ops
# What compiled graphs run for aligned groups: ``dsv3::fp8_grouped_mm`` and its backward, opaque to Inductor
# as ``dsv3::fp8_linear`` is (dsv3.fp8.linear says why). Same math as ``FP8GroupedMMFunction``'s fast path
# (the same helpers); on the CPU the helpers' per-group reference runs inside the op. One weight [E, N, K] or
# two of the same shape (gate and up, joined along N).

def _op_takes(ws: tuple[Tensor, ...]) -> bool:
    return len(ws) == 1 or (len(ws) == 2 and ws[0].shape == ws[1].shape)


def _grad_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype the weight gradients leave the kernels in: the weights' own when they share one (no cast pass
    after), else fp32 (each part cast to its weight's dtype after)."""
    return dtypes[0] if len(set(dtypes)) == 1 else torch.float32


def _joined(w: Tensor, w2: Tensor | None):
    return w if w2 is None else (w, w2)


@torch.library.custom_op("dsv3::fp8_grouped_mm", mutates_args=())
def _fp8_grouped_op(x: Tensor, offs: Tensor, w: Tensor, w2: Tensor | None, pow2_scale: bool, backend: str,
                    save_xt: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(y [T, N] (N = 2 w.shape[1] with ``w2``) in x's dtype, x^T [K, T] in FP8 tiled along tokens, its
    scales [K, ceil(T/128)]) for aligned groups; the last two empty unless ``save_xt``."""
    wq, w_s = weight_blocks(_joined(w, w2), pow2_scale)
    y, xtq, xts = _aligned_forward(x, offs, wq, w_s, save_xt, pow2_scale, backend)
    if not save_xt:
        return y, x.new_empty(0, dtype=FP8_DTYPE), x.new_empty(0, dtype=torch.float32)
    return y, xtq, xts


@_fp8_grouped_op.register_fake
def _(x, offs, w, w2, pow2_scale, backend, save_xt):
    t, k = x.shape
    y = x.new_empty(t, w.shape[1] * (1 if w2 is None else 2))
    if not save_xt:
        return y, x.new_empty(0, dtype=FP8_DTYPE), x.new_empty(0, dtype=torch.float32)
    return y, x.new_empty(k, t, dtype=FP8_DTYPE), x.new_empty(k, -(-t // TILE), dtype=torch.float32)


@torch.library.custom_op("dsv3::fp8_grouped_mm_backward", mutates_args=())
def _fp8_grouped_backward_op(dy: Tensor, offs: Tensor, xtq: Tensor, xts: Tensor, w: Tensor, w2: Tensor | None,
                             pow2_scale: bool, backend: str, x_dtype: torch.dtype, need_dx: bool, need_dw: bool
                             ) -> tuple[Tensor, Tensor]:
    """(dx [T, K] in ``x_dtype``, dW [E, N, K], or [2, E, N, K] with ``w2``, in the weights' dtype (fp32 if
    theirs differ)) of ``dsv3::fp8_grouped_mm``, each empty when not needed; the weights' FP8 blocks come from
    the weight cache."""
    key = _joined(w, w2)
    wq, w_s = weight_blocks(key, pow2_scale)
    w_dtype = _grad_dtype(*(t.dtype for t in (w, w2) if t is not None))
    dx, dw = _aligned_backward(dy, offs, xtq, xts, key, wq, w_s, need_dx, need_dw, 1 if w2 is None else 2,
                               x_dtype, pow2_scale, backend, w_dtype)
    return (dx if need_dx else dy.new_empty(0, dtype=x_dtype),
            dw if need_dw else dy.new_empty(0, dtype=w_dtype))


@_fp8_grouped_backward_op.register_fake
def _(dy, offs, xtq, xts, w, w2, pow2_scale, backend, x_dtype, need_dx, need_dw):
    e, n, k = w.shape
    dx = dy.new_empty(dy.shape[0], k, dtype=x_dtype) if need_dx else dy.new_empty(0, dtype=x_dtype)
    shape = (e, n, k) if w2 is None else (2, e, n, k)
    w_dtype = _grad_dtype(*(t.dtype for t in (w, w2) if t is not None))
    dw = dy.new_empty(shape, dtype=w_dtype) if need_dw else dy.new_empty(0, dtype=w_dtype)
    return dx, dw


def _fp8_grouped_setup(ctx, inputs, output):
    x, offs, w, w2, pow2_scale, backend, save_xt = inputs
    _, xtq, xts = output
    ctx.save_for_backward(offs, xtq, xts, w, w2)
    ctx.meta = (pow2_scale, backend, x.dtype)
    ctx.set_materialize_grads(False)  # x^T's copy and scales are outputs only to be saved (as fp8_linear)


def _fp8_grouped_grad(ctx, dy, _dxtq, _dxts):
    offs, xtq, xts, w, w2 = ctx.saved_tensors
    pow2_scale, backend, x_dtype = ctx.meta
    need_dx = ctx.needs_input_grad[0]
    need_dw = ctx.needs_input_grad[2] or (w2 is not None and ctx.needs_input_grad[3])
    if dy is None:
        return None, None, None, None, None, None, None
    dx, dw = torch.ops.dsv3.fp8_grouped_mm_backward(dy.contiguous(), offs, xtq, xts, w, w2, pow2_scale, backend,
                                                    x_dtype, need_dx, need_dw)
    dw1 = dw2 = None
    if need_dw:
        dw1, dw2 = (dw.to(w.dtype), None) if w2 is None else (dw[0].to(w.dtype), dw[1].to(w2.dtype))
    return (dx if need_dx else None), None, dw1, dw2, None, None, None


torch.library.register_autograd("dsv3::fp8_grouped_mm", _fp8_grouped_grad, setup_context=_fp8_grouped_setup)


def fp8_grouped_mm_op(x: Tensor, w: Tensor | tuple[Tensor, ...], offs: Tensor, pow2_scale: bool = False,
                      backend: str = "auto") -> Tensor:
    """``fp8_grouped_mm(..., aligned=True)`` through the ``dsv3::fp8_grouped_mm`` custom ops (what compiled
    graphs run), in any mode: one weight, or two of the same shape joined along N."""
    ws = tuple(w) if isinstance(w, (tuple, list)) else (w,)
    if not _op_takes(ws):
        raise ValueError(f"the custom op takes one weight or two of one shape, got {[tuple(t.shape) for t in ws]}")
    w2 = ws[1] if len(ws) == 2 else None
    save_xt = torch.is_grad_enabled() and any(t.requires_grad for t in ws)
    y, _, _ = torch.ops.dsv3.fp8_grouped_mm(x.contiguous(), offs, ws[0], w2, pow2_scale, backend, save_xt)
    return y
