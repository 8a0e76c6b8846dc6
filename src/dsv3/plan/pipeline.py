"""Pipeline-parallel schedules: bubble, per-device parameter and activation multiples (V3 report, Table 2).

F: forward chunk time, B: full backward chunk, W: weight-backward chunk, F&B: one forward and one backward
chunk run overlapped (DualPipe's pair). Table 2:

    1F1B      bubble (PP-1)(F+B)          parameters 1x   activations PP
    ZB1P      bubble (PP-1)(F+B-2W)       parameters 1x   activations PP
    DualPipe  bubble (PP/2-1)(F&B+B-3W)   parameters 2x   activations PP+1

Activations are in units of one stage's activations for one micro-batch.
"""
from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("1f1b", "zb1p", "dualpipe")


@dataclass(frozen=True)
class ScheduleCost:
    """What one schedule costs on PP devices."""

    schedule: str
    pp: int
    bubble: float  # in the time unit of F/B/W
    param_multiple: float
    activation_multiple: float  # micro-batches' worth of one stage's activations held at the peak
    min_micro_batches: int
    micro_batch_rule: str

    def bubble_fraction(self, micro_batches: int, f: float, b: float) -> float:
        """Bubble / (bubble + useful work) for ``micro_batches`` micro-batches of F + B each."""
        work = micro_batches * (f + b)
        return self.bubble / (self.bubble + work) if self.bubble + work > 0 else 0.0


def schedule_cost(schedule: str, pp: int, f: float = 1.0, b: float = 2.0, w: float = 1.0,
                  fb: float | None = None) -> ScheduleCost:
    """Table 2's bubble and memory multiples for one schedule; ``fb`` defaults to F + B (no overlap gain)."""
    if pp < 1:
        raise ValueError(f"pp = {pp} must be >= 1")
    if min(f, b, w) < 0 or w > b:
        raise ValueError("F, B, W must be >= 0 and W (weight backward) cannot exceed B (the full backward)")
    fb = f + b if fb is None else fb
    s = schedule.lower()
    if s == "1f1b":
        return ScheduleCost(s, pp, (pp - 1) * (f + b), 1, pp, pp, ">= PP micro-batches")
    if s == "zb1p":
        return ScheduleCost(s, pp, (pp - 1) * (f + b - 2 * w), 1, pp, pp, ">= PP micro-batches")
    if s == "dualpipe":
        if pp % 2:
            raise ValueError(f"DualPipe needs an even number of pipeline stages, got pp = {pp}")
        # Micro-batches enter from both ends: an even count, at least PP from each direction to fill the pipe.
        return ScheduleCost(s, pp, (pp / 2 - 1) * (fb + b - 3 * w), 2, pp + 1, 2 * pp,
                            "even, >= 2*PP (PP from each end); need not divide by PP")
    raise ValueError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
