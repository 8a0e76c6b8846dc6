"""Read the MODEL argument of `dsv3 plan`: a preset name, a TOML run config, or a Hugging Face ``config.json``.

Two families come back:

* ``ModelConfig`` (dsv3.config) for DeepSeek-V2/V3-style MLA + MoE configs;
* ``DenseConfig`` (below) for Llama/Qwen-style dense GQA configs, which ModelConfig cannot represent and which
  the calculators accept so that users can compare against the dense models the papers compare against.
"""
from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from dsv3.config import PRESETS, ModelConfig, preset
from dsv3.errors import UserError

# model_type values that mean "dense decoder with (grouped-query) multi-head attention and SwiGLU".
DENSE_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "olmo", "olmo2", "granite", "phi3",
                     "yi", "internlm2", "starcoder2", "cohere")
MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "kimi_k2")


@dataclass(frozen=True)
class DenseConfig:
    """A dense GQA/MHA transformer: the fields `dsv3 plan` needs from a Llama/Qwen ``config.json``."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has q/k/v biases; counted as parameters, no FLOPs worth mentioning
    name: str = "dense"


Model = Union[ModelConfig, DenseConfig]


def is_dense(model: Model) -> bool:
    """True for a dense GQA config, False for an MLA/MoE ModelConfig."""
    return isinstance(model, DenseConfig)


def load_model(spec: str) -> tuple[Model, str]:
    """Resolve MODEL (preset, ``.toml``, ``config.json`` or a directory holding one) to a config and a label."""
    if spec in PRESETS:
        return preset(spec), spec
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".toml":
        return _from_toml(path), path.stem
    if path.suffix == ".json" or path.name == "config.json":
        return _from_json(path), (path.parent.name if path.name == "config.json" else path.stem)
    raise UserError(f"unknown model {spec!r}: pass a preset ({', '.join(PRESETS)}), a TOML run config, or a "
                    "Hugging Face config.json (plan sub-verbs are memory, decode, network, cost, pipeline)")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"model config {path} does not exist: pass a preset name or an existing config.json") from None
    except json.JSONDecodeError as e:
        raise UserError(f"model config {path} is not valid JSON ({e}): fix the file") from None


def _from_json(path: Path) -> Model:
    d = _read_json(path)
    kind = str(d.get("model_type", "")).lower()
    if kind in DENSE_MODEL_TYPES or (not kind and "kv_lora_rank" not in d):
        return dense_from_dict(d, where=path.name, name=path.parent.name if path.name == "config.json" else path.stem)
    if kind and kind not in MLA_MODEL_TYPES:
        raise UserError(f"{path}: model_type {kind!r} is not supported: use a DeepSeek (deepseek_v2/deepseek_v3) "
                        f"or dense ({', '.join(DENSE_MODEL_TYPES[:4])}, ...) config.json")
    return mla_from_dict(d, where=path.name)


def mla_from_dict(d: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """A DeepSeek-family config from a HF dict; a config without MTP keys has no MTP module."""
    d = dict(d)
    # ModelConfig defaults to V3's one MTP layer; a DeepSeek-V2 config.json simply has no such key, and
    # counting an MTP module it does not have would inflate every number we print.
    if "num_nextn_predict_layers" not in d and "num_mtp_layers" not in d:
        d["num_nextn_predict_layers"] = 0
    return ModelConfig.from_dict(d, strict=False, where=where)


def dense_from_dict(d: dict[str, Any], where: str = "config.json", name: str = "dense") -> DenseConfig:
    """Read the dense fields of a Llama/Qwen ``config.json`` (head_dim defaults to hidden/heads)."""
    def need(key: str) -> int:
        v = d.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise UserError(f"{where}: {key} = {v!r} is missing or invalid: a dense config needs a positive integer")
        return v

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    kv = d.get("num_key_value_heads") or heads
    head_dim = d.get("head_dim") or hidden // heads
    if not isinstance(kv, int) or heads % kv:
        raise UserError(f"{where}: num_key_value_heads = {kv!r} must divide num_attention_heads ({heads})")
    kind = str(d.get("model_type", ""))
    return DenseConfig(hidden_size=hidden, num_hidden_layers=need("num_hidden_layers"), num_attention_heads=heads,
                       num_key_value_heads=kv, head_dim=int(head_dim), intermediate_size=need("intermediate_size"),
                       vocab_size=need("vocab_size"), tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                       attention_bias=bool(d.get("attention_bias", kind == "qwen2")), name=name)


def _from_toml(path: Path) -> ModelConfig:
    """A run config: ``[model]`` holds ``preset = "name"`` and/or HF field overrides."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"run config {path} does not exist: pass an existing TOML file or a preset name") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"run config {path} is not valid TOML ({e}): fix the file") from None
    table = dict(data.get("model", {}))
    name = table.pop("preset", None)
    if name is None and not table:
        raise UserError(f"{path} has no [model] table: add [model] with preset = \"tiny\" (or HF fields)")
    base = preset(name).to_dict() if name else {}
    base.update(table)
    return ModelConfig.from_dict(base, strict=True, where=f"{path.name}:model")
