"""Run-directory checks done before anything is written, so a refused command leaves no trace."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from dsv3.errors import UserError
from dsv3.train.checkpoint import list_checkpoints


def default_out() -> Path:
    """runs/default-YYYYmmdd-HHMMSS: `dsv3 train` with no --out never collides with an earlier run."""
    return Path("runs") / time.strftime("default-%Y%m%d-%H%M%S")


def is_run(path: Path) -> bool:
    return (path / "config.json").is_file() and bool(list_checkpoints(path))


def check_out(out: Path, force: bool) -> None:
    """Refuse an existing non-empty --out (unless --force) and an output path that cannot be created."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory path")
    if out.is_dir() and any(out.iterdir()) and not force:
        if is_run(out):
            raise UserError(f"--out {out} already holds a training run; continue it with `dsv3 train --resume "
                            f"{out}`, or pass --force to start over there")
        raise UserError(f"--out {out} exists and is not empty (and is not a dsv3 run); choose another --out "
                        "or pass --force to replace its contents")
    # The nearest existing ancestor must be a writable directory (checked without writing anything).
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"cannot create --out {out}: {probe} is a file, not a directory; choose another --out")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to --out {out}: {probe} is not writable; choose a writable directory")


def create_out(out: Path, force: bool) -> None:
    """Create (or, with --force, empty) the run directory; OSErrors become one-line UserErrors."""
    try:
        if force and out.is_dir():
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to --out {out} ({e.strerror or e}); choose a writable directory") from None
