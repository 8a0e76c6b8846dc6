"""The embedded default corpus: the running interpreter's standard library sources.

Real text that exists on every machine, so `dsv3 train` works offline with no arguments. The prepared
directory is cached (keyed by Python version, vocabulary size, byte cap and the chosen files), so the second
run reuses it.
"""
from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from pathlib import Path

from dsv3.data.prepare import PrepareOptions, prepare
from dsv3.data.shards import FORMAT, VERSION, TokenDataset
from dsv3.data.sources import ReadOptions
from dsv3.errors import UserError

DEFAULT_MAX_BYTES = 8_000_000  # ~2.4M tokens at vocab 4096: a tiny model trains on it in CPU minutes
DEFAULT_VOCAB = 4096            # the `tiny` preset's vocab_size
# Third-party code and the test suites are not "the standard library" and would dominate the sample.
EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_root() -> Path:
    """sysconfig's 'stdlib' directory of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(max_bytes: int | None = DEFAULT_MAX_BYTES, root: str | Path | None = None) -> list[Path]:
    """Standard-library *.py files, sorted by path; with ``max_bytes``, a fixed pseudo-random subset under it.

    The subset is chosen by ranking files on a hash of their relative path (not alphabetically, which would
    take only the first packages), then adding files while the total stays within the cap.
    """
    root = Path(root) if root is not None else stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith("."))
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    if not files:
        raise UserError(f"no Python sources under {root}; pass data with --data or run `dsv3 prepare`")
    if max_bytes is not None:
        ranked = sorted(files, key=lambda p: hashlib.sha256(p.relative_to(root).as_posix().encode()).digest())
        chosen, total = [], 0
        for p in ranked:
            size = p.stat().st_size
            if total + size <= max_bytes:
                chosen.append(p)
                total += size
        files = chosen
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def default_cache_dir() -> Path:
    """$DSV3_CACHE_DIR, else $XDG_CACHE_HOME/dsv3, else ~/.cache/dsv3."""
    if os.environ.get("DSV3_CACHE_DIR"):
        return Path(os.environ["DSV3_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dsv3"


def prepare_default_corpus(cache_dir: str | Path | None = None, *, vocab_size: int = DEFAULT_VOCAB,
                           max_bytes: int | None = DEFAULT_MAX_BYTES, val_fraction: float = 0.02,
                           progress: bool = False) -> Path:
    """Prepared data directory of the stdlib corpus, built on first use and reused afterwards.

    Returns e.g. ``~/.cache/dsv3/data/stdlib-py311-v4096-b8000000-<hash>``; a damaged cached copy is
    rebuilt. Tokenizer: byte-level BPE of ``vocab_size`` trained on the train split.
    """
    root = stdlib_root()
    files = stdlib_files(max_bytes, root)
    key = hashlib.sha256(f"{FORMAT}{VERSION}|{vocab_size}|{val_fraction}".encode())
    for p in files:
        key.update(f"{p.relative_to(root).as_posix()}:{p.stat().st_size}\n".encode())
    name = (f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-v{vocab_size}"
            f"-b{max_bytes or 'all'}-{key.hexdigest()[:12]}")
    out = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "data"
    out = out / name
    if (out / "meta.json").is_file():
        try:
            TokenDataset(out, verify=False)  # sizes only: cheap, and catches an interrupted copy
            return out
        except UserError:
            pass  # damaged: rebuild below
    opts = PrepareOptions(vocab_size=vocab_size, val_fraction=val_fraction, seed=0, force=True, progress=progress,
                          read=ReadOptions(encoding_errors="replace"))  # a few stdlib files are not UTF-8
    prepare([str(p) for p in files], out, opts)
    return out
