"""Hugging Face ``DeepseekV3ForCausalLM`` checkpoint import/export (sharded safetensors).

Our state dict differs from the HF one in two places only: routed experts are stacked ([E,F,D] per
projection) where HF stores ``experts.{e}.{proj}.weight``, and MTP depth k lives in ``mtp.{k-1}`` where HF
stores layer ``num_hidden_layers + k - 1`` with its own copies of ``embed_tokens`` and ``shared_head.head``.
``load_pretrained`` also reads DeepSeek's FP8 release (e4m3 weights with 128x128 ``weight_scale_inv``),
fused HF expert tensors (``experts.gate_up_proj``), V2-style configs, and checkpoints without MTP weights.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv3.config import ModelConfig
from dsv3.errors import UserError
from dsv3.model import DeepseekV3

INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 4 * 2**30
_EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
# Tensors that stay in high precision in DeepSeek's FP8 release.
_FP8_SKIP = re.compile(r"(embed_tokens|lm_head|shared_head\.head|norm|\.gate\.weight$|e_score_correction_bias|eh_proj)")


# ----------------------------------------------------------------------------- export
def to_hf_state_dict(model: DeepseekV3) -> dict[str, torch.Tensor]:
    """Our tensors under HF keys (experts unstacked, MTP as extra layers with embedding/head copies)."""
    cfg = model.config
    out: dict[str, torch.Tensor] = {}
    sd = model.state_dict()
    for key, t in sd.items():
        if key.startswith("mtp."):
            continue
        _put(out, _hf_key(key), t)
    L = cfg.num_hidden_layers
    for k in range(len(model.mtp)):
        prefix = f"mtp.{k}."
        for key, t in sd.items():
            if key.startswith(prefix):
                _put(out, f"model.layers.{L + k}.{key[len(prefix):]}", t)
        out[f"model.layers.{L + k}.embed_tokens.weight"] = sd["embed_tokens.weight"]
        out[f"model.layers.{L + k}.shared_head.head.weight"] = sd["lm_head.weight"]
    return out


def _hf_key(key: str) -> str:
    return key if key.startswith("lm_head.") else f"model.{key}"


def _put(out: dict[str, torch.Tensor], hf_key: str, t: torch.Tensor) -> None:
    m = re.match(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$", hf_key)
    if m:
        for e in range(t.shape[0]):
            out[f"{m.group(1)}.{e}.{m.group(2)}.weight"] = t[e]
    else:
        out[hf_key] = t


def save_pretrained(model: DeepseekV3, out_dir: str | Path, *, dtype: torch.dtype | None = None,
                    fp8: bool = False, fp8_pow2_scales: bool = False,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write ``config.json``, sharded ``model-XXXXX-of-YYYYY.safetensors`` and the index, atomically.

    ``dtype`` casts floating tensors (the router and balance bias stay fp32, as released). ``fp8=True``
    writes DeepSeek's block format: e4m3 matrices with fp32 ``weight_scale_inv`` per 128x128 block;
    ``fp8_pow2_scales`` rounds those scales to powers of two, which makes FP8 export -> load -> export exact
    (with free scales the re-derived scale can move by an ulp). Output is deterministic.
    """
    out_dir = Path(out_dir)
    tensors = to_hf_state_dict(model)
    tensors = {k: _cast(k, v, dtype) for k, v in tensors.items()}
    config = model.config.to_hf_dict()
    config["torch_dtype"] = str(dtype or next(iter(model.parameters())).dtype).replace("torch.", "")
    if fp8:
        tensors = _quantize_fp8(tensors, fp8_pow2_scales)
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [128, 128]}
    _atomic_write_dir(out_dir, lambda tmp: _write_shards(tmp, tensors, config, max_shard_bytes))
    return out_dir


