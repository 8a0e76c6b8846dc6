"""Training checkpoints: atomic, self-describing, last N kept; and loading a model back from a run.

Layout of a run directory::

    RUN_DIR/config.json                       resolved run config (model fields, train, data)
    RUN_DIR/metrics.jsonl, eval.jsonl, expert_load.jsonl
    RUN_DIR/checkpoints/step_000100/
        model.pt        model state dict (fp32 master weights + balance biases, which are buffers)
        optimizer.pt    optimizer state dict
        trainer.pt      step, tokens, loader state, NaN counters, RNG states (python, numpy, torch cpu/cuda)
        config.json     the run config again, so a checkpoint directory stands on its own

A checkpoint is written into ``.step_000100.tmp`` and renamed into place, so a reader never sees half of
one; a crash mid-write leaves only a temporary directory that the next save removes.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from dsv3.errors import UserError
from dsv3.train.config import RunConfig

CKPT_DIR = "checkpoints"
NAME = re.compile(r"^step_(\d{6,})$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    d = Path(run_dir) / CKPT_DIR
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and NAME.match(p.name) and (p / "trainer.pt").is_file()]
    return sorted(found, key=lambda p: int(NAME.match(p.name).group(1)))


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step_{step:06d}"


def save_checkpoint(run_dir: Path, step: int, cfg: RunConfig, model_state: dict, optimizer_state: dict,
                    trainer_state: dict, keep: int) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep``.

    The states are layout-independent (full expert tensors, optimizer state keyed by parameter name), so a
    checkpoint written at one (pp, dp, ep) resumes at another."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(run_dir, step)
    tmp = root / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    torch.save(model_state, tmp / "model.pt")
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save({**trainer_state, "rng": rng_state()}, tmp / "trainer.pt")
    (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
    if final.exists():  # the same step saved twice (e.g. interrupt right after a periodic save)
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load(path: Path, what: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise UserError(f"checkpoint file {path} is missing; resume from another checkpoint or start a new run") from None
    except Exception as e:  # truncated / corrupt pickle or zip
        raise UserError(f"checkpoint file {path} ({what}) is corrupt or truncated ({type(e).__name__}); delete "
                        f"{path.parent} to fall back to the previous checkpoint") from None


def load_checkpoint(ckpt: Path) -> dict:
    """{'model': state dict, 'optimizer': state dict, 'trainer': dict} of one checkpoint directory."""
    ckpt = Path(ckpt)
    return {"model": _load(ckpt / "model.pt", "model weights"),
            "optimizer": _load(ckpt / "optimizer.pt", "optimizer state"),
            "trainer": _load(ckpt / "trainer.pt", "trainer state")}


def read_run_config(path: Path) -> RunConfig:
    """The resolved config of a run or checkpoint directory."""
    f = Path(path) / "config.json"
    try:
        return RunConfig.from_saved(json.loads(f.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise UserError(f"{path} is not a dsv3 run (no config.json); pass a directory written by `dsv3 train`") from None
    except (json.JSONDecodeError, KeyError) as e:
        raise UserError(f"{f} is unreadable ({type(e).__name__}); restore it or start a new run") from None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a run directory (its newest checkpoint) or a checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; pass a run directory written by `dsv3 train`")
    if (path / "trainer.pt").is_file():
        return path
    ckpts = list_checkpoints(path)
    if not ckpts:
        raise UserError(f"{path} holds no checkpoint; pass a run directory written by `dsv3 train` "
                        "(a run saves one every train.save_every steps and at the end)")
    return ckpts[-1]


def load_model_from_run(run_or_ckpt_dir: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode with the checkpoint's weights and biases, RunConfig) for export / generate / eval."""
    from dsv3.model import DeepseekV3

    ckpt = resolve_checkpoint(run_or_ckpt_dir)
    cfg = read_run_config(ckpt)
    with torch.device("meta"):
        model = DeepseekV3(cfg.model)
    state = _load(ckpt / "model.pt", "model weights")
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise UserError(f"{ckpt}/model.pt does not match its config.json ({str(e).splitlines()[0]}); "
                        "the checkpoint is damaged: use another one") from None
    # Built on the meta device (no init cost for big models); non-persistent buffers (rotary table, expert
    # counters) are not in the state dict and are rebuilt on the CPU.
    _materialize_buffers(model, cfg)
    return model.to(device).eval(), cfg


def _materialize_buffers(model, cfg: RunConfig) -> None:
    """Replace meta buffers (not saved in the state dict) with values from a CPU-built twin module."""
    from dsv3.model.rope import RotaryEmbedding

    meta = [n for n, b in model.named_buffers() if b.is_meta]
    if not meta:
        return
    model.rotary = RotaryEmbedding(cfg.model)
    for moe in model.moe_layers():
        if moe.tokens_per_expert.is_meta:
            moe.tokens_per_expert = torch.zeros(cfg.model.n_routed_experts, dtype=torch.int64)
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"buffers left on the meta device: {left}")
