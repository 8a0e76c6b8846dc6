"""Shared fixtures. ``train_data``: a small prepared dataset (a few stdlib modules, BPE vocab 512).
``run_interpreted``: runs Triton kernels' checks on the CPU under Triton's interpreter."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
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


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_interpreted():
    """``run(args) -> stdout``: ``python args`` in a fresh interpreter with TRITON_INTERPRET=1 (Triton's numpy
    interpreter: the kernels' own code on the CPU), from the repository root with it and src/ on the path; the
    test fails on a non-zero exit and is skipped where Triton is missing or too old to interpret the kernels."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton not installed (the optional gpu extra)")
    import triton

    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 7):
        # Triton 3.6's interpreter turns a runtime scalar used as a loop bound into a 1-element numpy array and
        # calls int() on it, which numpy 2 refuses (seen on the GPU machine, 2026-12-07); 3.8 is fine
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run these kernels; 3.7+ can")

    def run(args: list[str]) -> str:
        path = os.pathsep.join(p for p in [str(ROOT), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")] if p)
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
        done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600,
                              cwd=ROOT)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout
    return run
