"""Triton grouped FP8 GEMMs with DeepSeek-V3's block scales, for the routed experts (GPU fast path).

``torch._scaled_grouped_mm`` takes only rowwise fp32 scales on Hopper (see ``dsv3.fp8.grouped``), and a
loop of blockwise ``torch._scaled_mm`` calls costs a host sync plus three launches per expert. These two
kernels run every expert in one launch each, reading the group boundaries on the device:

* ``grouped_fp8_nt``: ``out[rows of e] = A[rows of e] @ B[e]^T``. A [M, K] FP8 with 1x128 tile scales along K,
  B [E, N, K] FP8 with 128x128 block scales (fprop with ``w``, dgrad with ``w^T`` stored K-major).
* ``grouped_fp8_wgrad``: ``out[e] = A_e @ B_e^T`` reducing over the tokens of group e, with A = dy^T [N, M] and
  B = x^T [K, M] FP8, both with 1x128 tile scales along the token axis.

Groups must start at multiples of 128 rows (``GROUP_ALIGN``): ``dsv3.model.moe`` pads each expert's rows with
zero rows when the FP8 recipe is on, as DeepSeek-V3 does. Then no 128-row tile mixes two experts, a token-axis
quantization tile never straddles two groups, and the tile -> expert map is a count of group ends.

Each GEMM has two kernels with the same arithmetic: tiles loaded through TMA tensor descriptors (Hopper and
newer, the default where operands are 16-byte aligned) or through pointers (any GPU; ``KERNELS`` picks). The
row-tiled kernel launches the column tiles of one row tile side by side (``N_FASTEST``), so a row tile of A is read
from HBM once and shared through L2. Against the first kernels (pointer loads, row tiles launched first) that is
1.14-1.22x on an H100 at `small`'s and V3's expert shapes (``benchmarks/fp8_grouped.py --variants``, 2026-12-07).

Precision as DeepSeek-V3 section 3.3.2: each 128-wide slice of the reduction is one tensor-core ``dot`` whose
result is scaled and added into an fp32 accumulator (promotion every 128 elements, not at the end), so the
numbers are those of ``dsv3.fp8.gemm``'s reference (dequantize, fp32 matmul) up to the tensor cores' own
rounding inside a slice. ``tests/test_fp8_grouped.py`` compares both on the GPU, and every kernel variant under
Triton's CPU interpreter.
"""
from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

try:  # Triton is an optional (gpu) extra
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAVE_TRITON = False
try:  # host-side tensor descriptors (Triton >= 3.4): the TMA kernels
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the install
    TensorDescriptor = None

__all__ = ["GROUP_ALIGN", "HAVE_TRITON", "KERNELS", "grouped_fp8_nt", "grouped_fp8_wgrad", "kernel_choice", "tma_ok"]

# Which kernels run: "auto" (TMA where the device and the shapes allow it, else pointer loads), "tma" or
# "pointer"; and the launch order of the row-tiled kernel's tiles. Module settings so that benchmarks/fp8_grouped.py
# can time each against the others in one run; the numbers are the same (tests/test_fp8_grouped.py checks each
# against the reference).
KERNELS = "auto"
N_FASTEST = True
# TMA kernels: promote each 128-wide slice's product into the fp32 accumulator right after its dot (False), or one
# slice later, after the next slice's dot has been issued (True), so the tensor cores can run while the previous
# product is scaled and added. The same sums in the same order; an experiment (benchmarks/fp8_grouped.py
# --variants tma_defer), off until it is timed on a GPU.
DEFER_PROMOTION = False

GROUP_ALIGN = 128  # rows per group are padded to this; equals the quantization tile


def _configs(name: str, choices, pre_hook=None) -> list:
    """Autotuning candidates: (tile width, pipeline stages, warps)."""
    if not HAVE_TRITON:
        return []
    return [triton.Config({name: bn}, num_stages=st, num_warps=wp, pre_hook=pre_hook) for bn, st, wp in choices]


