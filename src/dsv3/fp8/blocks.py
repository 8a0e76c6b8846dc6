"""Block quantization to FP8 E4M3 with fp32 scales (the DeepSeek-V3 recipe).

Two granularities, both computed online from the current values (no history):

* activations: 1x128 *tiles*, one scale per row per 128 consecutive entries of
  the last dim (``quantize_activation_tiles``);
* weights: 128x128 *blocks*, one scale per 128x128 square
  (``quantize_weight_blocks``).

Scale convention (DeepSeek's released ``weight_scale_inv``): we store the
*inverse* scale ``s`` so that dequantization is a multiply,

    x ~= x_fp8.float() * s,        s = amax(block) / 448.

Ragged edges are padded logically: a shape [M, N] has ceil(M/b) x ceil(N/b)
blocks, the last ones covering fewer elements; padding is never stored.

Error bound (tested in tests/test_fp8_blocks.py). E4M3 has 3 explicit mantissa
bits, round-to-nearest-even, normal range down to 2^-6 and subnormal spacing
2^-9. In the scaled domain q = x / s (|q| <= 448) the cast error is at most half
an ulp: <= 2^-4 |q| for normal q, <= 2^-10 for subnormal q. Multiplying back by
s gives, per element,

    |x - dequant(quant(x))| <= max(2^-4 |x|, 2^-10 s)  <=  2^-4 * amax(block)

(the last step because s = amax/448 makes 2^-10 s far below 2^-4 amax). The
fp32 division x / s adds a relative 2^-24 that the tests absorb in a 1e-6 slack.

These torch functions are the *reference* path: exact, device-agnostic, and
what the CPU uses. A GPU fast path may replace them only behind a parity test.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dsv3.kernels.casting import cast_result

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3FN value
_INV_FP8_MAX = 1.0 / FP8_MAX  # rounded to fp32 when multiplied with an fp32 tensor
TILE = 128
BLOCK = 128

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "TILE",
    "BLOCK",
    "compute_scale_inv",
    "quantize_weight_blocks",
    "dequantize_weight_blocks",
    "quantize_activation_tiles",
    "dequantize_activation_tiles",
    "is_power_of_two",
]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def compute_scale_inv(amax: Tensor, pow2_scale: bool = False) -> Tensor:
    """Inverse scales ``s`` (fp32) from per-block absolute maxima.

    ``s = amax * fp32(1/448)`` maps the block maximum onto the E4M3 maximum
    (to within an fp32 ulp; the cast clamps at 448). With
    ``pow2_scale`` the scale is rounded *up* to a power of two, so no value can
    overflow and scaling is exact in binary (a pure exponent shift: the only
    rounding is the cast itself). All-zero blocks get ``s = 1`` rather than 0,
    so ``x / s`` never computes 0/0 = NaN.
    """
    amax = amax.float()
    # Multiply by the fp32 reciprocal instead of dividing by 448: CUDA turns a
    # division by a Python scalar into this very multiplication, CPU does not,
    # and the two would differ in the last bit. One correctly rounded fp32
    # multiply gives bit-identical scales (and FP8 values) on every device.
    s = amax * _INV_FP8_MAX
    if pow2_scale:
        # Round up to 2^e with frexp (exact; log2/ceil can misround near powers
        # of two on some backends). s = m * 2^e, m in [0.5, 1): 2^e >= s, and
        # s itself when m == 0.5.
        mant, expo = torch.frexp(s)
        up = torch.ldexp(torch.ones_like(s), expo)
        s = torch.where(mant == 0.5, s, up)
    # amax == 0: any scale works, 1 is tidy (and avoids 0/0 = NaN).
    s = torch.where(amax > 0, s, torch.ones_like(s))
    # A block whose amax is a tiny subnormal could give s == 0 after the multiply.
    return s.clamp_min(torch.finfo(torch.float32).tiny)


def _cast_fp8(q: Tensor) -> Tensor:
    # |q| <= 448 up to one fp32 rounding of the division; clamp so no backend
    # can turn 448.00003 into NaN (E4M3FN has no inf and some casts don't saturate).
    return q.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_weight_blocks(
    w: Tensor, block: int = BLOCK, pow2_scale: bool = False
) -> tuple[Tensor, Tensor]:
    """Quantize a weight [M, N] in block x block squares.

    Returns ``(w_fp8 [M, N] float8_e4m3fn, scale_inv [ceil(M/b), ceil(N/b)] fp32)``
    with ``W ~= w_fp8.float() * scale_inv[i // b, j // b]``. Leading batch dims
    are allowed (stacked experts ``[E, M, N]`` -> scales ``[E, ceil(M/b), ceil(N/b)]``),
    each matrix blocked on its own.
    """
    if w.dim() < 2:
        raise ValueError(f"quantize_weight_blocks expects a matrix, got shape {tuple(w.shape)}")
    *lead, m, n = w.shape
    mb, nb = _cdiv(m, block), _cdiv(n, block)
    wf = w.float()
    # Zero padding cannot raise a block's amax, so padded blocks get the scale
    # of their real entries only.
    wp = F.pad(wf, (0, nb * block - n, 0, mb * block - m))
    blocks = wp.reshape(*lead, mb, block, nb, block)
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., mb, nb]
    s = compute_scale_inv(amax, pow2_scale)
    q = blocks / s.unsqueeze(-1).unsqueeze(-3)
    w_fp8 = _cast_fp8(q).reshape(*lead, mb * block, nb * block)[..., :m, :n].contiguous()
    return w_fp8, s


def dequantize_weight_blocks(
    w_fp8: Tensor, scale_inv: Tensor, block: int = BLOCK, dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """``W[i, j] = w_fp8[i, j].float() * scale_inv[i // b, j // b]`` (fp32 math, then ``dtype``).

    Leading batch dims are allowed, as in ``quantize_weight_blocks``.
    """
    m, n = w_fp8.shape[-2:]
    s = scale_inv.float().repeat_interleave(block, -2)[..., :m, :]
    s = s.repeat_interleave(block, -1)[..., :n]
    return (w_fp8.float() * s).to(dtype)


def quantize_activation_tiles(
    x: Tensor, tile: int = TILE, pow2_scale: bool = False
) -> tuple[Tensor, Tensor]:
    """Quantize ``x [..., K]`` in 1 x tile tiles along the last dim.

    Returns ``(x_fp8 [..., K], scale_inv [..., ceil(K/tile)] fp32)`` with
    ``x[..., k] ~= x_fp8[..., k].float() * scale_inv[..., k // tile]``.
    To tile along another axis (the token axis for weight gradients), move
    that axis last first: ``quantize_activation_tiles(x.t())``.
    """
    k = x.shape[-1]
    kt = _cdiv(k, tile)
    xf = x.float()
    xp = F.pad(xf, (0, kt * tile - k)) if kt * tile != k else xf
    tiles = xp.reshape(*x.shape[:-1], kt, tile)
    amax = tiles.abs().amax(dim=-1)  # [..., kt]
    s = compute_scale_inv(amax, pow2_scale)
    q = tiles / s.unsqueeze(-1)
    x_fp8 = _cast_fp8(q).reshape(*x.shape[:-1], kt * tile)[..., :k].contiguous()
    return x_fp8, s


def dequantize_activation_tiles(
    x_fp8: Tensor, scale_inv: Tensor, tile: int = TILE, dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """``x[..., k] = x_fp8[..., k].float() * scale_inv[..., k // tile]`` (fp32 math, then ``dtype``)."""
    k = x_fp8.shape[-1]
    s = scale_inv.float().repeat_interleave(tile, dim=-1)[..., :k]
    return cast_result(x_fp8.float() * s, dtype)


def is_power_of_two(t: Tensor) -> bool:
    """True if every entry of a positive fp32 tensor is an exact power of two."""
    mant, _ = torch.frexp(t.float())
    return bool(((mant == 0.5) & (t > 0)).all())


# The bound stated in the module docstring, as numbers the tests import.
E4M3_REL_HALF_ULP = 2.0**-4  # 3 mantissa bits -> half ulp = 2^-4 of the leading power of two
E4M3_SUBNORMAL_HALF_SPACING = 2.0**-10  # subnormal spacing is 2^-9
