"""benchmarks/gather_gemm_probe.py's Triton grouped GEMMs (forward and weight gradient; on gathered rows and on
rows they gather themselves) against fp32 references, under Triton's CPU interpreter: uneven groups, an empty expert first and in the middle, and
rows, columns and K that do not fill a tile, an empty expert's gradient exactly zero. The probe asserts the
errors itself; a forward tile given the wrong expert, or a weight gradient reducing over the wrong rows, fails it
(both checked by mutation)."""
import sys
from pathlib import Path

import pytest


def test_gather_gemm_probe_numerics_interpreted(run_interpreted):
    out = run_interpreted([str(Path(__file__).resolve().parents[1] / "benchmarks" / "gather_gemm_probe.py"),
                           "--check-only"])
    assert out.count("check") == 3


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
