"""`dsv3 train | eval | plot` through dsv3.cli.main: an end-to-end run, and every bad input -> exit 2, one line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dsv3.cli import main
from dsv3.train.config import TrainConfig, apply_overrides, config_help, parse_value, resolve
from dataclasses import fields

SETS = ["model.vocab_size=512", "model.num_hidden_layers=2", "train.seq_len=32", "train.batch_size=4",
        "train.tensorboard=false", "train.peak_tflops=1.0", "train.eval_batches=2", "train.sample_tokens=8",
        "train.steps=4", "train.save_every=2", "train.expert_load_every=1"]


def _args(*extra_sets):
    out = []
    for s in SETS + list(extra_sets):
        out += ["--set", s]
    return out


@pytest.fixture(scope="module")
def trained(train_data, tmp_path_factory):
    """A finished 4-step run (trained once for the module)."""
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--data", str(train_data), "--out", str(run), "--quiet"] + _args()) == 0
    return run


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()} if d.exists() else {}


def _fails(capsys, argv, *words):
    """Exit code 2 and a single 'error:' line mentioning each of ``words``."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for w in words:
        assert w in err[0], (w, err[0])
    return err[0]


def test_end_to_end_train_eval_plot(trained, capsys, train_data):
    recs = [json.loads(l) for l in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for key in ("loss", "lr", "tokens_per_s", "loss_main", "loss_mtp_1", "grad_norm", "maxvio", "tokens",
                "batch_size", "mfu"):
        assert key in recs[0], key
    assert recs[-1]["tokens"] == 4 * 4 * 32
    # loss = main + lambda * mtp + alpha * balance, as logged
    r = recs[0]
    assert r["loss"] == pytest.approx(r["loss_main"] + 0.3 * r["loss_mtp_1"] + 1e-4 * r["loss_balance"], rel=1e-5)
    cfg = json.loads((trained / "config.json").read_text())
    assert cfg["train"]["steps"] == 4 and cfg["model"]["num_hidden_layers"] == 2
    assert (trained / "checkpoints" / "step_000004").is_dir()
    assert len((trained / "expert_load.jsonl").read_text().splitlines()) == 4

    capsys.readouterr()
    assert main(["eval", "--ckpt", str(trained)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    last_eval = json.loads((trained / "eval.jsonl").read_text().splitlines()[-1])
    assert result["loss"] == pytest.approx(last_eval["loss"], rel=1e-6)  # same weights, same batches

    assert main(["plot", str(trained)]) == 0
    for name in ("loss.png", "expert_load.png"):
        data = (trained / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_resume_continues_and_extends(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert main(["train", "--resume", str(run), "--quiet", "--set", "train.steps=6"]) == 0
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_help_config_lists_every_key(capsys):
    assert main(["train", "--help-config"]) == 0
    text = capsys.readouterr().out
    for f in fields(TrainConfig):
        assert f"  {f.name} " in text, f.name
    assert config_help() in text


def test_set_values_are_toml_literals():
    assert parse_value("200") == 200 and parse_value("1e-4") == 1e-4 and parse_value("true") is True
    assert parse_value('"cpu"') == "cpu" and parse_value("cpu") == "cpu"
    cfg = resolve(apply_overrides({"train": {"steps": 5}}, ["train.steps=7", "model.hidden_size=64",
                                                            "train.device=cpu"]))
    assert cfg.train.steps == 7 and cfg.model.hidden_size == 64 and cfg.train.device == "cpu"
    assert cfg.model.num_hidden_layers == 4  # the rest of the tiny preset


@pytest.mark.parametrize("sets, words", [
    (["train.stepz=3"], ["train.stepz", "valid keys"]),
    (["train.steps=\"ten\""], ["train.steps", "wrong type", "int"]),
    (["train.lr=true"], ["train.lr", "wrong type"]),
    (["model.hidden=3"], ["model.hidden", "valid model keys"]),
    (["model.preset=\"huge\""], ["huge", "choose one of"]),
    (["train.precision=\"fp4\""], ["train.precision", "'bf16'", "'fp8'"]),
    (["train.batch_size=6", "train.micro_batch_size=4"], ["micro_batch_size", "multiple"]),
    (["bogus.key=1"], ["bogus.key", "section"]),
    (["train.device=\"tpu\""], ["train.device", "'cpu'"]),
])
def test_bad_config_values(capsys, tmp_path, train_data, sets, words):
    out = tmp_path / "run"
    _fails(capsys, ["train", "--data", str(train_data), "--out", str(out)] + _args(*sets), *words)
    assert not out.exists()


def test_bad_config_files(capsys, tmp_path, train_data):
    _fails(capsys, ["train", "--config", str(tmp_path / "none.toml")], "does not exist")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 3\n")
    _fails(capsys, ["train", "--config", str(bad)], "not valid TOML")
    bad.write_text("[trainer]\nsteps = 3\n")
    _fails(capsys, ["train", "--config", str(bad)], "[trainer]", "valid sections")


def test_missing_and_empty_data(capsys, tmp_path):
    out = tmp_path / "run"
    _fails(capsys, ["train", "--data", str(tmp_path / "nope"), "--out", str(out)] + _args(), "does not exist",
           "dsv3 prepare")
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(capsys, ["train", "--data", str(empty), "--out", str(out)] + _args(), "not a prepared data directory")
    assert not out.exists()


def test_corrupt_and_truncated_shard(capsys, tmp_path, train_data):
    for how in ("corrupt", "truncate"):
        data = tmp_path / how
        shutil.copytree(train_data, data)
        shard = sorted(data.glob("train*.bin"))[0] if list(data.glob("train*.bin")) else \
            max((p for p in data.iterdir() if p.suffix not in (".json", ".npy")), key=lambda p: p.stat().st_size)
        raw = bytearray(shard.read_bytes())
        if how == "corrupt":
            raw[10] ^= 0xFF
        else:
            raw = raw[: len(raw) // 2]
        shard.write_bytes(bytes(raw))
        out = tmp_path / f"run-{how}"
        _fails(capsys, ["train", "--data", str(data), "--out", str(out)] + _args(), str(shard.name),
               "dsv3 prepare")
        assert not out.exists()


def test_vocab_too_small_for_data(capsys, tmp_path, train_data):
    _fails(capsys, ["train", "--data", str(train_data), "--out", str(tmp_path / "r")] + _args("model.vocab_size=100"),
           "model.vocab_size=")


def test_out_checks(capsys, tmp_path, train_data, trained):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    _fails(capsys, ["train", "--data", str(train_data), "--out", str(busy)] + _args(), "not empty", "--force")
    assert (busy / "keep.txt").read_text() == "mine"
    before = _snapshot(trained)
    _fails(capsys, ["train", "--data", str(train_data), "--out", str(trained)] + _args(), "--resume")
    assert _snapshot(trained) == before
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _fails(capsys, ["train", "--data", str(train_data), "--out", str(blocker / "run")] + _args(), "choose another")


def test_resume_with_changed_model_refused(capsys, trained):
    before = _snapshot(trained)
    _fails(capsys, ["train", "--resume", str(trained), "--set", "model.hidden_size=64"],
           "model.hidden_size", "saved 128, now 64")
    assert _snapshot(trained) == before  # nothing touched


def test_resume_problems(capsys, tmp_path, trained):
    _fails(capsys, ["train", "--resume", str(tmp_path / "nope")], "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(capsys, ["train", "--resume", str(empty)], "no checkpoint")
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    model_pt = run / "checkpoints" / "step_000004" / "model.pt"
    model_pt.write_bytes(model_pt.read_bytes()[:1000])
    _fails(capsys, ["train", "--resume", str(run)], "corrupt or truncated", "step_000004")
    _fails(capsys, ["eval", "--ckpt", str(run)], "corrupt or truncated")


def test_plot_and_eval_bad_dirs(capsys, tmp_path):
    _fails(capsys, ["plot", str(tmp_path / "nope")], "does not exist")
    _fails(capsys, ["plot", str(tmp_path)], "no metrics.jsonl")
    _fails(capsys, ["eval", "--ckpt", str(tmp_path)], "no checkpoint")


def test_sample_after_compiled_training_runs_eager(tmp_path, train_data):
    # The end-of-run sample decodes one token at a time: with the blocks compiled it must not recompile them
    # for every new shape (on CUDA that path crashed after a 10-minute run; on CPU it recompiled 8 times).
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "dsv3", "train", "--data", str(train_data), "--out", str(tmp_path / "r"),
                        "--quiet", "--set", "train.steps=2", "--set", "train.batch_size=2", "--set", "train.seq_len=32",
                        "--set", "model.num_hidden_layers=2", "--set", "train.compile=true",
                        "--set", "train.sample_tokens=6", "--set", "train.eval_batches=1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "greedy sample:" in r.stdout
    assert "recompil" not in r.stderr.lower(), r.stderr[-2000:]


def test_save_final_false_skips_only_a_completed_runs_checkpoint(tmp_path, train_data):
    # completed: no checkpoint at all (save_every beyond the run); stopped early by stop_at: it still saves
    done = tmp_path / "done"
    assert main(["train", "--data", str(train_data), "--out", str(done), "--quiet"]
                + _args("train.save_every=100", "train.save_final=false", "train.sample_tokens=0")) == 0
    assert (done / "metrics.jsonl").exists()
    assert not list((done / "checkpoints").glob("step_*")) if (done / "checkpoints").exists() else True
    stopped = tmp_path / "stopped"
    assert main(["train", "--data", str(train_data), "--out", str(stopped), "--quiet"]
                + _args("train.save_every=100", "train.save_final=false", "train.sample_tokens=0",
                        "train.stop_at=2")) == 0
    assert [p.name for p in (stopped / "checkpoints").glob("step_*")] == ["step_000002"]


def test_profile_step_writes_a_kernel_table_and_a_trace(tmp_path, train_data):
    run = tmp_path / "prof"
    assert main(["train", "--data", str(train_data), "--out", str(run), "--quiet"]
                + _args("train.profile_step=2", "train.sample_tokens=0")) == 0
    table = (run / "profile" / "rank0.txt").read_text()
    assert "Self CPU" in table and "aten::" in table, table[:500]
    trace = json.loads((run / "profile" / "rank0.json").read_text())
    assert trace["traceEvents"], "empty Chrome trace"
    # the profiled step is an ordinary step: it is logged like the others
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
