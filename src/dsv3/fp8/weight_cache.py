"""Quantize each weight once per optimizer step, not once per micro-batch.

A step with gradient accumulation runs every FP8 layer's forward (and, with recomputation, its forward
again) once per micro-batch, and each call quantized the same unchanged weight to 128x128 blocks again: for
the routed experts of the `small` preset that is 2.3B fp32 values read several times per micro-batch. Inside
``reuse_quantized_weights()`` the first call stores the FP8 copy (and, when the input gradient needs it, the
transposed copy) and later calls reuse it.

Why a scope and not a version check: ``torch.optim.AdamW(fused=True)`` updates parameters in place without
bumping their version counters (checked on torch 2.13), so a cache that outlives an optimizer step could
serve stale weights. The trainer opens the scope around a step's forward/backward passes, where weights
cannot change; outside it (evaluation, tests, user code) nothing is cached. Entries are also checked against
the weight's storage pointer, version and shape, so an in-place change inside the scope is not missed either.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor

from dsv3.fp8.blocks import BLOCK, FP8_DTYPE
from dsv3.fp8.triton_quant import quantize_blocks, transpose_last2

__all__ = ["reuse_quantized_weights", "step_scope", "weight_blocks", "weight_blocks_transposed", "cache_size"]

_cache: dict[int, tuple] | None = None  # None: not inside reuse_quantized_weights()


@contextmanager
def reuse_quantized_weights():
    """Within: each weight's FP8 blocks are computed once and reused. Nested scopes share the outer cache."""
    global _cache
    if _cache is not None:
        yield
        return
    _cache = {}
    try:
        yield
    finally:
        _cache = None


def step_scope(precision: str, cudagraphs: bool):
    """The trainer's scope around one step's forward/backward passes: ``reuse_quantized_weights()`` for FP8,
    except under CUDA graphs (``train.compile_mode`` 'reduce-overhead' / 'max-autotune'). A replay runs no
    Python, so a graph recorded while the cache answered would keep reading the cached FP8 copy of the step it
    was recorded in (weights frozen, then freed memory); without the cache every recorded forward quantizes the
    current weights itself."""
    return reuse_quantized_weights() if precision == "fp8" and not cudagraphs else nullcontext()


def _state(ws: tuple[Tensor, ...]):
    return tuple((w._version, w.data_ptr(), tuple(w.shape), w.dtype) for w in ws)


def _lookup(ws: tuple[Tensor, ...], pow2: bool, kind: str, make):
    if _cache is None:
        return make()
    key = (tuple(id(w) for w in ws), pow2, kind)
    entry = _cache.get(key)
    if entry is not None and all(a is b for a, b in zip(entry[0], ws)) and entry[1] == _state(ws):
        return entry[2]
    val = make()
    _cache[key] = (ws, _state(ws), val)
    return val


def weight_blocks(w: Tensor | tuple[Tensor, ...], pow2_scale: bool = False) -> tuple[Tensor, Tensor]:
    """``quantize_weight_blocks(w)`` ([..., N, K] FP8 and [..., N/128, K/128] scales), cached in a scope.

    A tuple of weights [..., N_i, K] (each N_i a multiple of 128) gives their concatenation along N, as one
    weight: the experts' gate and up projections run as one GEMM.
    """
    ws = w if isinstance(w, tuple) else (w,)
    if len(ws) == 1:
        return _lookup(ws, pow2_scale, "nk", lambda: quantize_blocks(ws[0].detach(), pow2_scale))

    def make():
        # each part quantized straight into its rows of the joined copy (a torch.cat after per-part copies cost
        # a copy of the joined FP8 weight per use under CUDA graphs, and kept each part cached twice in a scope)
        *lead, _, k = ws[0].shape
        rows = [p.shape[-2] for p in ws]
        if any(r % BLOCK for r in rows[:-1]):
            raise ValueError(f"joined weights need row counts that are multiples of {BLOCK}, got {rows}")
        q = torch.empty(*lead, sum(rows), k, dtype=FP8_DTYPE, device=ws[0].device)
        s = torch.empty(*lead, -(-sum(rows) // BLOCK), -(-k // BLOCK), dtype=torch.float32, device=ws[0].device)
        r0 = 0
        for p, r in zip(ws, rows):
            quantize_blocks(p.detach(), pow2_scale, out=(q[..., r0:r0 + r, :],
                                                          s[..., r0 // BLOCK:-(-(r0 + r) // BLOCK), :]))
            r0 += r
        return q, s
    return _lookup(ws, pow2_scale, "nk", make)


def weight_blocks_transposed(w: Tensor | tuple[Tensor, ...], q: Tensor, s: Tensor,
                             pow2_scale: bool = False) -> tuple[Tensor, Tensor]:
    """``W^T`` in FP8 as contiguous [..., K, N] with scales [..., K/128, N/128], from ``(q, s) =
    weight_blocks(w)``: the same bytes and block grid, transposed (a 128x128 grid is symmetric, so no second
    rounding). Cached under ``w`` in a scope."""
    ws = w if isinstance(w, tuple) else (w,)
    return _lookup(ws, pow2_scale, "kn",
                   lambda: (transpose_last2(q), s.transpose(-2, -1).contiguous()))


def cache_size() -> int:
    """Entries in the open scope (0 outside one); for tests."""
    return 0 if _cache is None else len(_cache)
