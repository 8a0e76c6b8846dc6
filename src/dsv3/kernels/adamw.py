"""One-pass AdamW update on the GPU: each element of p, grad, exp_avg and exp_avg_sq read once and written once.

The arithmetic is ``dsv3.train.optim.AdamWLowPrecisionMoments``'s eager loop (its reference twin), in fp32 for
any storage dtype: fp32 master weights or bf16 weights, fp32 or bf16 gradients, bf16 or fp32 moments. The
moments are stored rounded to their dtype while the update uses the unrounded fp32 values, as the loop does.
The loop issues about a dozen eager kernels per tensor (fp32 copies of the moments, sqrt, division, casts);
torch's fused AdamW reached 2.7 TB/s on an H200 for bf16 weights; this kernel streams the 14 bytes per bf16
parameter (4 loads, 3 stores) in one launch per tensor. ``tests/test_optim_fused.py`` compares it with the loop.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # CPU-only installs: the eager loop is the path
    HAS_TRITON = False

BLOCK = 2048


def can_fuse(p: torch.Tensor, tensors: tuple[torch.Tensor, ...]) -> bool:
    """Whether ``adamw_step_`` can update p in place: CUDA, Triton present, every tensor contiguous."""
    return HAS_TRITON and p.is_cuda and all(t.is_contiguous() and t.device == p.device for t in (p, *tensors))


if HAS_TRITON:
    @triton.jit
    def _adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, n, beta1, beta2, eps, decay_factor, step_size, sqrt_bc2,
                      BLOCK_SIZE: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < n
        p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
        m = m * beta1 + g * (1.0 - beta1)
        v = v * beta2 + (1.0 - beta2) * g * g
        denom = tl.div_rn(tl.sqrt_rn(v), sqrt_bc2) + eps
        p = p * decay_factor - step_size * tl.div_rn(m, denom)
        tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)


def adamw_step_(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int) -> None:
    """In place: exp_avg, exp_avg_sq <- the AdamW moments after ``step`` updates; p <- p (1 - lr wd) -
    lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps), all in fp32, each stored in its own dtype."""
    n = p.numel()
    if n == 0:
        return
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    _adamw_kernel[(triton.cdiv(n, BLOCK),)](p, grad, exp_avg, exp_avg_sq, n, beta1, beta2, eps,
                                           1 - lr * weight_decay, lr / bc1, bc2 ** 0.5, BLOCK_SIZE=BLOCK)
