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
per 128, instead of 2 bytes in BF16. The weight's FP8 copy and its scales are
saved too (1 byte per weight element), which avoids quantizing W again.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from dsv3.fp8.blocks import BLOCK, TILE
from dsv3.fp8.gemm import fp8_gemm_nt
from dsv3.fp8.triton_quant import quantize_tiles
from dsv3.fp8.weight_cache import weight_blocks, weight_blocks_transposed

__all__ = ["fp8_linear", "FP8Linear", "FP8LinearFunction"]


class FP8LinearFunction(torch.autograd.Function):
    """``y = x @ W^T (+ b)`` with FP8 fprop, dgrad and wgrad. See the module docstring."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, pow2_scale: bool, backend: str):
        if TILE != BLOCK:
            raise AssertionError("dgrad reuses W's blocks as W^T's: tile and block must match")
        k = x.shape[-1]
        n = weight.shape[0]
        x2 = x.reshape(-1, k)
        xq, xs = quantize_tiles(x2, pow2_scale, backend)
        wq, ws = weight_blocks(weight, pow2_scale)  # once per step inside reuse_quantized_weights()
        y = fp8_gemm_nt(xq, xs, "tile", wq, ws, "block", out_dtype=x.dtype, backend=backend)
        if bias is not None:
            y = y + bias.to(y.dtype)
        needs_wgrad = ctx.needs_input_grad[1]
        if needs_wgrad:
            # x^T tiled along tokens, straight from the high-precision x.
            xtq, xts = quantize_tiles(x2.t(), pow2_scale, backend)
        else:
            xtq = xts = None
        ctx.save_for_backward(xtq, xts, wq, ws)
        ctx.w = weight  # the cache key of W^T's FP8 copy
        ctx.meta = (x.shape, x.dtype, weight.dtype, bias is not None, pow2_scale, backend)
        return y.reshape(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy: Tensor):
        xtq, xts, wq, ws = ctx.saved_tensors
        x_shape, x_dtype, w_dtype, has_bias, pow2_scale, backend = ctx.meta
        n = wq.shape[0]
        dy2 = dy.reshape(-1, n)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dyq, dys = quantize_tiles(dy2, pow2_scale, backend)
            # W^T [K, N] in FP8: same bytes and block grid, transposed.
            wtq, wts = weight_blocks_transposed(ctx.w, wq, ws, pow2_scale)
            dx = fp8_gemm_nt(dyq, dys, "tile", wtq, wts, "block", out_dtype=x_dtype, backend=backend)
            dx = dx.reshape(x_shape)
        if ctx.needs_input_grad[1]:
            dytq, dyts = quantize_tiles(dy2.t(), pow2_scale, backend)
            # fp32 out: the optimizer's gradients are fp32 (design.md section 3).
            dw = fp8_gemm_nt(dytq, dyts, "tile", xtq, xts, "tile", out_dtype=torch.float32, backend=backend)
            dw = dw.to(w_dtype)
        if has_bias and ctx.needs_input_grad[2]:
            db = dy2.float().sum(0)
        return dx, dw, db, None, None


# Kept out of compiled graphs: inductor cannot lower _scaled_mm's blockwise-scale modes (torch 2.11 + H200:
# "Inductor Triton does not support scale_a.shape = [M, K/128]") and its CPU backend fails on the tile
# reshapes of the quantizer. A compiled block runs the rest fused and calls this eagerly (a graph break).
@torch.compiler.disable
def fp8_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    pow2_scale: bool = False,
    backend: str = "auto",
) -> Tensor:
    """FP8 ``F.linear``: ``x [..., K]``, ``weight [N, K]`` -> ``[..., N]`` in ``x.dtype``.

    ``backend`` picks the GEMM (``"auto"``, ``"reference"``, ``"scaled_mm"``;
    see ``dsv3.fp8.gemm.fp8_gemm_nt``).
    """
    # autocast off inside: the recipe fixes every precision itself (the reference GEMM must stay fp32, and
    # CPU autocast cannot even concatenate float8 tensors)
    with torch.autocast(x.device.type, enabled=False):
        return FP8LinearFunction.apply(x, weight, bias, pow2_scale, backend)


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
