"""``train.profile_step``: one step under torch.profiler on every rank, written next to the run.

For questions the metrics cannot answer (where does an EP=2 step's extra time go, how much of the GPU idles
at a host sync): ``RUN/profile/rank{r}.txt`` holds the top operators and kernels by self time (device time on
CUDA, CPU time otherwise; on CUDA ``rank{r}.cpu.txt`` the same by host time), ``RUN/profile/rank{r}.json``
the Chrome trace (chrome://tracing, Perfetto), and ``RUN/profile/rank{r}.summary.json`` the step's GPU
timeline in a few numbers (``summarize_trace``): busy and idle time, kernel time by kind, and how much of the
communication no computation overlapped. Every rank writes
its own files: the ranks' timelines differ, which is the point.
"""
from __future__ import annotations

import gc
import json
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = ["profile_one_step", "summarize_trace"]


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
    averages = prof.key_averages()
    (out / f"rank{rank}.txt").write_text(averages.table(sort_by=key, row_limit=rows) + "\n")
    if cuda:  # where the host's time goes (a host-bound step, e.g. EP's, idles the GPU on it)
        (out / f"rank{rank}.cpu.txt").write_text(averages.table(sort_by="self_cpu_time_total", row_limit=rows) + "\n")
    prof.export_chrome_trace(str(out / f"rank{rank}.json"))
    summary = summarize_trace(out / f"rank{rank}.json")
    (out / f"rank{rank}.summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    # The profiler's event trees are reference cycles (~10^5 objects for an EP step): free them now, at the same
    # step on every rank, not in a later automatic collection that pauses one rank while its peers wait
    del prof, averages
    gc.collect()


# Kernel kinds by name (first match wins). NCCL first: its kernels are communication whatever else they do.
KERNEL_KINDS = (
    ("communication", ("nccl",)),
    ("attention", ("flash", "fmha", "cudnn", "sdpa", "attention")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "grouped_mm", "_mm_", "matmul", "wgmma")),
    ("triton", ("triton",)),
    ("memory", ("memcpy", "memset")),
)


def kernel_kind(name: str) -> str:
    """The KERNEL_KINDS class of a kernel name ('other' for elementwise/reduction kernels of eager aten ops)."""
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def _minus(xs, ys) -> float:
    """Total length of the union ``xs`` not covered by the union ``ys`` (both sorted, disjoint)."""
    covered, j = 0.0, 0
    for a, b in xs:
        while j < len(ys) and ys[j][1] <= a:
            j += 1
        k = j
        while k < len(ys) and ys[k][0] < b:
            covered += min(b, ys[k][1]) - max(a, ys[k][0])
            k += 1
    return _length(xs) - covered


def summarize_trace(path: Path, gaps: int = 8, top: int = 40) -> dict:
    """The GPU side of a torch.profiler Chrome trace, in milliseconds: ``window_ms`` (first kernel start to last
    kernel end), ``busy_ms`` (union of all kernels and copies over every stream) and ``idle_ms`` (the rest of
    the window), kernel time by kind (``kernel_ms``: self time summed, so overlapping streams can add up to more
    than busy), ``comm_exposed_ms`` (communication kernels' time during which no other kernel ran: the
    transfers nothing hid), ``kernels`` (count), the longest idle gaps with the kernel before each, and
    ``top_kernels``: the ``top`` kernels by total time, full names (the profiler's table cuts them at 55
    characters, where Inductor's fused-op lists say which model code a kernel is). A trace without GPU events
    (CPU runs) gives zeros."""
    events = json.loads(Path(path).read_text()).get("traceEvents", [])
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    res: dict = {"kernels": len(kernels), "window_ms": 0.0, "busy_ms": 0.0, "idle_ms": 0.0, "comm_exposed_ms": 0.0,
                 "kernel_ms": {kind: 0.0 for kind, _ in KERNEL_KINDS} | {"other": 0.0}, "longest_gaps": [],
                 "top_kernels": []}
    if not kernels:
        return res
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)), e.get("name", "")) for e in kernels)
    kinds = [kernel_kind(n) for _, _, n in spans]
    for (a, b, _), kind in zip(spans, kinds):
        res["kernel_ms"][kind] += (b - a) / 1e3
    busy = _union([(a, b) for a, b, _ in spans])
    comm = _union([(a, b) for (a, b, _), kind in zip(spans, kinds) if kind == "communication"])
    compute = _union([(a, b) for (a, b, _), kind in zip(spans, kinds) if kind != "communication"])
    window = busy[-1][1] - busy[0][0]
    res.update(window_ms=window / 1e3, busy_ms=_length(busy) / 1e3, idle_ms=(window - _length(busy)) / 1e3,
               comm_exposed_ms=_minus(comm, compute) / 1e3)
    # idle gaps in start order, each named by the kernel that had ended last before it
    found, end, last = [], spans[0][1], spans[0][2]
    for a, b, name in spans[1:]:
        if a > end:
            found.append((a - end, last))
        if b > end:
            end, last = b, name
    found.sort(key=lambda g: -g[0])
    res["longest_gaps"] = [{"ms": gap / 1e3, "after": name[:120]} for gap, name in found[:gaps]]
    by_name: dict[str, list[float]] = {}
    for a, b, name in spans:
        total = by_name.setdefault(name, [0.0, 0])
        total[0] += b - a
        total[1] += 1
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    res["top_kernels"] = [{"ms": round(us / 1e3, 3), "calls": n, "name": name[:300]} for name, (us, n) in ranked]
    res["kernel_ms"] = {k: round(v, 3) for k, v in res["kernel_ms"].items()}
    for k in ("window_ms", "busy_ms", "idle_ms", "comm_exposed_ms"):
        res[k] = round(res[k], 3)
    return res
