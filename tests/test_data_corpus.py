"""The embedded default corpus: stdlib file selection, cached preparation."""
from __future__ import annotations

import math
import sysconfig

import pytest

from dsv3.data import default_corpus
from dsv3.data.loader import PackedLoader
from dsv3.data.shards import TokenDataset
from dsv3.data.stats import unigram_entropy


def test_file_selection_on_a_fake_stdlib(tmp_path):
    layout = {"a.py": 100, "pkg/b.py": 200, "pkg/c.py": 300, "pkg/notes.txt": 50, "test/t.py": 10,
              "pkg/tests/u.py": 10, "site-packages/x/y.py": 10, "__pycache__/z.py": 10}
    for rel, size in layout.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("#" * size)
    rels = lambda files: [p.relative_to(tmp_path).as_posix() for p in files]  # noqa: E731
    assert rels(default_corpus.stdlib_files(None, tmp_path)) == ["a.py", "pkg/b.py", "pkg/c.py"]
    capped = rels(default_corpus.stdlib_files(450, tmp_path))
    sizes = {"a.py": 100, "pkg/b.py": 200, "pkg/c.py": 300}
    assert capped == sorted(capped) and sum(sizes[f] for f in capped) <= 450 and len(capped) == 2
    assert capped == rels(default_corpus.stdlib_files(450, tmp_path))


def test_default_corpus_prepared_once_and_reused(tmp_path, monkeypatch):
    files = default_corpus.stdlib_files(200_000)
    stdlib = sysconfig.get_paths()["stdlib"]
    assert files and all(str(f).startswith(stdlib) and "site-packages" not in f.parts for f in files)
    assert 150_000 < sum(f.stat().st_size for f in files) <= 200_000
    out = default_corpus.prepare_default_corpus(tmp_path, vocab_size=1024, max_bytes=200_000)
    ds = TokenDataset(out)
    assert ds.vocab_size == 1024 and ds.dtype.name == "uint16" and ds.split("validation").n_docs >= 1
    # One document per non-empty file (empty __init__.py files give no tokens and are dropped).
    assert ds.split("train").n_docs + ds.split("validation").n_docs == sum(f.stat().st_size > 0 for f in files)
    h = unigram_entropy(out)
    assert 3.0 < h < math.log(1024)  # nats per token: under the uniform distribution's ln(V)
    next(PackedLoader(out, seq_len=64, batch_size=2, prefetch=0))

    # Second call: no rebuild.
    def boom(*a, **k):
        raise AssertionError("rebuilt a valid cache")

    monkeypatch.setattr(default_corpus, "prepare", boom)
    assert default_corpus.prepare_default_corpus(tmp_path, vocab_size=1024, max_bytes=200_000) == out
    # A damaged cache is rebuilt (and comes out identical).
    monkeypatch.undo()
    before = (out / "train-00000.bin").read_bytes()
    (out / "train-00000.bin").write_bytes(before[:10])
    assert default_corpus.prepare_default_corpus(tmp_path, vocab_size=1024, max_bytes=200_000) == out
    assert (out / "train-00000.bin").read_bytes() == before
    with pytest.raises(AssertionError):  # a different key is a different directory
        monkeypatch.setattr(default_corpus, "prepare", boom)
        default_corpus.prepare_default_corpus(tmp_path, vocab_size=512, max_bytes=200_000)
