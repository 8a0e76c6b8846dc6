"""Exact resume (bit-identical losses and weights), CPU determinism, NaN skips, SIGTERM checkpointing."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dsv3.errors import UserError
from dsv3.train import checkpoint
from dsv3.train.config import apply_overrides, resolve
from dsv3.train.trainer import Trainer

BASE = ["model.vocab_size=512", "model.num_hidden_layers=2", "train.seq_len=32", "train.batch_size=4",
        "train.micro_batch_size=2", "train.tensorboard=false", "train.peak_tflops=1.0", "train.warmup_steps=2",
        "train.eval_batches=1", "train.bias_gamma=0.01", "train.precision=\"fp32\""]


def _cfg(extra=()):
    return resolve(apply_overrides({}, BASE + list(extra)))


def _losses(run_dir: Path) -> list:
    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train(cfg, run_dir, data, until=None, resume=None):
    run_dir.mkdir(exist_ok=True)
    tr = Trainer(cfg, run_dir, data, resume=resume, quiet=True)
    try:
        assert tr.train(until=until) == 0
        return {k: v.clone() for k, v in tr.model.state_dict().items()}
    finally:
        tr.close()


def test_exact_resume_and_determinism(train_data, tmp_path):
    # 8 steps with accumulation, a batch ramp (4 -> 8 over 4 steps), LR decay, MTP and gamma switches.
    cfg = _cfg(["train.steps=8", "train.batch_size=8", "train.batch_ramp_start=4", "train.batch_ramp_steps=4",
                "train.save_every=100", "train.bf16_moments=true"])
    full = _train(cfg, tmp_path / "a", train_data)
    again = _train(cfg, tmp_path / "a2", train_data)
    # FP32 on CPU is deterministic: two fresh runs agree bit for bit.
    assert _losses(tmp_path / "a") == _losses(tmp_path / "a2")
    assert all(torch.equal(full[k], again[k]) for k in full)

    _train(cfg, tmp_path / "b", train_data, until=4)
    ckpt = checkpoint.list_checkpoints(tmp_path / "b")[-1]
    assert ckpt.name == "step_000004"
    resumed = _train(cfg, tmp_path / "b", train_data, resume=ckpt)
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert len(a) == len(b) == 8 and a == b  # bit-identical losses (JSON round-trips floats exactly)
    for k in full:
        assert torch.equal(full[k], resumed[k]), k  # weights and balance biases identical
    batches = [json.loads(l)["batch_size"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert batches[0] == 4 and batches[-1] == 8


def test_checkpoints_are_atomic_and_pruned(train_data, tmp_path):
    cfg = _cfg(["train.steps=5", "train.save_every=1", "train.keep_checkpoints=2"])
    _train(cfg, tmp_path, train_data)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_000004", "step_000005"]  # last 2 kept, no temporary dirs left
    model, run_cfg = checkpoint.load_model_from_run(tmp_path)
    saved = torch.load(tmp_path / "checkpoints" / "step_000005" / "model.pt")
    assert run_cfg.model == cfg.model
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k])


def _nan_on(model, calls: set):
    """Make the forward calls numbered in ``calls`` (1-based) return a NaN loss."""
    orig, n = model.forward, [0]

    def forward(*a, **k):
        out = orig(*a, **k)
        n[0] += 1
        if n[0] in calls:
            out.loss = out.loss * float("nan")
        return out

    model.forward = forward


def test_nan_step_is_skipped(train_data, tmp_path):
    cfg = _cfg(["train.steps=3", "train.micro_batch_size=4"])  # one forward per step
    tr = Trainer(cfg, tmp_path, train_data, quiet=True)
    try:
        _nan_on(tr.model, {2})
        tr.metrics_log = tr.eval_log = tr.expert_log = None
        tr.train_step()
        before = {k: v.clone() for k, v in tr.model.state_dict().items()}
        opt_before = {id(p): {k: v.clone() for k, v in s.items()} for p, s in tr.optimizer.state.items()}
        rec = tr.train_step()
        assert rec["skipped"] and rec["nan_skips"] == 1 and math.isnan(rec["loss"])
        for k, v in tr.model.state_dict().items():
            assert torch.equal(v, before[k]), k  # no update: weights and biases untouched
        for p, s in tr.optimizer.state.items():
            assert all(torch.equal(v, opt_before[id(p)][k]) for k, v in s.items())
        assert all(int(m.tokens_per_expert.sum()) == 0 for m in tr.model.moe_layers())
        rec = tr.train_step()
        assert not rec["skipped"] and tr.nan_streak == 0 and rec["nan_skips"] == 1
    finally:
        tr.close()


def test_repeated_nans_stop_the_run_keeping_last_checkpoint(train_data, tmp_path):
    cfg = _cfg(["train.steps=20", "train.micro_batch_size=4", "train.save_every=2", "train.max_nan_skips=3"])
    tr = Trainer(cfg, tmp_path, train_data, quiet=True)
    try:
        _nan_on(tr.model, set(range(5, 100)))
        with pytest.raises(UserError, match="3 non-finite losses in a row.*step_000004"):
            tr.train()
    finally:
        tr.close()
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_000002", "step_000004"]
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in recs] == [False] * 4 + [True] * 3


def test_sigterm_saves_a_checkpoint(train_data, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "dsv3", "train", "--data", str(train_data), "--out", str(run), "--quiet",
           "--set", "train.steps=100000", "--set", "train.save_every=100000"] + \
          [a for s in BASE for a in ("--set", s)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            m = run / "metrics.jsonl"
            if m.is_file() and len(m.read_text().splitlines()) >= 3:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    steps = len((run / "metrics.jsonl").read_text().splitlines())
    ckpts = checkpoint.list_checkpoints(run)
    assert [p.name for p in ckpts] == [f"step_{steps:06d}"]
    assert "--resume" in err


def test_padded_rows_train_and_evaluate(train_data, tmp_path):
    """The last window of an epoch and the last validation batch carry label -100 padding: no crash, and the
    padded positions do not change the main loss (independent check: loss over the valid prefix only)."""
    cfg = _cfg(["train.steps=1", "train.micro_batch_size=4"])
    tr = Trainer(cfg, tmp_path, train_data, quiet=True)
    try:
        ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(0))
        labels = ids.roll(-1, 1)
        padded = labels.clone()
        padded[0, 20:] = -100
        tr.model.eval()
        with torch.no_grad():
            out = tr.model(ids, padded, return_logits=True)
            ref = torch.nn.functional.cross_entropy(out.logits[0, :20].float(), labels[0, :20])
        assert torch.isfinite(out.loss) and torch.allclose(out.losses["main"], ref, rtol=1e-5)
        tr.model.train()
        assert math.isfinite(tr.evaluate()["loss"])  # the padded last validation batch included
    finally:
        tr.close()


def test_time_limit_ends_the_invocation_with_a_checkpoint(train_data, tmp_path):
    # A limit already passed after the first step: one step, a checkpoint, then resume runs to the end.
    cfg = _cfg(["train.steps=4", "train.save_every=100", "train.time_limit_min=1e-9"])
    _train(cfg, tmp_path / "r", train_data)
    assert len(_losses(tmp_path / "r")) == 1
    ckpt = checkpoint.list_checkpoints(tmp_path / "r")[-1]
    assert ckpt.name == "step_000001"
    cfg_free = _cfg(["train.steps=4", "train.save_every=100"])
    _train(cfg_free, tmp_path / "r", train_data, resume=ckpt)
    _train(cfg_free, tmp_path / "full", train_data)
    assert _losses(tmp_path / "r") == _losses(tmp_path / "full")


def test_config_of_an_earlier_version_still_resumes_with_its_dispatch():
    """A config.json written before session 11: a retired train key (optimizer_overlap) is dropped, and with no
    parallel.ep_dispatch saved the run keeps the dispatch it trained with ('alltoall'), so its resume is exact.
    New runs save 'auto' (the default) and get it back."""
    from dsv3.train.config import RunConfig
    new = resolve({"parallel": {"ep": 2}})
    assert new.parallel["ep_dispatch"] == "auto"
    d = new.to_dict()
    assert RunConfig.from_saved(d).parallel["ep_dispatch"] == "auto"
    d["train"]["optimizer_overlap"] = False
    del d["parallel"]["ep_dispatch"]
    old = RunConfig.from_saved(d)
    assert old.parallel["ep_dispatch"] == "alltoall" and old.train == new.train
