"""`dsv3 export CKPT HF_DIR` and `dsv3 import HF_DIR OUT_DIR`, and loading any checkpoint kind by path.

Three kinds of directory hold a model:
- a Hugging Face checkpoint (config.json + *.safetensors), what `export` writes and the world publishes;
- a native model directory (model_config.json + model.safetensors with stacked experts), what `import` writes;
- a training run (or one of its checkpoints), what `dsv3 train` writes.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dsv3.config import ModelConfig
from dsv3.errors import UserError

NATIVE_CONFIG = "model_config.json"
NATIVE_WEIGHTS = "model.safetensors"
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a checkpoint in Hugging Face DeepseekV3ForCausalLM format",
                       description="Export a run, checkpoint or native model directory to a Hugging Face "
                                   "checkpoint (sharded safetensors + index + config.json) that "
                                   "transformers loads as DeepseekV3ForCausalLM.")
    p.add_argument("ckpt", help="run dir, checkpoint dir or native model dir")
    p.add_argument("out_dir", help="output directory (replaced atomically)")
    p.add_argument("--dtype", choices=list(_DTYPES), default="bf16", help="tensor dtype (default bf16)")
    p.add_argument("--fp8", action="store_true",
                   help="DeepSeek's FP8 release format: e4m3 weights with 128x128 weight_scale_inv")
    p.add_argument("--shard-gb", type=float, default=4.0, help="max shard size in GiB (default 4)")
    p.set_defaults(func=run_export)

    p = sub.add_parser("import", help="read a Hugging Face DeepSeek-V3-family checkpoint into dsv3's format",
                       description="Read any DeepSeek-V3-family HF checkpoint (BF16 or FP8 blocks, V2-Lite, "
                                   "with or without MTP weights) and write a native model directory.")
    p.add_argument("hf_dir", help="Hugging Face checkpoint directory")
    p.add_argument("out_dir", help="output directory")
    p.set_defaults(func=run_import)


def run_export(args: argparse.Namespace) -> int:
    from dsv3.hf import save_pretrained

    model, tokenizer_file = _load_with_tokenizer_file(args.ckpt)
    out = save_pretrained(model, args.out_dir, dtype=_DTYPES[args.dtype], fp8=args.fp8,
                          max_shard_bytes=int(args.shard_gb * 2**30))
    if tokenizer_file is not None:
        (out / "tokenizer.json").write_bytes(Path(tokenizer_file).read_bytes())
    print(f"exported {model.num_parameters():,} parameters to {out}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from dsv3.hf import _atomic_write_dir, load_pretrained

    src = Path(args.hf_dir)
    model = load_pretrained(src)

    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / NATIVE_WEIGHTS),
                  metadata={"format": "pt"})
        (tmp / NATIVE_CONFIG).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        if (src / "tokenizer.json").exists():
            (tmp / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())

    _atomic_write_dir(Path(args.out_dir), write)
    print(f"imported {model.num_parameters():,} parameters to {args.out_dir}")
    return 0


def load_any_checkpoint(path: str | Path, tokenizer_path: str | Path | None = None):
    """(model, tokenizers.Tokenizer or None) from a HF dir, a native dir, a run dir or a run checkpoint."""
    from tokenizers import Tokenizer

    model, tok_file = _load_with_tokenizer_file(path)
    tok_file = tokenizer_path or tok_file
    if tok_file is None:
        return model, None
    if not Path(tok_file).exists():
        raise UserError(f"tokenizer file {tok_file} does not exist: pass --tokenizer with a tokenizer.json")
    return model, Tokenizer.from_file(str(tok_file))


def _load_with_tokenizer_file(path: str | Path):
    from dsv3.hf import load_pretrained
    from dsv3.model import DeepseekV3

    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist: pass a run directory or a checkpoint directory")
    if (path / NATIVE_CONFIG).exists():
        from safetensors.torch import load_file

        cfg = ModelConfig.from_dict(json.loads((path / NATIVE_CONFIG).read_text()))
        model = DeepseekV3(cfg)
        model.load_state_dict(load_file(str(path / NATIVE_WEIGHTS)))
        return model, _first_existing(path / "tokenizer.json")
    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        return load_pretrained(path), _first_existing(path / "tokenizer.json")
    try:
        from dsv3.train.checkpoint import load_model_from_run
    except ImportError:
        raise UserError(f"{path} is neither a Hugging Face nor a dsv3 model directory: pass a run directory, "
                        "a checkpoint directory or an exported model") from None
    model, run_config = load_model_from_run(path)
    candidates = [path / "tokenizer.json", path.parent / "tokenizer.json", path.parent.parent / "tokenizer.json"]
    data_dir = _data_dir_of(run_config)
    if data_dir is not None:
        candidates.append(Path(data_dir) / "tokenizer.json")
    return model, _first_existing(*candidates)


def _data_dir_of(run_config) -> str | None:
    data = getattr(run_config, "data", None)
    if data is None and isinstance(run_config, dict):
        data = run_config.get("data")
    for attr in ("path", "dir", "data_dir"):
        value = getattr(data, attr, None) if not isinstance(data, dict) else data.get(attr)
        if value:
            return str(value)
    return None


def _first_existing(*paths: Path) -> Path | None:
    return next((p for p in paths if p.exists()), None)
