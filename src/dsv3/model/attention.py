"""Multi-head Latent Attention (MLA), naive form for training and absorbed form for decoding.

Shapes: B batch, S query length, T key length, H heads, N nope dim, R rope dim, V value dim, C kv_lora_rank.
The naive form expands the latent into per-head keys/values (what training uses); the absorbed form folds
W_UK into the query and W_UV after attention, so a decode cache holds only the normalized latent [C] and the
rotated shared key [R] per token (576 values for V3 instead of H*(N+R+V) = 40,960).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.layers import RMSNorm, shared_input_linears
from dsv3.model.rope import apply_rope_interleaved


def causal_attention(q_BHSD: torch.Tensor, k_BHTD: torch.Tensor, v_BHTV: torch.Tensor, scale: float,
                     doc_ids_BS: torch.Tensor | None = None) -> torch.Tensor:
    """Causal SDPA (optionally block-diagonal over documents); q/k dim may differ from v dim.

    The reference path; kernels/ provides fast variants tested against it.
    """
    if doc_ids_BS is None:
        return F.scaled_dot_product_attention(q_BHSD, k_BHTD, v_BHTV, is_causal=True, scale=scale)
    S = q_BHSD.shape[-2]
    causal = torch.ones(S, S, dtype=torch.bool, device=q_BHSD.device).tril()
    same_doc = doc_ids_BS[:, :, None] == doc_ids_BS[:, None, :]
    mask = (same_doc & causal)[:, None]
    return F.scaled_dot_product_attention(q_BHSD, k_BHTD, v_BHTV, attn_mask=mask, scale=scale)


class MLA(nn.Module):
    """One MLA block with DeepSeek's parameter names (HF checkpoint keys)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_heads = c.num_attention_heads
        self.nope, self.rope, self.v_dim, self.kv_rank = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        self.qk_dim = self.nope + self.rope
        self.scale = c.softmax_scale
        self.q_lora_rank = c.q_lora_rank
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, 1e-6)  # DeepSeek keeps 1e-6 here whatever rms_norm_eps says
            self.q_b_proj = nn.Linear(c.q_lora_rank, self.n_heads * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, 1e-6)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, c.hidden_size, bias=c.attention_bias)
        from dsv3.kernels.attention import fast_causal_attention
        self.attention_fn = fast_causal_attention  # cuDNN on CUDA; tests may set the reference causal_attention

    # ------------------------------------------------------------------ pieces
    def down_projections(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two projections that read x: (q_a_proj or q_proj)(x) and kv_a_proj_with_mqa(x), one GEMM on CUDA."""
        first = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        return shared_input_linears(x_BSD, (first, self.kv_a_proj_with_mqa))

    def project_q(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_first=None):
        """-> q_nope [B,S,H,N], rotated q_pe [B,S,H,R]. ``q_first``: (q_a_proj or q_proj)(x) if already made."""
        B, S, _ = x_BSD.shape
        if q_first is None:
            q_first = self.q_proj(x_BSD) if self.q_lora_rank is None else self.q_a_proj(x_BSD)
        q = q_first if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(q_first))
        q_nope, q_pe = q.view(B, S, self.n_heads, self.qk_dim).split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope_interleaved(q_pe, cos.unsqueeze(-2), sin.unsqueeze(-2))
        return q_nope, q_pe

    def project_latent(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_a=None):
        """-> normalized latent c_kv [B,S,C], rotated shared key k_pe [B,S,R] (what the absorbed cache stores).
        ``kv_a``: kv_a_proj_with_mqa(x) if already made."""
        if kv_a is None:
            kv_a = self.kv_a_proj_with_mqa(x_BSD)
        c_kv, k_pe = kv_a.split([self.kv_rank, self.rope], dim=-1)
        return self.kv_a_layernorm(c_kv), apply_rope_interleaved(k_pe, cos, sin)

    def expand_kv(self, c_kv_BTC: torch.Tensor, k_pe_BTR: torch.Tensor):
        """Naive expansion: latent -> per-head keys [B,T,H,N+R] and values [B,T,H,V]."""
        B, T, _ = c_kv_BTC.shape
        k_nope, v = self.kv_b_proj(c_kv_BTC).view(B, T, self.n_heads, self.nope + self.v_dim).split(
            [self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe_BTR[:, :, None, :].expand(B, T, self.n_heads, self.rope)], dim=-1)
        return k, v

    # ---------------------------------------------------------------- forwards
    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                doc_ids_BS: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """Training/prefill (naive). With ``cache`` (an infer.cache layer), appends and attends to the past."""
        if cache is not None and cache.absorbed:
            return self.forward_absorbed(x_BSD, cos, sin, cache)
        B, S, _ = x_BSD.shape
        q_first, kv_a = self.down_projections(x_BSD)
        q_nope, q_pe = self.project_q(x_BSD, cos, sin, q_first)
        c_kv, k_pe = self.project_latent(x_BSD, cos, sin, kv_a)
        k, v = self.expand_kv(c_kv, k_pe)
        q = torch.cat([q_nope, q_pe], dim=-1)
        if cache is None:
            o = self.attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scale, doc_ids_BS)
        else:
            start = cache.length
            k, v = cache.append(k, v)
            o = _attend_with_offset(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scale, start)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, self.n_heads * self.v_dim))

    def forward_absorbed(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache) -> torch.Tensor:
        """Decode form: scores = (q_nope W_UK) . c_kv + q_pe . k_pe ; out = (P c_kv) W_UV ; fp32 softmax."""
        B, S, _ = x_BSD.shape
        q_nope, q_pe = self.project_q(x_BSD, cos, sin)
        c_kv, k_pe = self.project_latent(x_BSD, cos, sin)
        start = cache.length
        c_kv_all, k_pe_all = cache.append(c_kv, k_pe)  # [B,T,C], [B,T,R]
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_rank)
        w_uk_HNC, w_uv_HVC = w[:, : self.nope], w[:, self.nope:]
        q_lat_BSHC = torch.einsum("bshn,hnc->bshc", q_nope, w_uk_HNC)
        scores = (torch.einsum("bshc,btc->bhst", q_lat_BSHC.float(), c_kv_all.float())
                  + torch.einsum("bshr,btr->bhst", q_pe.float(), k_pe_all.float())) * self.scale
        T = c_kv_all.shape[1]
        q_pos = torch.arange(start, start + S, device=x_BSD.device)
        visible = torch.arange(T, device=x_BSD.device)[None, :] <= q_pos[:, None]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        o_lat_BSHC = torch.einsum("bhst,btc->bshc", probs, c_kv_all.float()).to(x_BSD.dtype)
        o = torch.einsum("bshc,hvc->bshv", o_lat_BSHC, w_uv_HVC)
        return self.o_proj(o.reshape(B, S, self.n_heads * self.v_dim))


def _attend_with_offset(q_BHSD, k_BHTD, v_BHTV, scale: float, start: int) -> torch.Tensor:
    """Queries at positions start..start+S-1 see keys 0..their own position."""
    S, T = q_BHSD.shape[-2], k_BHTD.shape[-2]
    visible = torch.arange(T, device=q_BHSD.device)[None, :] <= torch.arange(start, start + S, device=q_BHSD.device)[:, None]
    return F.scaled_dot_product_attention(q_BHSD, k_BHTD, v_BHTV, attn_mask=visible, scale=scale)
