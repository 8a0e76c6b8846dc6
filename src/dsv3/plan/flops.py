"""Training FLOPs per token (forward + backward) for MLA/MoE and dense GQA configs.

Design section 5 defines the MFU convention: 6 x activated matmul parameters (head included, input embedding
excluded) + attention 6 x layers x heads x (qk_dim + v_dim) x seq, halved for causal attention.

Which convention gives which printed number (V3, seq 4096):
* matmul parameters only (norms and the router bias excluded): 250.450 GFLOPs causal, 281.152 non-causal;
* all activated parameters without the input embedding (36,625,618,432, the figure the report prints): 250.456
  causal ("250.5"), 281.158 non-causal ("281.2"). Norm weights and the bias add about 1M parameters and no
  matmul work, so the two differ by 0.006 GFLOPs; the papers' "250" and "281.2" agree with both.
DeepSeek-V2 (236B) gives 155.30 (matmul) / 155.31 (all parameters), the Insights paper's "155".
The MTP module is not part of the model FLOPs (the MFU tables count the main model only).
"""
from __future__ import annotations

from dataclasses import dataclass

from dsv3.config import ModelConfig
from dsv3.plan.models import DenseConfig, Model, is_dense
from dsv3.plan.params import count_params


@dataclass(frozen=True)
class TokenFlops:
    """FLOPs per token for one training step (forward + backward = 3 x forward)."""

    matmul: float  # 6 x activated matmul parameters
    attention: float  # score + value products at the given sequence length
    seq_len: int
    causal: bool

    @property
    def total(self) -> float:
        return self.matmul + self.attention


def matmul_params(model: Model) -> int:
    """Activated parameters that take part in a matmul: no input embedding, no norms, no router bias, no MTP."""
    pc = count_params(model)
    n = pc.activated_params(input_embedding=False) - pc.activated["norms"]
    if is_dense(model):
        cfg: DenseConfig = model
        if cfg.attention_bias:  # biases are adds, not matmuls
            n -= cfg.num_hidden_layers * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
        return n
    cfg: ModelConfig = model
    inner_norms = (cfg.q_lora_rank or 0) + cfg.kv_lora_rank  # q_a_layernorm, kv_a_layernorm live in "attention"
    n -= cfg.num_hidden_layers * inner_norms
    if cfg.uses_bias_balancing:
        n -= cfg.num_moe_layers * cfg.n_routed_experts
    return n


def attention_dims(model: Model) -> tuple[int, int, int, int]:
    """(layers, query heads, qk head dim, v head dim) of the score/value products."""
    if is_dense(model):
        return model.num_hidden_layers, model.num_attention_heads, model.head_dim, model.head_dim
    return model.num_hidden_layers, model.num_attention_heads, model.qk_head_dim, model.v_head_dim


def attention_flops(model: Model, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs per token of QK^T and PV: 6 x L x h x (d_qk + d_v) x seq, halved when causal."""
    L, h, dqk, dv = attention_dims(model)
    f = 6.0 * L * h * (dqk + dv) * seq_len
    return f / 2 if causal else f


def training_flops_per_token(model: Model, seq_len: int = 4096, causal: bool = True,
                             convention: str = "matmul") -> TokenFlops:
    """FLOPs per trained token; ``convention`` 'matmul' (design section 5) or 'params' (6 x activated w/o input
    embedding, the report's 36.63B, norms included)."""
    if convention == "matmul":
        n = matmul_params(model)
    elif convention == "params":
        n = count_params(model).activated_params(input_embedding=False)
    else:
        raise ValueError(f"convention must be 'matmul' or 'params', not {convention!r}")
    return TokenFlops(6.0 * n, attention_flops(model, seq_len, causal), seq_len, causal)
