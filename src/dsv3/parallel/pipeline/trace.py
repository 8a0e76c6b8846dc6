"""A tiny per-rank timeline: (name, category, lane, start, end) events written as a Chrome trace.

Load the JSON files in chrome://tracing or https://ui.perfetto.dev: one process per pp rank, a "compute"
lane for F / B / W and a "comm" lane for sends (posted -> seen complete) and receive waits. On CUDA the
times are host times of kernel *launches* unless the runtime synchronizes; use torch.profiler for device
timelines (the event names are also pushed as record_function ranges so they show up there).
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch


class Tracer:
    """Collects events when enabled; otherwise every method is a cheap no-op."""

    def __init__(self, enabled: bool, rank: int = 0):
        self.enabled, self.rank = enabled, rank
        self.t0 = time.perf_counter()
        self.events: list[tuple[str, str, str, float, float]] = []

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def add(self, name: str, cat: str, lane: str, start: float, end: float) -> None:
        if self.enabled:
            self.events.append((name, cat, lane, start, end))

    @contextmanager
    def span(self, name: str, cat: str, lane: str = "compute"):
        start = self.now()
        with torch.profiler.record_function(name):
            yield
        self.add(name, cat, lane, start, self.now())

    def total(self, cat: str) -> float:
        return sum(e - s for _, c, _, s, e in self.events if c == cat)

    def chrome(self) -> dict:
        lanes = {"compute": 0, "comm": 1}
        ev = [{"name": n, "cat": c, "ph": "X", "pid": self.rank, "tid": lanes.get(lane, 2),
               "ts": s * 1e6, "dur": max(e - s, 0.0) * 1e6} for n, c, lane, s, e in self.events]
        meta = [{"name": "process_name", "ph": "M", "pid": self.rank, "args": {"name": f"pp rank {self.rank}"}}]
        meta += [{"name": "thread_name", "ph": "M", "pid": self.rank, "tid": t, "args": {"name": lane}}
                 for lane, t in lanes.items()]
        return {"traceEvents": meta + ev, "displayTimeUnit": "ms"}

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.chrome()))
        return path
