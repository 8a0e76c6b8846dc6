"""FP8 linear layer with DeepSeek-V3's fine-grained recipe.

All three GEMMs of a linear layer run on FP8 E4M3 operands with fp32 block
scales and fp32 accumulation (see ``dsv3.fp8.gemm``):

====================  ==========================  ============================
GEMM                  left operand (1x128 tiles)  right operand
====================  ==========================  ============================
fprop  y  = x W^T     x   [T, K], tiles along K   W   [N, K], 128x128 blocks
dgrad  dx = dy W      dy  [T, N], tiles along N   W^T [K, N], 128x128 blocks
wgrad  dW = dy^T x    dy^T [N, T], tiles along T  x^T [K, T], tiles along T
====================  ==========================  ============================

dgrad reuses the forward's weight quantization: a 128x128 block grid is
symmetric under transposition, so ``W^T`` in FP8 is the transposed bytes with
the transposed scale grid (no second rounding).

wgrad reduces over tokens, so both of its operands are tiled along the token
axis. The forward therefore quantizes x twice from the same high-precision
values, along K (for fprop) and along T (for wgrad), and saves only the latter,
in FP8: the activation kept for backward costs 1 byte per element plus one fp32
per 128, instead of 2 bytes in BF16. The weight is saved as itself; its FP8
blocks come from ``dsv3.fp8.weight_cache`` (made once per optimizer step inside
the trainer's scope, re-made in backward outside one).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from dsv3.fp8.blocks import BLOCK, FP8_DTYPE, TILE
from dsv3.fp8.gemm import fp8_gemm_nt
from dsv3.fp8.triton_quant import quantize_tiles_axes
from dsv3.fp8.weight_cache import weight_blocks, weight_blocks_transposed

__all__ = ["fp8_linear", "fp8_linear_op", "FP8Linear", "FP8LinearFunction"]


def _fprop(x2: Tensor, weight: Tensor, pow2_scale: bool, backend: str, xq: Tensor, xs: Tensor) -> Tensor:
    """y = x2 W^T in x2's dtype: x tiled 1x128 along K (``xq``, ``xs``), W's blocks from the weight cache."""
    if TILE != BLOCK:
        raise AssertionError("dgrad reuses W's blocks as W^T's: tile and block must match")
    wq, ws = weight_blocks(weight, pow2_scale)  # once per step inside reuse_quantized_weights()
    return fp8_gemm_nt(xq, xs, "tile", wq, ws, "block", out_dtype=x2.dtype, backend=backend)


def _dgrad(dyq: Tensor, dys: Tensor, weight: Tensor, pow2_scale: bool, backend: str, x_dtype: torch.dtype) -> Tensor:
    """dx = dy W: dy tiled along N (``dyq``, ``dys``), W^T [K, N] in FP8 as the same bytes and block grid as
    the forward's W, transposed (both from the weight cache)."""
    wq, ws = weight_blocks(weight, pow2_scale)
    wtq, wts = weight_blocks_transposed(weight, wq, ws, pow2_scale)
    return fp8_gemm_nt(dyq, dys, "tile", wtq, wts, "block", out_dtype=x_dtype, backend=backend)


def _wgrad(dytq: Tensor, dyts: Tensor, xtq: Tensor, xts: Tensor, backend: str, w_dtype: torch.dtype) -> Tensor:
    """dW = dy^T x, both tiled along tokens (``dytq`` is dy^T [N, T]); fp32 out (the optimizer's gradients are
    fp32, design.md section 3), then the weight's dtype."""
    return fp8_gemm_nt(dytq, dyts, "tile", xtq, xts, "tile", out_dtype=torch.float32, backend=backend).to(w_dtype)


