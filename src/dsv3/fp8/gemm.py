"""One FP8 GEMM with block scales: ``out = dequant(a) @ dequant(b).T``.

Both operands are FP8 E4M3 and *K-major* ("NT" layout): ``a [M, K]`` and
``b [N, K]``, each contiguous, each with fp32 inverse scales of one of two kinds:

* ``"tile"``  (1x128 along K):  scale ``[rows, ceil(K/128)]``
* ``"block"`` (128x128):        scale ``[ceil(rows/128), ceil(K/128)]``

Two implementations with the same meaning:

* ``reference``: dequantize both to fp32 and ``torch.mm`` in fp32. This is the
  math the GPU kernel computes, up to accumulation precision: cuBLAS applies
  the scales per 128-wide K chunk and adds the chunks in fp32 (DeepSeek-V3's
  "promote every 128 of K"), but inside a chunk Hopper's FP8 tensor cores keep
  only ~14 bits, so the two paths differ by ~1.3e-4 relative (measured on
  H100, torch 2.11: 1.2e-4 to 1.3e-4 for fp32 output, 1.7e-3 for bf16 output,
  which is bf16's own rounding). Runs anywhere; the CPU always uses it.
* ``scaled_mm``: ``torch._scaled_mm`` with blockwise scales (cuBLASLt >= 12.9,
  compute capability 9.x). What torch (2.10-2.13 source, ``ScaledBlas.cpp``,
  ``get_joint_scaling`` / ``is_blockwise_1x128_scaling`` /
  ``is_blockwise_128x128_scaling``) requires of
  ``torch._scaled_mm(mat1 [M,K], mat2 [K,N], scale_a, scale_b, out_dtype=...)``:

  - mat1 row-major, mat2 column-major (``b.t()`` of a contiguous ``b [N, K]``);
    K % 16 == 0 and N % 16 == 0 (mat2's two dims), any M;
  - accepted scale pairs (a, b): (1x128, 128x128), (128x128, 1x128),
    (1x128, 1x128); *not* (128x128, 128x128);
  - 1x128 scale of mat1: shape [M, ceil(K/128)], strides (1, M) ("outer-dim
    major", i.e. the transpose of a contiguous [ceil(K/128), M]);
  - 128x128 scale of mat1: shape [ceil(M/128), ceil(K/128)], contiguous;
  - for mat2 the checks run on ``mat2.t()`` ([N, K]) and ``scale_b.t()``: a
    1x128 ``scale_b`` is [ceil(K/128), N] contiguous; a 128x128 ``scale_b`` is
    [ceil(K/128), ceil(N/128)] with strides (1, ceil(K/128)), i.e. the
    transpose of the contiguous [ceil(N/128), ceil(K/128)] weight scale;
  - measured, not checked by torch 2.11: with a 128x128 operand, ceil(K/128)
    must be a multiple of 4 or cuBLAS reads the scales with a padded leading
    dimension and returns garbage (``_scaled_mm`` below pads K to 512 then).

  The scales passed are the *inverse* scales (dequant multipliers), the same
  convention as ours. When the probe call fails (older torch, other GPUs, no
  cuBLASLt 12.9), ``auto`` falls back to the reference math on the device.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from dsv3.fp8.blocks import BLOCK, TILE, dequantize_activation_tiles, dequantize_weight_blocks

__all__ = ["fp8_gemm_nt", "dequantize_operand", "scaled_mm_blockwise_available", "BACKENDS"]

BACKENDS = ("auto", "reference", "scaled_mm")
_KINDS = ("tile", "block")


def dequantize_operand(q: Tensor, scale_inv: Tensor, kind: str) -> Tensor:
    """fp32 value of an FP8 operand with ``"tile"`` or ``"block"`` scales."""
    if kind == "tile":
        return dequantize_activation_tiles(q, scale_inv, TILE, torch.float32)
    if kind == "block":
        return dequantize_weight_blocks(q, scale_inv, BLOCK, torch.float32)
    raise ValueError(f"scale kind must be one of {_KINDS}, got {kind!r}")


def _reference(a, sa, ka, b, sb, kb, out_dtype):
    return torch.mm(dequantize_operand(a, sa, ka), dequantize_operand(b, sb, kb).t()).to(out_dtype)


def _pad_rows(t: Tensor, rows: int, value: float = 0.0) -> Tensor:
    return t if t.shape[0] == rows else F.pad(t, (0, 0, 0, rows - t.shape[0]), value=value)


def _pad_cols(t: Tensor, cols: int) -> Tensor:
    # F.pad has no float8 kernel everywhere: pad through uint8 (0x00 is +0.0 in E4M3).
    if t.shape[1] == cols:
        return t
    return F.pad(t.contiguous().view(torch.uint8), (0, cols - t.shape[1])).view(t.dtype)


def _pad_rows_fp8(t: Tensor, rows: int) -> Tensor:
    return F.pad(t.contiguous().view(torch.uint8), (0, 0, 0, rows - t.shape[0])).view(t.dtype)


def _scaled_mm(a, sa, ka, b, sb, kb, out_dtype):
    """``torch._scaled_mm`` call with the layouts listed in the module docstring."""
    k = a.shape[1]
    n = b.shape[0]
    # K and N must be multiples of 16. Zero padding adds nothing to the sums and
    # never changes the number of 128-wide scale groups (128 is a multiple of 16).
    kpad = -(-k // 16) * 16
    if "block" in (ka, kb) and -(-k // 128) % 4:
        # Measured on H100, torch 2.11 + cu130: with a 128x128 operand whose
        # ceil(K/128) is not a multiple of 4, torch accepts the scales (it checks
        # stride == ceil(K/128)) but cuBLAS reads them with a leading dimension
        # rounded up to 4 (16 bytes), giving silently wrong results. Pad K to a
        # multiple of 512 (zeros; padded scale groups = 1) so both agree.
        kpad = -(-k // 512) * 512
    n16 = -(-n // 16) * 16
    if kpad != k:
        a, b = _pad_cols(a, kpad), _pad_cols(b, kpad)
        kt = -(-kpad // 128)
        sa = _pad_scale_cols(sa, kt)
        sb = _pad_scale_cols(sb, kt)
    if n16 != n:
        b = _pad_rows_fp8(b, n16)
        if kb == "tile":
            sb = _pad_rows(sb, n16, 1.0)
    m = a.shape[0]
    m16 = -(-m // 16) * 16
    if m16 != m:
        # Measured on H100, torch 2.11: CUBLAS_STATUS_NOT_SUPPORTED for M = 3, 77,
        # 130 (M = 200, 1000 worked): the 1x128 scale's leading dimension is M,
        # presumably needing 16-byte alignment. Zero rows, sliced off after.
        a = _pad_rows_fp8(a, m16)
        sa = _pad_rows(sa, m16 if ka == "tile" else sa.shape[0], 1.0)
    a = a.contiguous()
    scale_a = sa.t().contiguous().t() if ka == "tile" else sa.contiguous()
    scale_b = sb.t().contiguous() if kb == "tile" else sb.contiguous().t()
    out = torch._scaled_mm(a, b.contiguous().t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
    return out[:m, :n] if (n16 != n or m16 != m) else out


def _pad_scale_cols(s: Tensor, cols: int) -> Tensor:
    return s if s.shape[1] == cols else F.pad(s, (0, cols - s.shape[1]), value=1.0)


@functools.lru_cache(maxsize=None)
def scaled_mm_blockwise_available(device_index: int = 0) -> bool:
    """Whether this torch/GPU runs blockwise ``_scaled_mm`` correctly (probed once per device).

    The probe multiplies a [256, 384] by [384, 256]^T problem (several blocks
    in every dim, ceil(K/128) = 3) both ways and compares with the reference,
    so a build that accepts the call but computes something else is caught.
    """
    if not torch.cuda.is_available() or not hasattr(torch, "_scaled_mm"):
        return False
    from dsv3.fp8.blocks import quantize_activation_tiles, quantize_weight_blocks

    dev = torch.device("cuda", device_index)
    if torch.cuda.get_device_capability(dev)[0] != 9:
        # Blockwise 1x128/128x128 is an SM90 cuBLASLt feature in torch <= 2.13.
        return False
    try:
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(256, 384, device=dev, generator=g)
        w = torch.randn(256, 384, device=dev, generator=g)
        xq, xs = quantize_activation_tiles(x)
        wq, ws = quantize_weight_blocks(w)
        got = _scaled_mm(xq, xs, "tile", wq, ws, "block", torch.float32)
        ref = _reference(xq, xs, "tile", wq, ws, "block", torch.float32)
        # Hopper FP8 tensor cores keep ~14 bits inside each 128-wide K chunk: ~1.3e-4.
        return bool(((got - ref).norm() / ref.norm()) < 1e-3)
    except (RuntimeError, NotImplementedError, ValueError, TypeError):
        return False


def fp8_gemm_nt(
    a: Tensor,
    a_scale: Tensor,
    a_kind: str,
    b: Tensor,
    b_scale: Tensor,
    b_kind: str,
    out_dtype: torch.dtype = torch.bfloat16,
    backend: str = "auto",
) -> Tensor:
    """``dequant(a) @ dequant(b).T`` for FP8 ``a [M, K]``, ``b [N, K]`` -> ``[M, N]`` in ``out_dtype``.

    ``backend``: ``"reference"`` (fp32 dequantize + mm), ``"scaled_mm"``
    (``torch._scaled_mm``, raises if unsupported), or ``"auto"`` (scaled_mm on
    CUDA when the probe passes, else reference).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if a_kind not in _KINDS or b_kind not in _KINDS:
        raise ValueError(f"scale kinds must be in {_KINDS}, got {a_kind!r}, {b_kind!r}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"K mismatch: a {tuple(a.shape)} vs b {tuple(b.shape)}")
    use_fast = backend == "scaled_mm" or (
        backend == "auto"
        and a.is_cuda
        and not (a_kind == "block" and b_kind == "block")  # no such cuBLAS mode
        and scaled_mm_blockwise_available(a.device.index or 0)
    )
    if use_fast:
        if a.shape[0] == 0 or b.shape[0] == 0 or a.shape[1] == 0:
            return torch.zeros(a.shape[0], b.shape[0], dtype=out_dtype, device=a.device)
        return _scaled_mm(a, a_scale, a_kind, b, b_scale, b_kind, out_dtype)
    return _reference(a, a_scale, a_kind, b, b_scale, b_kind, out_dtype)
