"""KV-cache bytes per token and per request.

MLA absorbed (what DeepSeek serves): the normalized latent (kv_lora_rank) plus one rotary key (rope dim) per
layer. MLA naive: full per-head keys (nope + rope) and values. GQA/MHA: 2 x kv_heads x head_dim per layer.
The Insights paper's Table 1 (BF16): V3 70,272 B; Qwen2.5-72B 327,680 B (4.66x); Llama-3.1-405B 516,096 B. The
paper prints 7.28x for Llama; 516,096 / 70,272 is 7.34x, which is what we print.
"""
from __future__ import annotations

from dsv3.plan.models import Model, is_dense

BYTES = {"bf16": 2, "fp16": 2, "fp8": 1, "fp32": 4}
FORMS = ("absorbed", "naive")


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype name (bf16, fp16, fp8, fp32)."""
    try:
        return BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(BYTES)}") from None


def values_per_token_per_layer(model: Model, form: str = "absorbed") -> int:
    """Cached values one token adds to one layer."""
    if is_dense(model):
        return 2 * model.num_key_value_heads * model.head_dim
    if form == "absorbed":
        return model.kv_lora_rank + model.qk_rope_head_dim
    if form == "naive":
        return model.num_attention_heads * (model.qk_head_dim + model.v_head_dim)
    raise ValueError(f"unknown KV-cache form {form!r}: use one of {', '.join(FORMS)}")


def kv_bytes_per_token(model: Model, dtype: str = "bf16", form: str = "absorbed") -> int:
    """Bytes per token over all layers of the main model (MTP draft layers not included)."""
    return values_per_token_per_layer(model, form) * model.num_hidden_layers * dtype_bytes(dtype)


def kv_bytes_per_request(model: Model, context: int, dtype: str = "bf16", form: str = "absorbed") -> int:
    """Bytes for one request holding ``context`` tokens."""
    return kv_bytes_per_token(model, dtype, form) * context
