"""Decoupled rotary embedding for MLA: interleaved pairs, optional YaRN.

DeepSeek's released weights rotate ADJACENT coordinates (x[2i], x[2i+1]) by frequency i, so we do the same
and never permute weights. YaRN is applied whenever the config has a ``rope_scaling`` block: it is a property
of the model, not of the sequence length it happens to see.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from dsv3.config import ModelConfig, RopeScaling, yarn_mscale


def yarn_inv_freq(dim: int, theta: float, rs: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies [dim/2] in fp32: theta^(-2i/dim), blended to inv_freq/factor by YaRN's ramp."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if rs is None:
        return inv_freq.float()

    def correction_dim(rotations: float) -> float:
        # the frequency index whose wavelength fits `rotations` times into the original context
        return dim * math.log(rs.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(rs.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rs.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1: high-frequency dims keep their frequency; 0: interpolated by `factor`
    return (inv_freq / rs.factor * (1 - keep) + inv_freq * keep).float()


class RotaryEmbedding(nn.Module):
    """Computes cos/sin [S, rope/2] for positions; applied to the rope slice of q and the shared k_pe."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim = config.qk_rope_head_dim
        rs = config.rope_scaling
        self.register_buffer("inv_freq", yarn_inv_freq(dim, config.rope_theta, rs), persistent=False)
        # cos/sin are scaled by mscale/mscale_all_dim (1 for V2/V3, whose two are equal).
        self.attention_scaling = 1.0
        if rs is not None:
            self.attention_scaling = yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [S] or [B,S] -> (cos, sin) each [..., S, rope/2] in fp32."""
        freqs = position_ids.to(torch.float32)[..., None] * self.inv_freq.to(position_ids.device)
        return freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x [..., S, rope] by angle i; cos/sin broadcast as [..., S, rope/2].

    The output keeps the interleaved layout (pair i at 2i, 2i+1), so weights and caches stay as released.
    Computed in fp32 and cast back, as the rotation is precision-sensitive at long positions.
    """
    dtype = x.dtype
    x2 = x.float().unflatten(-1, (-1, 2))
    even, odd = x2[..., 0], x2[..., 1]
    out = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
    return out.flatten(-2).to(dtype)
