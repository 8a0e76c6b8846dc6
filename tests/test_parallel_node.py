"""A whole node's layouts on CPU (gloo): EP=8 over 8 processes, DualPipeV over 4 pipeline stages, and DualPipeV
PP=4 x EP=2 over 8 processes reproduce the single-process losses (fp32, relative error <= 1e-5)."""
from __future__ import annotations

import pytest

from test_parallel_cli import COMMON, _losses, _run, data_dir  # noqa: F401  (shared fixture and helpers)

STEPS = ["--set", "train.steps=4", "--set", "model.vocab_size=512", "--set", "model.num_hidden_layers=8"]  # 8 chunks for DualPipeV pp=4


@pytest.fixture(scope="module")
def single4(data_dir, tmp_path_factory):  # noqa: F811
    run = tmp_path_factory.mktemp("single4") / "run"
    r = _run([*COMMON, "--data", str(data_dir), "--out", str(run), *STEPS], 1)
    assert r.returncode == 0, r.stderr[-2000:]
    return run


@pytest.mark.parametrize("nproc, layout", [
    (8, ["--set", "parallel.ep=8"]),
    (4, ["--set", "parallel.pp=4", "--set", 'parallel.schedule="dualpipev"', "--set", "train.micro_batch_size=2"]),
    (8, ["--set", "parallel.pp=4", "--set", "parallel.ep=2", "--set", 'parallel.schedule="dualpipev"',
         "--set", "train.micro_batch_size=1"]),
], ids=["ep8", "pp4-dualpipev", "pp4xep2-dualpipev"])
def test_node_layouts_reproduce_single_process(data_dir, single4, tmp_path, nproc, layout):  # noqa: F811
    run = tmp_path / "run"
    r = _run([*COMMON, "--data", str(data_dir), "--out", str(run), *STEPS, *layout], nproc, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _losses(single4), _losses(run)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert abs(x - y) / abs(x) <= 1e-5, (a, b)
