"""Training attention on the fastest exact kernel for MLA's shapes (q/k dim != v dim).

On Hopper with torch 2.11, FlashAttention refuses unequal q/k and v head dims; cuDNN's SDPA takes them and
measured 532 TFLOP/s forward against 140 for the memory-efficient kernel (design.md section 4), so cuDNN is
tried first. CPU and document-masked calls go to the reference (`dsv3.model.attention.causal_attention`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.model.attention import causal_attention

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    _BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]
except ImportError:  # very old torch
    sdpa_kernel = None


def _priority_context():
    try:
        return sdpa_kernel(_BACKENDS, set_priority=True)
    except TypeError:  # torch without set_priority: cuDNN alone, the others as fallback are lost
        return sdpa_kernel(_BACKENDS[:1])


def fast_causal_attention(q_BHSD: torch.Tensor, k_BHTD: torch.Tensor, v_BHTV: torch.Tensor, scale: float,
                          doc_ids_BS: torch.Tensor | None = None) -> torch.Tensor:
    """Same function as the reference; cuDNN SDPA first on CUDA."""
    if not q_BHSD.is_cuda or doc_ids_BS is not None or sdpa_kernel is None:
        return causal_attention(q_BHSD, k_BHTD, v_BHTV, scale, doc_ids_BS)
    with _priority_context():
        return F.scaled_dot_product_attention(q_BHSD, k_BHTD, v_BHTV, is_causal=True, scale=scale)
