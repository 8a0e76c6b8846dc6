"""GPU fast path for 1x128 activation quantization (one Triton kernel).

The torch reference (``blocks.quantize_activation_tiles``) takes several passes
over memory (pad, abs, amax, divide, clamp, cast, copy) and, for the
token-axis tiles of ``x.t()``, a strided one. Measured on H100 (torch 2.11) at
M=8192, K=7168, N=2048 the five quantizations of one linear layer's fwd+bwd
took 3.9 ms against 0.72 ms for its three FP8 GEMMs; with this kernel for the
four activation quantizations (the weight's 128x128 one stays torch) they take
0.48 ms. It reads each element once and writes 1 byte plus one fp32 per 128,
from any 2-D strides (so ``x.t()`` needs no copy).

It computes the reference's numbers bit for bit: ``s = amax * fp32(1/448)``,
power-of-two rounding by exponent bits (same result as the reference's frexp),
correctly rounded division (``div_rn``), clamp to +-448, round-to-nearest-even
cast. ``tests/test_fp8_triton.py`` checks bit equality on the GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsv3.fp8.blocks import BLOCK, FP8_DTYPE, TILE, quantize_activation_tiles, quantize_weight_blocks

try:  # Triton is an optional (gpu) extra; the CPU never needs it.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAVE_TRITON = False

# quantize_tiles_axes on CUDA: both axes in one paired launch (True) or two one-axis launches (False). Off until
# the paired kernel has run on a GPU: written and checked under Triton's CPU interpreter on 2026-12-07 (session 18),
# when no device was lent for its GPU test (tests/test_fp8_triton.py::test_gpu_both_axes_in_one_launch_bitwise).
PAIRED_LAUNCH = True

__all__ = ["quantize_tiles", "quantize_tiles_axes", "quantize_activation_tiles_triton", "quantize_blocks",
           "quantize_weight_blocks_triton", "transpose_last2", "HAVE_TRITON"]


if HAVE_TRITON:

    @triton.jit
    def _scale_inv(amax, POW2: tl.constexpr):
        """blocks.compute_scale_inv, bit for bit: amax * fp32(1/448), optionally rounded up to 2^e."""
        s = amax * (1.0 / 448.0)
        if POW2:
            # Next power of two >= s from the fp32 bits: keep the exponent, and
            # bump it by one when any mantissa bit is set.
            bits = s.to(tl.int32, bitcast=True)
            up = (bits & 0x7F800000) + 0x00800000
            bits = tl.where((bits & 0x007FFFFF) != 0, up, bits)
            s = bits.to(tl.float32, bitcast=True)
        s = tl.where(amax > 0, s, 1.0)
        return tl.maximum(s, 1.1754943508222875e-38)  # fp32 tiny, as the reference

    @triton.jit
    def _quant_tiles_kernel(x_ptr, q_ptr, s_ptr, M, K, sxm, sxk, KT,
                            BLOCK_M: tl.constexpr, TILE_K: tl.constexpr, POW2: tl.constexpr):
        _quant_tile_block(x_ptr, q_ptr, s_ptr, M, K, sxm, sxk, KT, tl.program_id(0), tl.program_id(1),
                          BLOCK_M, TILE_K, POW2)

    @triton.jit
    def _quant_tiles_pair_kernel(x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, M, K, sxm, sxk, KT, MT, ROW_BLOCKS, COL_BLOCKS,
                                 BLOCK_M: tl.constexpr, TILE_K: tl.constexpr, POW2: tl.constexpr):
        # x [M, K] tiled along K (q, s) and x^T [K, M] tiled along M (qt, st) in one launch: the first
        # ROW_BLOCKS * KT programs do the first, the rest the second, each program the same block as
        # _quant_tiles_kernel's 2-D grid (its first grid axis fastest), so the numbers are the same bits
        pid = tl.program_id(0)
        n_rows = ROW_BLOCKS * KT
        if pid < n_rows:
            _quant_tile_block(x_ptr, q_ptr, s_ptr, M, K, sxm, sxk, KT, pid % ROW_BLOCKS, pid // ROW_BLOCKS,
                              BLOCK_M, TILE_K, POW2)
        else:
            p = pid - n_rows
            _quant_tile_block(x_ptr, qt_ptr, st_ptr, K, M, sxk, sxm, MT, p % COL_BLOCKS, p // COL_BLOCKS,
                              BLOCK_M, TILE_K, POW2)

    @triton.jit
    def _quant_tile_block(x_ptr, q_ptr, s_ptr, M, K, sxm, sxk, KT, pid_m, pid_k,
                          BLOCK_M: tl.constexpr, TILE_K: tl.constexpr, POW2: tl.constexpr):
        """Rows pid_m*BLOCK_M.. of x [M, K] (any strides), the 1x128 tile pid_k: FP8 into q [M, K], scales into
        s [M, KT]."""
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = pid_k * TILE_K + tl.arange(0, TILE_K)
        mask = (rm[:, None] < M) & (rk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * sxm + rk[None, :].to(tl.int64) * sxk,
                    mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)
        s = _scale_inv(amax, POW2)
        q = tl.math.div_rn(x, s[:, None])
        q = tl.minimum(tl.maximum(q, -448.0), 448.0)
        tl.store(q_ptr + rm[:, None].to(tl.int64) * K + rk[None, :], q.to(tl.float8e4nv), mask=mask)
        tl.store(s_ptr + rm.to(tl.int64) * KT + pid_k, s, mask=rm < M)

    @triton.jit
    def _quant_blocks_kernel(w_ptr, q_ptr, s_ptr, M, N, s_we, s_wm, s_wn, s_qe, s_qm, s_se, s_sm,
                             BLOCK_SIDE: tl.constexpr, POW2: tl.constexpr):
        # one program per 128 x 128 block of matrix e: the same arithmetic as _quant_tiles_kernel, one amax;
        # outputs by their strides (rows contiguous), so a weight can be written into its rows of a joined one
        e = tl.program_id(0)
        i = tl.program_id(1)
        j = tl.program_id(2)
        rm = i * BLOCK_SIDE + tl.arange(0, BLOCK_SIDE)
        rn = j * BLOCK_SIDE + tl.arange(0, BLOCK_SIDE)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        base = e.to(tl.int64) * s_we
        x = tl.load(w_ptr + base + rm[:, None].to(tl.int64) * s_wm + rn[None, :].to(tl.int64) * s_wn,
                    mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
        s = _scale_inv(amax, POW2)
        q = tl.math.div_rn(x, s)
        q = tl.minimum(tl.maximum(q, -448.0), 448.0)
        tl.store(q_ptr + e.to(tl.int64) * s_qe + rm[:, None].to(tl.int64) * s_qm + rn[None, :], q.to(tl.float8e4nv),
                 mask=mask)
        tl.store(s_ptr + e.to(tl.int64) * s_se + i * s_sm + j, s)

    @triton.jit
    def _transpose_kernel(x_ptr, y_ptr, R, C, BLOCK: tl.constexpr):
        # y[e] = x[e]^T for x [E, R, C] -> y [E, C, R], one BLOCK x BLOCK tile per program (bytes moved as uint8)
        e = tl.program_id(0).to(tl.int64)
        rr = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        cc = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
        mask = (rr[:, None] < R) & (cc[None, :] < C)
        x = tl.load(x_ptr + e * R * C + rr[:, None].to(tl.int64) * C + cc[None, :], mask=mask)
        tl.store(y_ptr + e * R * C + cc[None, :].to(tl.int64) * R + rr[:, None], x, mask=mask)


def transpose_last2(q: Tensor) -> Tensor:
    """``q.transpose(-2, -1).contiguous()`` for a 1-byte (FP8) tensor: one Triton tile-transpose kernel on CUDA.

    torch's strided copy of 1-byte elements ran at a fraction of HBM bandwidth: ~10 of these per layer (each
    FP8 weight's W^T for dgrad) took 16 ms of a 328 ms FP8 `small` step on an H100 (2026-12-07 profile).
    """
    if not (HAVE_TRITON and q.is_cuda and q.dim() >= 2 and q.element_size() == 1):
        return q.transpose(-2, -1).contiguous()
    return _transpose_triton(q)


def _transpose_triton(q: Tensor) -> Tensor:
    """The Triton path of ``transpose_last2`` (any device Triton runs on, the CPU interpreter included)."""
    *lead, r, c = q.shape
    x = q.contiguous().view(torch.uint8).reshape(-1, r, c)
    y = torch.empty(x.shape[0], c, r, dtype=torch.uint8, device=q.device)
    if x.numel():
        block = 64
        _transpose_kernel[(x.shape[0], triton.cdiv(r, block), triton.cdiv(c, block))](x, y, r, c, BLOCK=block,
                                                                                      num_warps=4)
    return y.view(q.dtype).reshape(*lead, c, r)


def quantize_activation_tiles_triton(x: Tensor, pow2_scale: bool = False) -> tuple[Tensor, Tensor]:
    """Triton twin of ``blocks.quantize_activation_tiles`` for a 2-D CUDA tensor of any strides."""
    if x.dim() != 2:
        raise ValueError("the Triton quantizer takes 2-D inputs; reshape first")
    m, k = x.shape
    kt = -(-k // TILE)
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(m, kt, dtype=torch.float32, device=x.device)
    if m == 0 or k == 0:
        return q, s
    block_m = 32
    grid = (triton.cdiv(m, block_m), kt)
    _quant_tiles_kernel[grid](x, q, s, m, k, x.stride(0), x.stride(1), kt,
                              BLOCK_M=block_m, TILE_K=TILE, POW2=pow2_scale, num_warps=4)
    return q, s


def quantize_tiles_axes(t2: Tensor, along_cols: bool, along_rows: bool, pow2_scale: bool = False,
                        backend: str = "auto") -> tuple[Tensor | None, ...]:
    """(q, s, qt, st) of a 2-D ``t2``: 1x128 tiles along its last dim (``along_cols``; tiles of ``t2``) and/or
    along its first (``along_rows``; tiles of ``t2.t()``), None for what is not asked.

    Both asked on CUDA with ``PAIRED_LAUNCH``: the two one-axis passes in one launch
    (``_quantize_tiles_pair_triton``, same bits, half the launches' host time); otherwise two launches. A
    kernel that read ``t2`` once and wrote both (its column tiles transposed) measured slower at every shape
    tried (2026-11-26, H100: 0.179 vs 0.156 ms at 8192 x 7168, 0.447 vs 0.395 at 102016 x 1536; the small FP8
    step 323.7 vs 293.9 ms): its transposed FP8 stores ran at half of copy bandwidth, where the one-axis kernel
    on ``t2.t()`` reads strided but writes contiguously.
    """
    q = s = qt = st = None
    if PAIRED_LAUNCH and along_cols and along_rows and _tiles_on_triton(t2, backend):
        return _quantize_tiles_pair_triton(t2, pow2_scale)
    if along_cols:
        q, s = quantize_tiles(t2, pow2_scale, backend)
    if along_rows:
        qt, st = quantize_tiles(t2.t(), pow2_scale, backend)
    return q, s, qt, st


def _quantize_tiles_pair_triton(x: Tensor, pow2_scale: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``quantize_activation_tiles_triton`` of ``x`` and of ``x.t()`` in one launch (the same bits as two): the
    step runs these in pairs, and each launch from Python costs tens of microseconds of host time."""
    m, k = x.shape
    kt, mt = -(-k // TILE), -(-m // TILE)
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(m, kt, dtype=torch.float32, device=x.device)
    qt = torch.empty(k, m, dtype=FP8_DTYPE, device=x.device)
    st = torch.empty(k, mt, dtype=torch.float32, device=x.device)
    if m == 0 or k == 0:
        return q, s, qt, st
    block_m = 32
    row_blocks, col_blocks = triton.cdiv(m, block_m), triton.cdiv(k, block_m)
    _quant_tiles_pair_kernel[(row_blocks * kt + col_blocks * mt,)](
        x, q, s, qt, st, m, k, x.stride(0), x.stride(1), kt, mt, row_blocks, col_blocks,
        BLOCK_M=block_m, TILE_K=TILE, POW2=pow2_scale, num_warps=4)
    return q, s, qt, st


def _tiles_on_triton(x: Tensor, backend: str) -> bool:
    """Whether 1x128 tiles of ``x`` are quantized by the Triton kernels (2-D CUDA input, backend not "reference")."""
    return backend != "reference" and HAVE_TRITON and x.is_cuda and x.dim() == 2


def quantize_tiles(x: Tensor, pow2_scale: bool = False, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """1x128 quantization along the last dim: Triton on CUDA (unless backend is "reference"), else torch."""
    if _tiles_on_triton(x, backend):
        return quantize_activation_tiles_triton(x, pow2_scale)
    return quantize_activation_tiles(x, TILE, pow2_scale)


def quantize_weight_blocks_triton(w: Tensor, pow2_scale: bool = False, num_warps: int = 8,
                                  out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Triton twin of ``blocks.quantize_weight_blocks`` (128x128) for a CUDA [..., M, N] tensor, bit-identical.
    ``out``: (q, s) to write into, [..., M, N] and [..., M/128, N/128] views with contiguous rows (e.g. this
    weight's rows of a joined one)."""
    if w.dim() < 2:
        raise ValueError(f"quantize_weight_blocks expects a matrix, got shape {tuple(w.shape)}")
    *lead, m, n = w.shape
    w3 = w.reshape(-1, m, n)
    e = w3.shape[0]
    mb, nb = -(-m // BLOCK), -(-n // BLOCK)
    if out is None:
        q3 = torch.empty(e, m, n, dtype=FP8_DTYPE, device=w.device)
        s3 = torch.empty(e, mb, nb, dtype=torch.float32, device=w.device)
    else:
        q3, s3 = (t.view(-1, *t.shape[-2:]) for t in out)  # a view (raises rather than copy)
        if q3.shape != (e, m, n) or s3.shape != (e, mb, nb) or q3.stride(-1) != 1 or s3.stride(-1) != 1:
            raise ValueError("out must be (q [..., M, N], s [..., M/128, N/128]) with contiguous rows")
    if e and m and n:
        _quant_blocks_kernel[(e, mb, nb)](w3, q3, s3, m, n, w3.stride(0), w3.stride(1), w3.stride(2),
                                          q3.stride(0), q3.stride(1), s3.stride(0), s3.stride(1),
                                          BLOCK_SIDE=BLOCK, POW2=pow2_scale, num_warps=num_warps)
    if out is not None:
        return out
    return q3.reshape(*lead, m, n), s3.reshape(*lead, mb, nb)


def quantize_blocks(w: Tensor, pow2_scale: bool = False, backend: str = "auto",
                    out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """128x128 weight quantization: Triton on CUDA (unless backend is "reference"), else torch. ``out``: (q, s)
    views to write into (see ``quantize_weight_blocks_triton``), returned."""
    if backend != "reference" and HAVE_TRITON and w.is_cuda:
        return quantize_weight_blocks_triton(w, pow2_scale, out=out)
    q, s = quantize_weight_blocks(w, BLOCK, pow2_scale)
    if out is None:
        return q, s
    out[0].copy_(q)
    out[1].copy_(s)
    return out