# measured on H200 (torch 2.11, triton 3.6) at the small preset's expert shapes: 128 x 128, 3-4 stages, 8 warps
# wins the row-tiled GEMM; the token-reduction GEMM also tries narrower tiles
_NT_CHOICES = [(128, 3, 8), (128, 4, 8), (256, 3, 8), (128, 3, 4)]
_WGRAD_CHOICES = [(128, 3, 8), (128, 4, 8), (64, 4, 4), (256, 3, 8), (128, 3, 4)]
# the TMA kernels hold more stages in shared memory for the same tile (no registers spent on addresses)
_NT_TMA_CHOICES = [(128, 3, 8), (128, 4, 8), (128, 5, 8), (256, 3, 8), (256, 4, 8), (128, 4, 4)]
_WGRAD_TMA_CHOICES = [(128, 3, 8), (128, 4, 8), (128, 5, 8), (256, 3, 8), (64, 4, 4)]


if HAVE_TRITON:

    @triton.jit
    def _tile_expert(ends_ptr, row0, E, E_P2: tl.constexpr):
        """Expert of the row tile starting at row0: the number of group ends at or before it (E: padding)."""
        ge = tl.arange(0, E_P2)
        ends = tl.load(ends_ptr + ge, mask=ge < E, other=2147483647)
        return tl.sum((ends <= row0).to(tl.int32), axis=0)

    @triton.jit
    def _tile_coords(pid, num_m, num_n, N_FASTEST: tl.constexpr):
        """(row tile, column tile) of program pid. N_FASTEST: the column tiles of one row tile run side by side,
        so its A rows come from HBM once and are shared through L2 (with rows fastest, every column tile reads
        all of A again once A outgrows L2)."""
        if N_FASTEST:
            return pid // num_n, pid % num_n
        return pid % num_m, pid // num_m

    @triton.jit
    def _nt_tile(ends_ptr, M, N, E, E_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 N_FASTEST: tl.constexpr):
        """(first row, first column, expert) of this program's output tile in the row-tiled kernels."""
        pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), N_FASTEST)
        row0 = pid_m * BLOCK_M
        return row0, pid_n * BLOCK_N, _tile_expert(ends_ptr, row0, E, E_P2)

    @triton.jit
    def _grouped_nt_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, ends_ptr,
                           M, N, K, E,
                           s_am, s_asm, s_ask, s_be, s_bn, s_bse, s_bsn, s_cm,
                           E_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, N_FASTEST: tl.constexpr):
        row0, n0, g = _nt_tile(ends_ptr, M, N, E, E_P2, BLOCK_M, BLOCK_N, N_FASTEST)
        rm = row0 + tl.arange(0, BLOCK_M)
        rn = n0 + tl.arange(0, BLOCK_N)
        c_ptrs = c_ptr + rm[:, None].to(tl.int64) * s_cm + rn[None, :]
        c_mask = (rm[:, None] < M) & (rn[None, :] < N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if g < E:  # tiles past the last group's end hold padding only: write zeros
            rk = tl.arange(0, BLOCK_K)
            a_ptrs = a_ptr + rm[:, None].to(tl.int64) * s_am + rk[None, :]
            b_base = b_ptr + g.to(tl.int64) * s_be
            b_ptrs = b_base + rn[None, :].to(tl.int64) * s_bn + rk[:, None]
            sa_ptrs = as_ptr + rm.to(tl.int64) * s_asm
            sb_ptrs = bs_ptr + g.to(tl.int64) * s_bse + (rn // BLOCK_K) * s_bsn
            m_ok = rm < M
            n_ok = rn < N
            for kt in range(0, tl.cdiv(K, BLOCK_K)):
                k_ok = rk < K - kt * BLOCK_K
                a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                sa = tl.load(sa_ptrs + kt * s_ask, mask=m_ok, other=0.0)
                sb = tl.load(sb_ptrs + kt, mask=n_ok, other=0.0)
                acc += tl.dot(a, b) * (sa[:, None] * sb[None, :])
                a_ptrs += BLOCK_K
                b_ptrs += BLOCK_K
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)

    @triton.jit
    def _grouped_nt_tma_kernel(a_desc, as_ptr, b_desc, bs_ptr, c_desc, ends_ptr,
                               M, N, K, E,
                               s_asm, s_ask, s_bse, s_bsn,
                               E_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr, N_FASTEST: tl.constexpr, DEFER: tl.constexpr):
        # _grouped_nt_kernel with the tiles moved by the TMA unit (tensor descriptors): no address arithmetic or
        # masks in the loop (out-of-range rows and columns read as zero, stores are clipped), and the loads are
        # asynchronous bulk copies the pipeliner overlaps with the tensor-core work
        row0, n0, g = _nt_tile(ends_ptr, M, N, E, E_P2, BLOCK_M, BLOCK_N, N_FASTEST)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if g < E:
            rm = row0 + tl.arange(0, BLOCK_M)
            rn = n0 + tl.arange(0, BLOCK_N)
            m_ok = rm < M
            n_ok = rn < N
            sa_ptrs = as_ptr + rm.to(tl.int64) * s_asm
            sb_ptrs = bs_ptr + g.to(tl.int64) * s_bse + (rn // BLOCK_K) * s_bsn
            if DEFER:
                # slice kt's dot is issued before slice kt-1's product is promoted (see DEFER_PROMOTION)
                part = tl.dot(a_desc.load([row0, 0]), b_desc.load([g, n0, 0]).reshape(BLOCK_N, BLOCK_K).T)
                scale = (tl.load(sa_ptrs, mask=m_ok, other=0.0)[:, None]
                         * tl.load(sb_ptrs, mask=n_ok, other=0.0)[None, :])
                for kt in range(1, tl.cdiv(K, BLOCK_K)):
                    a = a_desc.load([row0, kt * BLOCK_K])
                    b = b_desc.load([g, n0, kt * BLOCK_K]).reshape(BLOCK_N, BLOCK_K)
                    nxt = tl.dot(a, b.T)
                    acc += part * scale
                    sa = tl.load(sa_ptrs + kt * s_ask, mask=m_ok, other=0.0)
                    sb = tl.load(sb_ptrs + kt, mask=n_ok, other=0.0)
                    scale = sa[:, None] * sb[None, :]
                    part = nxt
                acc += part * scale
            else:
                for kt in range(0, tl.cdiv(K, BLOCK_K)):
                    a = a_desc.load([row0, kt * BLOCK_K])
                    b = b_desc.load([g, n0, kt * BLOCK_K]).reshape(BLOCK_N, BLOCK_K)
                    sa = tl.load(sa_ptrs + kt * s_ask, mask=m_ok, other=0.0)
                    sb = tl.load(sb_ptrs + kt, mask=n_ok, other=0.0)
                    acc += tl.dot(a, b.T) * (sa[:, None] * sb[None, :])
        c_desc.store([row0, n0], acc.to(c_desc.dtype))

    @triton.jit
    def _store_wgrad(c_ptr, acc, e, rn, rk, n_ok, k_ok, PART_N, s_cp, s_ce, s_cn):
        """dW rows n of expert e to out[n // PART_N, e, n % PART_N]: joined weights (gate and up) come out as
        separate contiguous [E, F, K] gradients (split views of one [E, 2F, K] were each copied again by autograd
        into the parameter's layout)."""
        part = rn // PART_N
        c_ptrs = (c_ptr + part[:, None].to(tl.int64) * s_cp + e.to(tl.int64) * s_ce
                  + (rn - part * PART_N)[:, None].to(tl.int64) * s_cn + rk[None, :])
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])

    @triton.jit
    def _wgrad_tile(ends_ptr, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
        """(expert, first row n, first column k, first token, end token) of this program's dW tile."""
        pid = tl.program_id(0)
        e = tl.program_id(1)
        num_k = tl.cdiv(K, BLOCK_K)
        # groups start and end at multiples of BLOCK_T: telling the compiler so lets it vectorize the loads
        # (without the hint it cannot prove alignment of a loaded offset: ~50 TFLOP/s instead of ~500)
        start = tl.multiple_of(tl.load(ends_ptr + e - 1, mask=e > 0, other=0), BLOCK_T)
        end = tl.multiple_of(tl.load(ends_ptr + e), BLOCK_T)
        return e, (pid // num_k) * BLOCK_N, (pid % num_k) * BLOCK_K, start, end

    @triton.jit
    def _grouped_wgrad_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, ends_ptr,
                              N, K, PART_N,
                              s_an, s_asn, s_bk, s_bsk, s_cp, s_ce, s_cn,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
        e, n0, k0, start, end = _wgrad_tile(ends_ptr, K, BLOCK_N, BLOCK_K, BLOCK_T)
        rn = n0 + tl.arange(0, BLOCK_N)
        rk = k0 + tl.arange(0, BLOCK_K)
        rt = tl.arange(0, BLOCK_T)
        n_ok = rn < N
        k_ok = rk < K
        # A = dy^T [N, M]: rows n, token columns (contiguous); B = x^T [K, M] read as [tokens, K]. Every tile of
        # a group is full (the group's length is a multiple of BLOCK_T): no token mask.
        a_ptrs = a_ptr + rn[:, None].to(tl.int64) * s_an + (start + rt)[None, :]
        b_ptrs = b_ptr + rk[None, :].to(tl.int64) * s_bk + (start + rt)[:, None]
        sa_ptrs = as_ptr + rn.to(tl.int64) * s_asn + start // BLOCK_T
        sb_ptrs = bs_ptr + rk.to(tl.int64) * s_bsk + start // BLOCK_T
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for _ in range(start, end, BLOCK_T):
            a = tl.load(a_ptrs, mask=n_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[None, :], other=0.0)
            sa = tl.load(sa_ptrs, mask=n_ok, other=0.0)
            sb = tl.load(sb_ptrs, mask=k_ok, other=0.0)
            acc += tl.dot(a, b) * (sa[:, None] * sb[None, :])
            a_ptrs += BLOCK_T
            b_ptrs += BLOCK_T
            sa_ptrs += 1
            sb_ptrs += 1
        _store_wgrad(c_ptr, acc, e, rn, rk, n_ok, k_ok, PART_N, s_cp, s_ce, s_cn)

    @triton.jit
    def _grouped_wgrad_tma_kernel(a_desc, as_ptr, b_desc, bs_ptr, c_ptr, ends_ptr,
                                  N, K, PART_N,
                                  s_asn, s_bsk, s_cp, s_ce, s_cn,
                                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
                                  DEFER: tl.constexpr):
        # _grouped_wgrad_kernel with TMA tile loads (see _grouped_nt_tma_kernel)
        e, n0, k0, start, end = _wgrad_tile(ends_ptr, K, BLOCK_N, BLOCK_K, BLOCK_T)
        rn = n0 + tl.arange(0, BLOCK_N)
        rk = k0 + tl.arange(0, BLOCK_K)
        n_ok = rn < N
        k_ok = rk < K
        sa_ptrs = as_ptr + rn.to(tl.int64) * s_asn + start // BLOCK_T
        sb_ptrs = bs_ptr + rk.to(tl.int64) * s_bsk + start // BLOCK_T
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        if DEFER:
            if end > start:  # one token slice behind, as _grouped_nt_tma_kernel's DEFER
                part = tl.dot(a_desc.load([n0, start]), b_desc.load([k0, start]).T)
                scale = (tl.load(sa_ptrs, mask=n_ok, other=0.0)[:, None]
                         * tl.load(sb_ptrs, mask=k_ok, other=0.0)[None, :])
                for t in range(start + BLOCK_T, end, BLOCK_T):
                    sa_ptrs += 1
                    sb_ptrs += 1
                    nxt = tl.dot(a_desc.load([n0, t]), b_desc.load([k0, t]).T)
                    acc += part * scale
                    sa = tl.load(sa_ptrs, mask=n_ok, other=0.0)
                    sb = tl.load(sb_ptrs, mask=k_ok, other=0.0)
                    scale = sa[:, None] * sb[None, :]
                    part = nxt
                acc += part * scale
        else:
            for t in range(start, end, BLOCK_T):
                a = a_desc.load([n0, t])
                b = b_desc.load([k0, t])
                sa = tl.load(sa_ptrs, mask=n_ok, other=0.0)
                sb = tl.load(sb_ptrs, mask=k_ok, other=0.0)
                acc += tl.dot(a, b.T) * (sa[:, None] * sb[None, :])
                sa_ptrs += 1
                sb_ptrs += 1
        _store_wgrad(c_ptr, acc, e, rn, rk, n_ok, k_ok, PART_N, s_cp, s_ce, s_cn)

    def _nt_tma_blocks(nargs):
        """Autotune pre-hook: the descriptors' block shapes follow the config's BLOCK_N."""
        bn = nargs["BLOCK_N"]
        nargs["b_desc"].block_shape = [1, bn, 128]
        nargs["c_desc"].block_shape = [GROUP_ALIGN, bn]

    def _wgrad_tma_blocks(nargs):
        nargs["a_desc"].block_shape = [nargs["BLOCK_N"], GROUP_ALIGN]

    if os.environ.get("TRITON_INTERPRET") == "1":
        # The interpreter (numpy on the CPU, used to check these kernels without a GPU) cannot benchmark
        # configs: run one fixed config.
        _FIXED = {"BLOCK_N": 128}
    else:
        _grouped_nt_kernel = triton.autotune(configs=_configs("BLOCK_N", _NT_CHOICES), key=["N", "K"])(
            _grouped_nt_kernel)
        _grouped_wgrad_kernel = triton.autotune(configs=_configs("BLOCK_N", _WGRAD_CHOICES), key=["N", "K"])(
            _grouped_wgrad_kernel)
        _grouped_nt_tma_kernel = triton.autotune(
            configs=_configs("BLOCK_N", _NT_TMA_CHOICES, _nt_tma_blocks), key=["N", "K"])(_grouped_nt_tma_kernel)
        _grouped_wgrad_tma_kernel = triton.autotune(
            configs=_configs("BLOCK_N", _WGRAD_TMA_CHOICES, _wgrad_tma_blocks), key=["N", "K"])(
            _grouped_wgrad_tma_kernel)
        _FIXED = {}


def _check_fp8(*ts: Tensor) -> None:
    for t in ts:
        if t.dtype != torch.float8_e4m3fn:
            raise TypeError(f"expected float8_e4m3fn operands, got {t.dtype}")


@functools.lru_cache(maxsize=None)
def _device_has_tma(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def tma_ok(*ts: Tensor) -> bool:
    """TMA needs Hopper or newer (or the interpreter), 16-byte aligned bases and 16-byte aligned row strides."""
    if TensorDescriptor is None:
        return False
    if os.environ.get("TRITON_INTERPRET") != "1":
        if not ts[0].is_cuda or not _device_has_tma(ts[0].device.index):
            return False
    return all(t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])
               and t.stride(-1) == 1 for t in ts)


def kernel_choice(*ts: Tensor) -> str:
    """"tma" or "pointer": what ``KERNELS`` picks for these operands (output included)."""
    if KERNELS not in ("auto", "tma", "pointer"):
        raise ValueError(f"triton_grouped.KERNELS must be 'auto', 'tma' or 'pointer', got {KERNELS!r}")
    if KERNELS == "pointer":
        return "pointer"
    ok = tma_ok(*ts)
    if KERNELS == "tma" and not ok:
        raise ValueError("triton_grouped.KERNELS = 'tma' but the device or the operands' alignment do not allow TMA")
    return "tma" if ok else "pointer"


def grouped_fp8_nt(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, ends: Tensor,
                   out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """``out[rows of e] = dequant(a)[rows of e] @ dequant(b[e])^T`` -> [M, N] in ``out_dtype``.

    a [M, K] FP8 with tile scales [M, ceil(K/128)]; b [E, N, K] FP8 (K contiguous) with block scales
    [E, ceil(N/128), ceil(K/128)]; ends int32 [E] cumulative group ends, each group starting at a multiple of
    128 rows. Rows at or past ``ends[-1]`` come out zero.
    """
    _check_fp8(a, b)
    m, k = a.shape
    e, n, kb = b.shape
    if kb != k:
        raise ValueError(f"K mismatch: a {tuple(a.shape)} vs b {tuple(b.shape)}")
    a, b = a.contiguous(), b.contiguous()
    # a's scales may be in either layout (their two strides are passed); b's are read as [E, N/128, K/128]
    a_scale, b_scale = a_scale.float(), b_scale.float().contiguous()
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    block_m = GROUP_ALIGN
    ends = ends.to(torch.int32).contiguous()

    def grid(meta):
        return (triton.cdiv(m, block_m) * triton.cdiv(n, meta["BLOCK_N"]),)

    common = dict(E_P2=triton.next_power_of_2(e), BLOCK_M=block_m, BLOCK_K=128, N_FASTEST=N_FASTEST, **_FIXED)
    if kernel_choice(a, b, out) == "tma":
        bn = _FIXED.get("BLOCK_N", 128)  # the autotuner's pre-hook resets the block shapes per config
        a_desc = TensorDescriptor(a, [m, k], [k, 1], [block_m, 128])
        b_desc = TensorDescriptor(b, [e, n, k], [n * k, k, 1], [1, bn, 128])
        c_desc = TensorDescriptor(out, [m, n], [n, 1], [block_m, bn])
        _grouped_nt_tma_kernel[grid](a_desc, a_scale, b_desc, b_scale, c_desc, ends, m, n, k, e,
                                     a_scale.stride(0), a_scale.stride(1), b_scale.stride(0), b_scale.stride(1),
                                     DEFER=DEFER_PROMOTION, **common)
        return out
    _grouped_nt_kernel[grid](a, a_scale, b, b_scale, out, ends,
                             m, n, k, e,
                             a.stride(0), a_scale.stride(0), a_scale.stride(1), b.stride(0), b.stride(1),
                             b_scale.stride(0), b_scale.stride(1), out.stride(0), **common)
    return out


def grouped_fp8_wgrad(a_t: Tensor, a_scale: Tensor, b_t: Tensor, b_scale: Tensor, ends: Tensor,
                      out_dtype: torch.dtype = torch.float32, parts: int = 1) -> Tensor:
    """``out[e] = dequant(a_t)[:, rows of e] @ dequant(b_t)[:, rows of e]^T`` -> [E, N, K].

    a_t = dy^T [N, M] and b_t = x^T [K, M], FP8 with tile scales along the token axis ([N, ceil(M/128)] and
    [K, ceil(M/128)]); ends int32 [E] as in ``grouped_fp8_nt``. Empty groups give zeros. ``parts`` > 1 (N a
    multiple of it): the N rows as that many equal weights, out [parts, E, N / parts, K], each part contiguous.
    """
    _check_fp8(a_t, b_t)
    n, m = a_t.shape
    k, mb = b_t.shape
    if mb != m:
        raise ValueError(f"token count mismatch: a_t {tuple(a_t.shape)} vs b_t {tuple(b_t.shape)}")
    e = ends.numel()
    if parts < 1 or n % parts:
        raise ValueError(f"N = {n} does not split into {parts} equal parts")
    a_t, b_t = a_t.contiguous(), b_t.contiguous()
    a_scale, b_scale = a_scale.float().contiguous(), b_scale.float().contiguous()
    out4 = torch.empty(parts, e, n // parts, k, dtype=out_dtype, device=a_t.device)
    out = out4 if parts > 1 else out4[0]
    if e == 0 or n == 0 or k == 0:
        return out
    c_strides = (out4.stride(0), out4.stride(1), out4.stride(2))
    block_k = 128
    ends = ends.to(torch.int32).contiguous()

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(k, block_k), e)

    if kernel_choice(a_t, b_t) == "tma":
        bn = _FIXED.get("BLOCK_N", 128)
        a_desc = TensorDescriptor(a_t, [n, m], [m, 1], [bn, GROUP_ALIGN])
        b_desc = TensorDescriptor(b_t, [k, m], [m, 1], [block_k, GROUP_ALIGN])
        _grouped_wgrad_tma_kernel[grid](a_desc, a_scale, b_desc, b_scale, out4, ends, n, k, n // parts,
                                        a_scale.stride(0), b_scale.stride(0), *c_strides,
                                        BLOCK_K=block_k, BLOCK_T=GROUP_ALIGN, DEFER=DEFER_PROMOTION, **_FIXED)
        return out
    _grouped_wgrad_kernel[grid](a_t, a_scale, b_t, b_scale, out4, ends,
                                n, k, n // parts,
                                a_t.stride(0), a_scale.stride(0), b_t.stride(0), b_scale.stride(0), *c_strides,
                                BLOCK_K=block_k, BLOCK_T=GROUP_ALIGN, **_FIXED)
    return out
