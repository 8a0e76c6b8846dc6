"""Model configuration: Hugging Face ``DeepseekV3Config`` field names, presets and validation.

Field names match the keys of a DeepSeek ``config.json`` so one maps onto the other 1:1. YaRN is an explicit
``rope_scaling`` block (never implied by a sequence length). Two fields are ours: ``scoring_func`` and
``topk_method`` (DeepSeek's own config spells them too), and ``mtp_hidden_norm``, which says whether the
MTP module receives the main model's hidden state before or after the final RMSNorm.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dsv3.errors import UserError

SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
MTP_HIDDEN_NORMS = ("post", "pre")


@dataclass
class RopeScaling:
    """YaRN context extension (the only scaling DeepSeek models use)."""

    type: str = "yarn"
    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


@dataclass
class ModelConfig:
    """Every architectural constant of a DeepSeek-V3-family model (HF field names)."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    initializer_range: float = 0.006
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)
    num_nextn_predict_layers: int = 1
    mtp_hidden_norm: str = "post"
    bos_token_id: int = 0
    eos_token_id: int = 1
    tie_word_embeddings: bool = False
    attention_bias: bool = False

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return max(0, self.num_hidden_layers - self.first_k_dense_replace)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """MoE layers are all layers from ``first_k_dense_replace`` on (MTP layers are MoE too)."""
        return layer_idx >= self.first_k_dense_replace and self.n_routed_experts > 0

    @property
    def uses_bias_balancing(self) -> bool:
        """The e_score_correction_bias only exists for DeepSeek-V3's ``noaux_tc`` routing."""
        return self.topk_method == "noaux_tc"

    @property
    def softmax_scale(self) -> float:
        """(nope+rope)^-0.5, times mscale^2 when YaRN is on (V3: 0.135234)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_scaling is not None and self.rope_scaling.mscale_all_dim:
            m = yarn_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim)
            scale *= m * m
        return scale

    # -------------------------------------------------------------- validation
    def validate(self) -> "ModelConfig":
        """Raise UserError naming the first bad field and what it may be; return self when valid."""
        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                    "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "max_position_embeddings"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"model.{name} = {value!r} is invalid: it must be a positive integer")
        nonneg = ["n_shared_experts", "n_routed_experts", "first_k_dense_replace", "num_nextn_predict_layers",
                  "intermediate_size", "moe_intermediate_size"]
        for name in nonneg:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UserError(f"model.{name} = {value!r} is invalid: it must be an integer >= 0")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise UserError(f"model.q_lora_rank = {self.q_lora_rank!r} is invalid: use a positive integer, "
                            "or omit it (None) for a plain q_proj")
        if self.qk_rope_head_dim % 2:
            raise UserError(f"model.qk_rope_head_dim = {self.qk_rope_head_dim} is invalid: RoPE rotates pairs, "
                            "so it must be even")
        if self.num_key_value_heads != self.num_attention_heads:
            raise UserError(f"model.num_key_value_heads = {self.num_key_value_heads} is invalid: MLA has one "
                            f"key/value per head, so it must equal num_attention_heads ({self.num_attention_heads})")
        if self.scoring_func not in SCORING_FUNCS:
            raise UserError(f"model.scoring_func = {self.scoring_func!r} is invalid: allowed values are "
                            f"{', '.join(SCORING_FUNCS)}")
        if self.topk_method not in TOPK_METHODS:
            raise UserError(f"model.topk_method = {self.topk_method!r} is invalid: allowed values are "
                            f"{', '.join(TOPK_METHODS)}")
        if self.mtp_hidden_norm not in MTP_HIDDEN_NORMS:
            raise UserError(f"model.mtp_hidden_norm = {self.mtp_hidden_norm!r} is invalid: allowed values are "
                            f"{', '.join(MTP_HIDDEN_NORMS)}")
        if self.hidden_act != "silu":
            raise UserError(f"model.hidden_act = {self.hidden_act!r} is invalid: only 'silu' (SwiGLU) is supported")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise UserError(f"model.first_k_dense_replace = {self.first_k_dense_replace} is invalid: it must be "
                            f"<= num_hidden_layers ({self.num_hidden_layers})")
        has_dense = self.first_k_dense_replace > 0
        if has_dense and self.intermediate_size <= 0:
            raise UserError("model.intermediate_size must be > 0 when first_k_dense_replace > 0")
        if self.num_moe_layers > 0 or self.num_nextn_predict_layers > 0:
            self._validate_moe()
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            if rs.type != "yarn":
                raise UserError(f"model.rope_scaling.type = {rs.type!r} is invalid: only 'yarn' is supported "
                                "(or omit rope_scaling)")
            if rs.factor < 1.0:
                raise UserError(f"model.rope_scaling.factor = {rs.factor} is invalid: it must be >= 1")
        if not (self.rms_norm_eps > 0 and self.initializer_range > 0 and self.rope_theta > 0):
            raise UserError("model.rms_norm_eps, model.initializer_range and model.rope_theta must be > 0")
        return self

    def _validate_moe(self) -> None:
        E, K = self.n_routed_experts, self.num_experts_per_tok
        if E <= 0 or self.moe_intermediate_size <= 0:
            raise UserError("model.n_routed_experts and model.moe_intermediate_size must be > 0 for MoE layers")
        if not 1 <= K <= E:
            raise UserError(f"model.num_experts_per_tok = {K} is invalid: it must be between 1 and "
                            f"n_routed_experts ({E})")
        if self.n_group < 1 or E % self.n_group:
            raise UserError(f"model.n_group = {self.n_group} is invalid: it must be >= 1 and divide "
                            f"n_routed_experts ({E})")
        if not 1 <= self.topk_group <= self.n_group:
            raise UserError(f"model.topk_group = {self.topk_group} is invalid: it must be between 1 and "
                            f"n_group ({self.n_group})")
        per_group = E // self.n_group
        if self.topk_method == "noaux_tc" and self.n_group > 1 and per_group < 2:
            raise UserError(f"model.n_group = {self.n_group} is invalid: noaux_tc scores a group by its top-2 "
                            "experts, so each group needs at least 2 experts")
        if self.topk_group * per_group < K:
            raise UserError(f"model.topk_group = {self.topk_group} is invalid: the kept groups hold "
                            f"{self.topk_group * per_group} experts, fewer than num_experts_per_tok ({K})")

    # ------------------------------------------------------------ conversions
    def to_dict(self) -> dict[str, Any]:
        """Plain dict of our fields (rope_scaling as a dict or None)."""
        return dataclasses.asdict(self)

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` that transformers loads as DeepseekV3ForCausalLM and DeepSeek's code reads too."""
        d = self.to_dict()
        d.pop("mtp_hidden_norm")
        rs = d.pop("rope_scaling")
        if rs is not None:
            rs = dict(rs)
            kind = rs.pop("type")
            d["rope_scaling"] = {"type": kind, "rope_type": kind, **rs}
            d["rope_parameters"] = {"rope_type": kind, "rope_theta": self.rope_theta, **rs}
        else:
            d["rope_scaling"] = None
            d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        d.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", rope_interleave=True,
                 moe_layer_freq=1, num_mtp_layers=self.num_nextn_predict_layers, dsv3_mtp_hidden_norm=self.mtp_hidden_norm)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, strict: bool = True, where: str = "model") -> "ModelConfig":
        """Build from our dict or a HF ``config.json`` dict; ``strict`` rejects unknown keys by name."""
        d = dict(d)
        known = {f.name for f in fields(cls)}
        # HF spellings of the same thing.
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            d["num_nextn_predict_layers"] = d["num_mtp_layers"]
        if not strict:  # a foreign config.json that says nothing of MTP has none (e.g. DeepSeek-V2's)
            d.setdefault("num_nextn_predict_layers", 0)
        if "dsv3_mtp_hidden_norm" in d:
            d["mtp_hidden_norm"] = d.pop("dsv3_mtp_hidden_norm")
        rope = _rope_from_hf(d)
        d.pop("rope_parameters", None)
        d["rope_scaling"] = rope
        if d.get("rope_theta") is None:
            d.pop("rope_theta", None)
        if d.get("moe_layer_freq", 1) != 1:
            raise UserError(f"{where}.moe_layer_freq = {d['moe_layer_freq']!r} is not supported: only 1 "
                            "(every layer after first_k_dense_replace is MoE)")
        if d.get("num_key_value_heads") is None:
            d["num_key_value_heads"] = d.get("num_attention_heads", cls.num_attention_heads)
        if d.get("n_group") is None:
            d["n_group"] = 1
        if d.get("topk_group") is None:
            d["topk_group"] = 1
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = d["eos_token_id"][0]
        if "topk_method" not in d and d.get("scoring_func") == "softmax":
            d["topk_method"] = "greedy"
        unknown = sorted(k for k in d if k not in known)
        if unknown and strict:
            close = ", ".join(sorted(known))
            raise UserError(f"unknown key {where}.{unknown[0]}: valid model keys are {close}")
        kwargs = {k: v for k, v in d.items() if k in known}
        for k in ("routed_scaling_factor", "rope_theta", "rms_norm_eps", "initializer_range"):
            if k in kwargs and isinstance(kwargs[k], int) and not isinstance(kwargs[k], bool):
                kwargs[k] = float(kwargs[k])
        _check_types(kwargs, where)
        return cls(**kwargs).validate()

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        """Read a Hugging Face ``config.json`` (DeepSeek's or transformers' spelling)."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"config file {path} does not exist: pass a checkpoint directory holding config.json")
        except json.JSONDecodeError as e:
            raise UserError(f"config file {path} is not valid JSON ({e}): fix or re-export it")
        return cls.from_dict(d, strict=False, where=str(path.name))

    def replace(self, **changes: Any) -> "ModelConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes).validate()


def _rope_from_hf(d: dict[str, Any]) -> RopeScaling | None:
    """Read YaRN from ``rope_scaling`` (DeepSeek's config.json) or ``rope_parameters`` (transformers 5)."""
    rs = d.get("rope_scaling")
    rp = d.get("rope_parameters")
    if isinstance(rs, RopeScaling):
        return rs
    src = rs if isinstance(rs, dict) else None
    if src is None and isinstance(rp, dict):
        if "rope_theta" in rp and "rope_theta" not in d:
            d["rope_theta"] = rp["rope_theta"]
        if rp.get("rope_type", "default") not in ("default", None):
            src = rp
    if src is None:
        return None
    kind = src.get("type") or src.get("rope_type") or "yarn"
    if kind == "default":
        return None
    allowed = {f.name for f in fields(RopeScaling)}
    kw = {k: v for k, v in src.items() if k in allowed and k != "type"}
    for k in ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        if k in kw and kw[k] is not None:
            kw[k] = float(kw[k])
    # transformers writes mscale/mscale_all_dim only when set; DeepSeek's defaults are 1 and 0 respectively,
    # so a missing mscale_all_dim means "no softmax rescale".
    kw.setdefault("mscale_all_dim", 0.0)
    kw.setdefault("mscale", 1.0)
    return RopeScaling(type=kind, **{k: v for k, v in kw.items() if v is not None})


_TYPES = {f.name: f.type for f in fields(ModelConfig)}


def _check_types(kwargs: dict[str, Any], where: str) -> None:
    for k, v in kwargs.items():
        t = str(_TYPES[k])
        if k == "rope_scaling":
            continue
        ok = True
        if t.startswith("int"):
            ok = (isinstance(v, int) and not isinstance(v, bool)) or (v is None and "None" in t)
        elif t.startswith("float"):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        elif t == "bool":
            ok = isinstance(v, bool)
        elif t == "str":
            ok = isinstance(v, str)
        if not ok:
            raise UserError(f"{where}.{k} = {v!r} has the wrong type: expected {t}")


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN attention temperature: 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    if factor <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


# ----------------------------------------------------------------------------- presets
def _v3() -> ModelConfig:
    return ModelConfig()


def _v2_lite() -> ModelConfig:
    return ModelConfig(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
        n_routed_experts=64, routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
        v_head_dim=128, qk_nope_head_dim=128, n_group=1, topk_group=1, num_experts_per_tok=6,
        first_k_dense_replace=1, norm_topk_prob=False, scoring_func="softmax", topk_method="greedy",
        max_position_embeddings=163840, rope_theta=10000.0,
        rope_scaling=RopeScaling(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
                                 mscale=0.707, mscale_all_dim=0.707),
        num_nextn_predict_layers=0, bos_token_id=100000, eos_token_id=100001, initializer_range=0.02)


def _moonlight() -> ModelConfig:
    # moonshotai/Moonlight-16B-A3B config.json (model_type deepseek_v3).
    return ModelConfig(
        vocab_size=163840, hidden_size=2048, intermediate_size=11264, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
        n_routed_experts=64, routed_scaling_factor=2.446, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
        v_head_dim=128, qk_nope_head_dim=128, n_group=1, topk_group=1, num_experts_per_tok=6,
        first_k_dense_replace=1, norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc",
        max_position_embeddings=8192, rope_theta=50000.0, rope_scaling=None, rms_norm_eps=1e-5,
        num_nextn_predict_layers=0, bos_token_id=163584, eos_token_id=163585, initializer_range=0.02)


def _small() -> ModelConfig:
    # ~2.5B total, ~0.4B activated; V3's shape (sigmoid, 8 groups / 4, q_lora, 1 shared, MTP 1) at d=1536.
    return ModelConfig(
        vocab_size=32768, hidden_size=1536, intermediate_size=4096, moe_intermediate_size=512,
        num_hidden_layers=16, num_attention_heads=12, num_key_value_heads=12, n_shared_experts=1,
        n_routed_experts=64, routed_scaling_factor=2.5, kv_lora_rank=256, q_lora_rank=512, qk_rope_head_dim=64,
        v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=6,
        first_k_dense_replace=1, max_position_embeddings=4096, rope_scaling=None, num_nextn_predict_layers=1,
        initializer_range=0.02)


def _tiny() -> ModelConfig:
    # Trains on a 2-core CPU in seconds; keeps every V3 mechanism on.
    return ModelConfig(
        vocab_size=4096, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
        n_routed_experts=16, routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=64, qk_rope_head_dim=16,
        v_head_dim=32, qk_nope_head_dim=32, n_group=4, topk_group=2, num_experts_per_tok=4,
        first_k_dense_replace=1, max_position_embeddings=1024, rope_scaling=None, num_nextn_predict_layers=1,
        initializer_range=0.02)


PRESETS = {"tiny": _tiny, "small": _small, "v2-lite": _v2_lite, "v3": _v3, "moonlight-16b-a3b": _moonlight}


def preset(name: str) -> ModelConfig:
    """A named preset, validated; unknown names raise UserError listing the known ones."""
    try:
        return PRESETS[name]().validate()
    except KeyError:
        raise UserError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)}") from None
