"""KV caches for generation: the naive per-head cache and the absorbed-MLA latent cache.

The latent cache stores, per token and layer, the normalized latent c_kv [kv_lora_rank] and the rotated
shared key k_pe [qk_rope_head_dim] (576 values for V3); the naive cache stores the expanded keys
[H, nope+rope] and values [H, v] (40,960 values for V3).
"""
from __future__ import annotations

import torch

from dsv3.config import ModelConfig


class _LayerCache:
    """Preallocated [B, max_len, ...] buffers for one layer; ``length`` is the model cache's current length."""

    def __init__(self, owner: "KVCache", shapes: tuple[tuple[int, ...], tuple[int, ...]], absorbed: bool):
        self.owner = owner
        self.absorbed = absorbed
        B, T = owner.batch_size, owner.max_len
        self.a = torch.zeros(B, T, *shapes[0], dtype=owner.dtype, device=owner.device)
        self.b = torch.zeros(B, T, *shapes[1], dtype=owner.dtype, device=owner.device)

    @property
    def length(self) -> int:
        return self.owner.length

    def append(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write S new entries after the current length; return everything up to the new end."""
        start, S = self.length, a.shape[1]
        if start + S > self.owner.max_len:
            raise ValueError(f"KV cache full: {start + S} tokens > max_len {self.owner.max_len}")
        self.a[:, start:start + S] = a.to(self.a.dtype)
        self.b[:, start:start + S] = b.to(self.b.dtype)
        return self.a[:, : start + S], self.b[:, : start + S]


class KVCache:
    """One cache for the whole model: ``kind`` 'latent' (absorbed MLA) or 'naive'."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, kind: str = "latent",
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if kind not in ("latent", "naive"):
            raise ValueError(f"kind must be 'latent' or 'naive', not {kind!r}")
        self.config, self.batch_size, self.max_len, self.kind = config, batch_size, max_len, kind
        self.dtype, self.device = dtype, torch.device(device)
        self.length = 0
        H = config.num_attention_heads
        if kind == "latent":
            shapes = ((config.kv_lora_rank,), (config.qk_rope_head_dim,))
        else:
            shapes = ((H, config.qk_head_dim), (H, config.v_head_dim))
        self.layers = [_LayerCache(self, shapes, kind == "latent") for _ in range(config.num_hidden_layers)]

    def layer(self, i: int) -> _LayerCache:
        return self.layers[i]

    def advance(self, n: int) -> None:
        """Called by the model once all layers have appended n tokens."""
        self.length += n

    def values_per_token(self) -> int:
        """Cached values per token per layer (576 latent vs 40,960 naive for V3)."""
        c = self.config
        if self.kind == "latent":
            return c.kv_lora_rank + c.qk_rope_head_dim
        return c.num_attention_heads * (c.qk_head_dim + c.v_head_dim)
