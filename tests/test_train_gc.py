"""``train.gc_every``: automatic garbage collection off while training, collections at fixed steps; and the
property that makes that safe: a training step leaves no reference cycles holding tensors (memory that only a
collection would free)."""
from __future__ import annotations

import gc
from pathlib import Path

import torch

from dsv3.train.config import apply_overrides, resolve
from dsv3.train.gc_schedule import ScheduledGC
from dsv3.train.trainer import Trainer


def test_schedule_turns_collection_off_and_collects_on_due_steps(monkeypatch):
    assert gc.isenabled()
    calls = []
    real = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append(a) or real(*a))
    with ScheduledGC(50) as s:
        assert not gc.isenabled() and gc.get_freeze_count() > 0
        calls.clear()
        assert [s.step(n) for n in (0, 1, 49, 50, 51, 100)] == [False, False, False, True, False, True]
        assert len(calls) == 2
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_zero_leaves_collection_alone():
    with ScheduledGC(0) as s:
        assert gc.isenabled() and gc.get_freeze_count() == 0
        assert not s.step(50)
    assert gc.isenabled()


def test_training_steps_leave_no_cycles_holding_tensors(train_data, tmp_path):
    sets = ["model.vocab_size=512", "model.num_hidden_layers=2", "train.seq_len=32", "train.batch_size=4",
            "train.micro_batch_size=2", "train.tensorboard=false", "train.peak_tflops=1.0", "train.steps=4",
            "train.eval_batches=0", "train.sample_tokens=0", "train.save_final=false", 'train.precision="fp32"',
            "train.gc_every=0"]
    (tmp_path / "run").mkdir()
    tr = Trainer(resolve(apply_overrides({}, sets)), tmp_path / "run", Path(train_data), quiet=True)
    try:
        tr.train(until=1)                     # first-step set-up (optimizer state, caches) outside the check
        gc.collect()
        gc.disable()
        try:
            tr.train(until=4)
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            held = []
            for obj in gc.garbage:
                try:
                    if isinstance(obj, torch.Tensor):
                        held.append(tuple(obj.shape))
                except ReferenceError:
                    pass
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        assert held == []
    finally:
        tr.close()
