"""Shared fixtures. ``train_data``: a small prepared dataset (a few stdlib modules, BPE vocab 512)."""
from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest

TRAIN_DOC_FILES = ["json/decoder.py", "json/encoder.py", "textwrap.py", "shlex.py", "string.py", "fnmatch.py",
                   "glob.py", "bisect.py", "heapq.py", "copy.py", "abc.py", "csv.py"]


@pytest.fixture(scope="session")
def train_data(tmp_path_factory) -> Path:
    from dsv3.data.prepare import PrepareOptions, prepare

    root = Path(sysconfig.get_paths()["stdlib"])
    base = tmp_path_factory.mktemp("train_data")
    docs = base / "docs"
    docs.mkdir()
    for name in TRAIN_DOC_FILES:
        shutil.copy(root / name, docs / name.replace("/", "_"))
    out = base / "data"
    prepare([str(docs)], out, PrepareOptions(vocab_size=512, val_fraction=0.2, seed=0, progress=False))
    return out
