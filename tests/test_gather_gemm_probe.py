"""benchmarks/gather_gemm_probe.py's Triton grouped GEMMs (forward and weight gradient; on gathered rows and on
rows they gather themselves) against fp32 references, under Triton's CPU interpreter: uneven groups, an empty expert first and in the middle, and
rows, columns and K that do not fill a tile, an empty expert's gradient exactly zero. The probe asserts the
errors itself; a forward tile given the wrong expert, or a weight gradient reducing over the wrong rows, fails it
(both checked by mutation)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_gather_gemm_probe_numerics_interpreted():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton not installed (the optional gpu extra)")
    import triton

    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 7):
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run these kernels; 3.7+ can")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "gather_gemm_probe.py"), "--check-only"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("check") == 3


def test_backward_probe_sides_agree_on_cpu():
    """The probe's backward comparison (today's dy + CUTLASS GEMMs against the gathered, scaled kernels) on the
    CPU in fp32, where both sides run their torch references: it asserts the two sides' gradients agree before
    it times anything, so a probe that timed different computations fails here."""
    import torch
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm missing")
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        import gather_gemm_probe
    finally:
        sys.path.remove(str(root / "benchmarks"))
    calls = []

    def bench(fn, n, warmup=0):
        calls.append(fn())
        return 1.0
    out = gather_gemm_probe.time_backward(60, 3, 5, 16, 8, bench, dev="cpu", bf=torch.float32)
    assert len(calls) == 6 and out["dgrad_gathered_over_today"] == 1.0