class FP8LinearFunction(torch.autograd.Function):
    """``y = x @ W^T (+ b)`` with FP8 fprop, dgrad and wgrad. See the module docstring."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, pow2_scale: bool, backend: str):
        k = x.shape[-1]
        n = weight.shape[0]
        x2 = x.reshape(-1, k)
        # x tiled along K for fprop and, for wgrad, x^T tiled along tokens, both from the high-precision x
        xq, xs, xtq, xts = quantize_tiles_axes(x2, True, ctx.needs_input_grad[1], pow2_scale, backend)
        y = _fprop(x2, weight, pow2_scale, backend, xq, xs)
        if bias is not None:
            y = y + bias.to(y.dtype)
        # the weight itself, not its FP8 copy: backward takes the blocks from the per-step weight cache (as
        # the custom op below does), so nothing weight-sized is kept per micro-batch
        ctx.save_for_backward(xtq, xts, weight)
        ctx.meta = (x.shape, x.dtype, weight.dtype, bias is not None, pow2_scale, backend)
        return y.reshape(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy: Tensor):
        xtq, xts, weight = ctx.saved_tensors
        x_shape, x_dtype, w_dtype, has_bias, pow2_scale, backend = ctx.meta
        dy2 = dy.reshape(-1, weight.shape[0])
        dx = dw = db = None
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dyq, dys, dytq, dyts = quantize_tiles_axes(dy2, need_dx, need_dw, pow2_scale, backend)
        if need_dx:
            dx = _dgrad(dyq, dys, weight, pow2_scale, backend, x_dtype).reshape(x_shape)
        if need_dw:
            dw = _wgrad(dytq, dyts, xtq, xts, backend, w_dtype)
        if has_bias and ctx.needs_input_grad[2]:
            db = dy2.float().sum(0)
        return dx, dw, db, None, None


# Inside compiled blocks the FP8 linear is one opaque custom op per direction (``dsv3::fp8_linear`` and
# ``dsv3::fp8_linear_backward``): Inductor cannot lower _scaled_mm's blockwise-scale modes (torch 2.11 + H200:
# "Inductor Triton does not support scale_a.shape = [M, K/128]") and its CPU backend fails on the tile reshapes
# of the quantizer, so it must not see inside; as custom ops they stay in the block's graph (the norms, RoPE and
# SwiGLU around them keep fusing), where ``torch.compiler.disable`` had cut the graph at every FP8 linear.
# ``FP8LinearFunction`` above is the same math as an autograd.Function (the reference the tests compare with).

@torch.library.custom_op("dsv3::fp8_linear", mutates_args=())
def _fp8_linear_op(x2: Tensor, weight: Tensor, pow2_scale: bool, backend: str, save_xt: bool
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """(y [M, N] in x's dtype, x^T [K, M] in FP8 tiled along tokens, its scales) for x2 [M, K] and weight
    [N, K]; the last two are empty unless ``save_xt`` (the weight gradient will be needed)."""
    xq, xs, xtq, xts = quantize_tiles_axes(x2, True, save_xt, pow2_scale, backend)
    y = _fprop(x2, weight, pow2_scale, backend, xq, xs)
    if not save_xt:
        return y, x2.new_empty(0, dtype=FP8_DTYPE), x2.new_empty(0, dtype=torch.float32)
    return y, xtq, xts


@_fp8_linear_op.register_fake
def _(x2, weight, pow2_scale, backend, save_xt):
    m, k = x2.shape
    y = x2.new_empty(m, weight.shape[0])
    if not save_xt:
        return y, x2.new_empty(0, dtype=FP8_DTYPE), x2.new_empty(0, dtype=torch.float32)
    return y, x2.new_empty(k, m, dtype=FP8_DTYPE), x2.new_empty(k, -(-m // TILE), dtype=torch.float32)


@torch.library.custom_op("dsv3::fp8_linear_backward", mutates_args=())
def _fp8_linear_backward_op(dy2: Tensor, xtq: Tensor, xts: Tensor, weight: Tensor, pow2_scale: bool, backend: str,
                            x_dtype: torch.dtype, need_dx: bool, need_dw: bool) -> tuple[Tensor, Tensor]:
    """(dx [M, K] in ``x_dtype``, dW [N, K] in the weight's dtype) of ``dsv3::fp8_linear``, each empty when
    not needed; W's FP8 blocks come from the weight cache (computed once per optimizer step in its scope)."""
    dx = dy2.new_empty(0, dtype=x_dtype)
    dw = weight.new_empty(0)
    dyq, dys, dytq, dyts = quantize_tiles_axes(dy2, need_dx, need_dw, pow2_scale, backend)
    if need_dx:
        dx = _dgrad(dyq, dys, weight, pow2_scale, backend, x_dtype)
    if need_dw:
        dw = _wgrad(dytq, dyts, xtq, xts, backend, weight.dtype)
    return dx, dw


@_fp8_linear_backward_op.register_fake
def _(dy2, xtq, xts, weight, pow2_scale, backend, x_dtype, need_dx, need_dw):
    m = dy2.shape[0]
    n, k = weight.shape
    dx = dy2.new_empty(m, k, dtype=x_dtype) if need_dx else dy2.new_empty(0, dtype=x_dtype)
    dw = weight.new_empty(n, k) if need_dw else weight.new_empty(0)
    return dx, dw


def _fp8_linear_setup(ctx, inputs, output):
    x2, weight, pow2_scale, backend, save_xt = inputs
    _, xtq, xts = output
    ctx.save_for_backward(xtq, xts, weight)
    ctx.meta = (pow2_scale, backend, x2.dtype)
    # x^T's FP8 copy and scales are outputs only to be saved; without this, autograd would fill zero
    # "gradients" for them (a [K, M] memset per call, seen in the profile of benchmarks/fp8_linear.py)
    ctx.set_materialize_grads(False)


def _fp8_linear_grad(ctx, dy2, _dxtq, _dxts):
    xtq, xts, weight = ctx.saved_tensors
    pow2_scale, backend, x_dtype = ctx.meta
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw = torch.ops.dsv3.fp8_linear_backward(dy2.contiguous(), xtq, xts, weight, pow2_scale, backend, x_dtype,
                                                need_dx, need_dw)
    return (dx if need_dx else None), (dw if need_dw else None), None, None, None


torch.library.register_autograd("dsv3::fp8_linear", _fp8_linear_grad, setup_context=_fp8_linear_setup)


def fp8_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    pow2_scale: bool = False,
    backend: str = "auto",
) -> Tensor:
    """FP8 ``F.linear``: ``x [..., K]``, ``weight [N, K]`` -> ``[..., N]`` in ``x.dtype``.

    ``backend`` picks the GEMM (``"auto"``, ``"reference"``, ``"scaled_mm"``;
    see ``dsv3.fp8.gemm.fp8_gemm_nt``). Under torch.compile it runs as the custom ops above (one graph node);
    eagerly as ``FP8LinearFunction`` (same numbers).
    """
    # autocast off inside: the recipe fixes every precision itself (the reference GEMM must stay fp32, and
    # CPU autocast cannot even concatenate float8 tensors)
    with torch.autocast(x.device.type, enabled=False):
        if not torch.compiler.is_compiling():
            # Eager: the autograd.Function, the same math bit for bit with far less host time per call than
            # the custom op's Python autograd wrapper (2026-11-26, H100, 8192x7168x2048: ~0.7 ms of host time
            # per forward + backward through the custom op, more than the layer's 0.86 ms of GPU time)
            return FP8LinearFunction.apply(x, weight, bias, pow2_scale, backend)
        return fp8_linear_op(x, weight, bias, pow2_scale, backend)


def fp8_linear_op(x: Tensor, weight: Tensor, bias: Tensor | None = None, pow2_scale: bool = False,
                  backend: str = "auto") -> Tensor:
    """``fp8_linear`` through the ``dsv3::fp8_linear`` custom ops (what compiled graphs run), in any mode."""
    k = x.shape[-1]
    save_xt = torch.is_grad_enabled() and weight.requires_grad
    y, _, _ = torch.ops.dsv3.fp8_linear(x.reshape(-1, k).contiguous(), weight, pow2_scale, backend, save_xt)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])


class FP8Linear(nn.Linear):
    """``nn.Linear`` whose matmuls run in FP8 (parameters stay as they are).

    The weight keeps its dtype and name (``weight``, ``bias``): state dicts and
    optimizers see exactly what an ``nn.Linear`` has. Only the compute changes.
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None,
                 pow2_scale: bool = False, backend: str = "auto"):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.pow2_scale = pow2_scale
        self.backend = backend

    @classmethod
    def from_linear(cls, linear: nn.Linear, pow2_scale: bool = False, backend: str = "auto") -> "FP8Linear":
        """An FP8Linear sharing ``linear``'s Parameter objects (no copy, same identity)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  device="meta", pow2_scale=pow2_scale, backend=backend)
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        # The output takes x's dtype (bf16 activations with fp32 master weights -> bf16).
        return fp8_linear(x, self.weight, self.bias, self.pow2_scale, self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8=e4m3 1x{TILE}/{BLOCK}x{BLOCK}, pow2_scale={self.pow2_scale}"
