"""Parameter counts, total and activated, per component, for MLA/MoE and dense GQA configs.

Every count follows the Hugging Face checkpoint keys (design section 2): the e_score_correction_bias is counted
(it is stored in the checkpoint; the V3 totals 671,026,419,200 and 37,552,297,472 include it), norms are counted,
and the MTP module carries its own copies of the embedding and head, as the release does (684,489,845,504).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from dsv3.config import ModelConfig
from dsv3.plan.models import DenseConfig, Model, is_dense

COMPONENTS = ("embedding", "head", "attention", "dense_ffn", "routed", "shared", "router", "norms", "mtp")


@dataclass
class ParamCount:
    """Total and activated parameters per component (main model; MTP kept apart in ``mtp``)."""

    total: dict[str, int] = field(default_factory=dict)
    activated: dict[str, int] = field(default_factory=dict)

    def total_params(self, *, mtp: bool = False) -> int:
        """All stored weights; ``mtp`` adds the MTP module (with its embedding/head copies)."""
        return sum(v for k, v in self.total.items() if k != "mtp" or mtp)

    def activated_params(self, *, input_embedding: bool = True, mtp: bool = False) -> int:
        """Weights one token touches; ``input_embedding=False`` drops the embedding table (a lookup, no FLOPs)."""
        skip = set() if input_embedding else {"embedding"}
        if not mtp:
            skip.add("mtp")
        return sum(v for k, v in self.activated.items() if k not in skip)

    def conventions(self) -> dict[str, int]:
        """The headline numbers with their convention spelled out (what `dsv3 plan` prints)."""
        return {
            "total (main model, no MTP)": self.total_params(mtp=False),
            "total (with MTP, as released)": self.total_params(mtp=True),
            "activated (with embedding and head)": self.activated_params(input_embedding=True),
            "activated (without input embedding)": self.activated_params(input_embedding=False),
        }


def mla_attention_params(cfg: ModelConfig) -> int:
    """One MLA block's weights, its two inner norms included (q_a_layernorm, kv_a_layernorm)."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    if cfg.q_lora_rank:
        q = d * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * h * cfg.qk_head_dim
    else:
        q = d * h * cfg.qk_head_dim
    kv = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
    kv += cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return q + kv + h * cfg.v_head_dim * d


def expert_params(cfg: ModelConfig) -> int:
    """One routed (or one shared-width) SwiGLU expert: gate, up, down."""
    return 3 * cfg.hidden_size * cfg.moe_intermediate_size


def router_params(cfg: ModelConfig) -> int:
    """Gate matrix plus, for noaux_tc routing, the per-expert correction bias."""
    bias = cfg.n_routed_experts if cfg.uses_bias_balancing else 0
    return cfg.n_routed_experts * cfg.hidden_size + bias


def _moe_layer(cfg: ModelConfig) -> tuple[dict[str, int], dict[str, int]]:
    """(total, activated) of one MoE layer's FFN part."""
    e = expert_params(cfg)
    total = {"routed": cfg.n_routed_experts * e, "shared": cfg.n_shared_experts * e, "router": router_params(cfg)}
    act = {"routed": cfg.num_experts_per_tok * e, "shared": cfg.n_shared_experts * e, "router": router_params(cfg)}
    return total, act


def count_mla(cfg: ModelConfig) -> ParamCount:
    """Per-component counts for a DeepSeek-family config."""
    d, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    n_moe, n_dense = cfg.num_moe_layers, cfg.first_k_dense_replace
    attn = mla_attention_params(cfg)
    layer_norms = 2 * d  # input_layernorm + post_attention_layernorm
    moe_t, moe_a = _moe_layer(cfg) if n_moe else ({"routed": 0, "shared": 0, "router": 0},) * 2
    total = {
        # A tied table is counted once, under "head": the head matmul still runs on it.
        "embedding": 0 if cfg.tie_word_embeddings else V * d, "head": V * d, "attention": L * attn, "dense_ffn": n_dense * 3 * d * cfg.intermediate_size,
        "routed": n_moe * moe_t["routed"], "shared": n_moe * moe_t["shared"], "router": n_moe * moe_t["router"],
        "norms": L * layer_norms + d,  # + model.norm
    }
    activated = dict(total)
    activated.update(routed=n_moe * moe_a["routed"])
    total["mtp"], activated["mtp"] = _mtp(cfg, attn, layer_norms)
    return ParamCount(total, activated)


def _mtp(cfg: ModelConfig, attn: int, layer_norms: int) -> tuple[int, int]:
    """MTP modules: enorm, hnorm, eh_proj, one MoE block, shared_head.norm, and embedding/head copies."""
    D = cfg.num_nextn_predict_layers
    if D == 0:
        return 0, 0
    d, V = cfg.hidden_size, cfg.vocab_size
    moe_t, moe_a = _moe_layer(cfg)
    fixed = 2 * d + 2 * d * d + attn + layer_norms + d + 2 * V * d
    return D * (fixed + sum(moe_t.values())), D * (fixed + sum(moe_a.values()))


def count_dense(cfg: DenseConfig) -> ParamCount:
    """Per-component counts for a dense GQA config (every parameter is activated)."""
    d, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    attn = d * q + 2 * d * kv + q * d + ((q + 2 * kv) if cfg.attention_bias else 0)
    total = {"embedding": 0 if cfg.tie_word_embeddings else V * d, "head": V * d, "attention": L * attn,
             "dense_ffn": L * 3 * d * cfg.intermediate_size, "routed": 0, "shared": 0, "router": 0,
             "norms": L * 2 * d + d, "mtp": 0}
    return ParamCount(total, dict(total))


def count_params(model: Model) -> ParamCount:
    """Per-component parameter counts for either family."""
    return count_dense(model) if is_dense(model) else count_mla(model)
