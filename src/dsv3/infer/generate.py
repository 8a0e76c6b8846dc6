"""Sampling with a KV cache (absorbed-MLA latent cache by default): temperature, top-p, max tokens."""
from __future__ import annotations

import torch

from dsv3.infer.cache import KVCache
from dsv3.model import DeepseekV3


def sample_next(logits_BV: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy when temperature == 0; otherwise nucleus sampling over softmax(logits / temperature)."""
    if temperature <= 0:
        return logits_BV.argmax(dim=-1)
    probs = torch.softmax(logits_BV.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: DeepseekV3, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.8,
             top_p: float = 0.95, eos_id: int | None = None, cache_kind: str = "latent",
             seed: int | None = None) -> torch.Tensor:
    """Extend input_ids [B,S] by up to max_new_tokens; a row stops after EOS (later tokens repeat EOS)."""
    model.eval()
    B, S = input_ids.shape
    device = input_ids.device
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, B, S + max_new_tokens, kind=cache_kind, dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    logits = model(input_ids, cache=cache).logits[:, -1]
    out = [input_ids]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, gen)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        out.append(nxt[:, None])
        if eos_id is not None and bool(done.all()):
            break
        logits = model(nxt[:, None], cache=cache).logits[:, -1]
    return torch.cat(out, dim=1)