def _cast(key: str, t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.detach().to("cpu")
    if dtype is None or not t.is_floating_point():
        return t.contiguous()
    if key.endswith("e_score_correction_bias") or key.endswith("mlp.gate.weight"):
        return t.float().contiguous()
    return t.to(dtype).contiguous()


def _quantize_fp8(tensors: dict[str, torch.Tensor], pow2: bool) -> dict[str, torch.Tensor]:
    from dsv3.fp8.blocks import quantize_weight_blocks

    out = {}
    for k, t in tensors.items():
        if t.ndim == 2 and k.endswith(".weight") and not _FP8_SKIP.search(k):
            w8, s = quantize_weight_blocks(t.float(), block=128, pow2_scale=pow2)
            out[k] = w8.contiguous()
            out[k[: -len("weight")] + "weight_scale_inv"] = s.float().contiguous()
        else:
            out[k] = t
    return out


def _write_shards(tmp: Path, tensors: dict[str, torch.Tensor], config: dict, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        # Views (experts unstacked, MTP copies) share storage; safetensors wants each tensor to own its memory.
        save_file({k: v.clone() for k, v in shard.items()}, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                             indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _atomic_write_dir(out_dir: Path, write) -> None:
    """Write into a temp dir beside out_dir, then swap it in: a failure never leaves a half-written export."""
    parent = out_dir.parent if str(out_dir.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
    except OSError as e:
        raise UserError(f"cannot write to {parent} ({e.strerror}): choose a writable output directory")
    try:
        write(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=parent))
            os.replace(out_dir, old / "x")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- import
def read_hf_tensors(ckpt_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) from every safetensors file of a checkpoint directory (index or single file)."""
    ckpt_dir = Path(ckpt_dir)
    index = ckpt_dir / INDEX_NAME
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in ckpt_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"no .safetensors files in {ckpt_dir}: pass a Hugging Face checkpoint directory")
    for name in files:
        path = ckpt_dir / name
        if not path.exists():
            raise UserError(f"checkpoint shard {path} is missing: re-download or re-export the checkpoint")
        try:
            with safe_open(str(path), framework="pt") as f:
                for k in f.keys():
                    yield k, f.get_tensor(k)
        except UserError:
            raise
        except Exception as e:  # safetensors raises its own error type for bad headers
            raise UserError(f"checkpoint shard {path} is corrupt or truncated ({e}): re-download or re-export it")


def from_hf_state_dict(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF keys -> our keys: dequantize FP8 blocks, restack experts, move the MTP layer into ``mtp.*``."""
    from dsv3.fp8.blocks import dequantize_weight_blocks

    tensors = dict(tensors)
    for k in [k for k in tensors if k.endswith("weight_scale_inv")]:
        wk = k[: -len("weight_scale_inv")] + "weight"
        tensors[wk] = dequantize_weight_blocks(tensors[wk], tensors.pop(k), block=128, dtype=torch.float32)
    L = config.num_hidden_layers
    ours: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _LAYER_RE.match(key)
        if m and int(m.group(1)) >= L:
            depth = int(m.group(1)) - L
            if depth >= config.num_nextn_predict_layers:
                continue  # e.g. an MTP layer the config does not ask for
            rest = m.group(2)
            if rest.startswith("embed_tokens.") or rest.startswith("shared_head.head."):
                continue  # copies of the shared embedding / head
            key = f"mtp.{depth}.{rest}"
        elif key.startswith("model."):
            key = key[len("model."):]
        em = re.match(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", key)
        if em:
            experts.setdefault((em.group(1), em.group(3)), {})[int(em.group(2))] = t
            continue
        fm = re.match(r"^(.*\.mlp\.experts)\.gate_up_proj$", key)
        if fm:  # transformers' fused in-memory layout [E, 2F, D]
            gate, up = t.chunk(2, dim=1)
            ours[f"{fm.group(1)}.gate_proj"], ours[f"{fm.group(1)}.up_proj"] = gate, up
            continue
        ours[key] = t
    for (prefix, proj), per_expert in experts.items():
        E = config.n_routed_experts
        missing = [e for e in range(E) if e not in per_expert]
        if missing:
            raise UserError(f"checkpoint lacks {prefix}.{missing[0]}.{proj}.weight: it does not match its config "
                            f"({E} routed experts); re-export it")
        ours[f"{prefix}.{proj}"] = torch.stack([per_expert[e] for e in range(E)])
    return ours


def load_pretrained(ckpt_dir: str | Path, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", config: ModelConfig | None = None) -> DeepseekV3:
    """Build our model from any DeepSeek-V3-family HF checkpoint directory (BF16, FP32 or FP8 blocks).

    A checkpoint without MTP weights (transformers saves none) loads with freshly initialized MTP modules
    and a note on stderr; pass ``config`` with ``num_nextn_predict_layers=0`` to drop them instead.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise UserError(f"checkpoint directory {ckpt_dir} does not exist: pass a directory with config.json "
                        "and *.safetensors")
    config = config or ModelConfig.from_json(ckpt_dir / "config.json")
    tensors = from_hf_state_dict(dict(read_hf_tensors(ckpt_dir)), config)
    model = DeepseekV3(config)
    expected = model.state_dict()
    mtp_missing = [k for k in expected if k.startswith("mtp.") and k not in tensors]
    if mtp_missing and len(mtp_missing) == sum(k.startswith("mtp.") for k in expected):
        import sys
        print(f"note: {ckpt_dir} has no MTP weights; the MTP module keeps its fresh initialization",
              file=sys.stderr)
        for k in mtp_missing:
            tensors[k] = expected[k]
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise UserError(f"checkpoint {ckpt_dir} does not match its config.json ({what}): re-export it")
    for k, t in tensors.items():
        if t.shape != expected[k].shape:
            raise UserError(f"checkpoint tensor {k} has shape {tuple(t.shape)} but the config needs "
                            f"{tuple(expected[k].shape)}: the checkpoint and config.json disagree")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})
    return model.to(device=device, dtype=dtype) if dtype != torch.float32 else model.to(device)
