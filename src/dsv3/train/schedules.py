"""Per-step schedules of the paper's recipe, scaled to a run of ``steps`` optimizer steps.

All are pure functions of the step index (0-based: the step being taken), so a resumed run recomputes
them instead of storing them. Fractions are of ``train.steps``.

* LR: linear warmup, constant, cosine decay to ``min_lr_ratio * lr``, constant tail.
* Batch size: linear ramp from b0 to B over N steps or N tokens, rounded down to the micro-batch granularity.
* MTP lambda: 0.3, then 0.1 after a fraction. Bias gamma: 0.001, then 0 for the last part.
"""
from __future__ import annotations

import math

from dsv3.train.config import TrainConfig


def lr_at(step: int, t: TrainConfig) -> float:
    """Learning rate for (0-based) ``step``."""
    peak, low = t.lr, t.lr * t.min_lr_ratio
    if step < t.warmup_steps:
        return peak * (step + 1) / t.warmup_steps
    start = max(t.warmup_steps, int(round(t.decay_start * t.steps)))
    end = max(start, int(round(t.decay_end * t.steps)))
    if step < start:
        return peak
    if step < end:
        progress = (step - start) / (end - start)
        return low + (peak - low) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return low


def mtp_lambda_at(step: int, t: TrainConfig) -> float:
    return t.mtp_lambda if step < t.mtp_lambda_switch * t.steps else t.mtp_lambda_late


def bias_gamma_at(step: int, t: TrainConfig) -> float:
    return t.bias_gamma if step < t.bias_gamma_off * t.steps else 0.0


class BatchRamp:
    """Global batch size per step: b0 -> B linearly over ``batch_ramp_steps`` steps or ``batch_ramp_tokens``.

    The token form depends on the tokens already seen, which depend on earlier sizes, so sizes are computed
    forward from step 0 and cached: still a pure function of the step.
    """

    def __init__(self, t: TrainConfig, granularity: int):
        self.t, self.g = t, granularity
        self._sizes: list[int] = []
        self._tokens = 0

    def _round(self, b: float) -> int:
        size = int(b) // self.g * self.g
        return max(self.t.batch_ramp_start, min(self.t.batch_size, size))

    def _raw(self, step: int) -> int:
        t = self.t
        if not t.batch_ramp_start or t.batch_ramp_start >= t.batch_size:
            return t.batch_size
        if t.batch_ramp_tokens > 0:
            frac = min(1.0, self._tokens / t.batch_ramp_tokens)
        elif t.batch_ramp_steps > 0:
            frac = min(1.0, step / t.batch_ramp_steps)
        else:
            return t.batch_size
        return self._round(t.batch_ramp_start + (t.batch_size - t.batch_ramp_start) * frac)

    def __call__(self, step: int) -> int:
        while len(self._sizes) <= step:
            size = self._raw(len(self._sizes))
            self._sizes.append(size)
            self._tokens += size * self.t.seq_len
        return self._sizes[step]

    def tokens_before(self, step: int) -> int:
        """Tokens (sequences x seq_len) of all steps before ``step``."""
        self(step)
        return sum(self._sizes[:step]) * self.t.seq_len
