"""``train.profile_step``: one step under torch.profiler on every rank, written next to the run.

For questions the metrics cannot answer (where does an EP=2 step's extra time go, how much of the GPU idles
at a host sync): ``RUN/profile/rank{r}.txt`` holds the top operators and kernels by self time (device time on
CUDA, CPU time otherwise) and ``RUN/profile/rank{r}.json`` the Chrome trace (chrome://tracing, Perfetto). Every
rank writes its own files: the ranks' timelines differ, which is the point.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = ["profile_one_step"]


@contextmanager
def profile_one_step(run_dir: Path, device: torch.device, rows: int = 40):
    """Profile the enclosed step; on exit write ``profile/rank{r}.txt`` and ``.json`` under ``run_dir``."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    out = Path(run_dir) / "profile"
    out.mkdir(parents=True, exist_ok=True)
    with profile(activities=activities, record_shapes=False) as prof:
        yield
        if cuda:
            torch.cuda.synchronize(device)  # the step's kernels inside the window
    key = "self_device_time_total" if cuda else "self_cpu_time_total"  # device: torch >= 2.4 naming
    table = prof.key_averages().table(sort_by=key, row_limit=rows)
    (out / f"rank{rank}.txt").write_text(table + "\n")
    prof.export_chrome_trace(str(out / f"rank{rank}.json"))
