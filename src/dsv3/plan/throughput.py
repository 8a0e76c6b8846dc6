"""Conversions between FLOPs per token, tokens per second, TFLOPS, MFU, GPU hours and money.

All are plain arithmetic so that a user can go from any one measured quantity to the others. The Insights
paper's Table 4 (V3 on 2,048 H800s) is the worked example: 272.80B tokens/day -> 1,541.7 tokens/s/GPU; at 250
GFLOPs/token that is 385.4 TFLOPS, 38.97% of 989 TFLOPS. The paper prints 385 TFLOPS and 38.94%: its MFU was
computed from the step time, which implies 249.8 GFLOPs/token; our tests accept both within 0.05 points.
"""
from __future__ import annotations

from dataclasses import dataclass

SECONDS_PER_DAY = 86400.0

# Peak dense BF16 rates (TFLOPS) of common cards, from the vendors' data sheets (dense, no sparsity).
PEAK_TFLOPS = {"h800": 989.0, "h100": 989.0, "h200": 989.0, "a100": 312.0, "b200": 2250.0}


@dataclass(frozen=True)
class Throughput:
    """One operating point of a training run, every quantity derived from tokens/s/GPU and FLOPs/token."""

    tokens_per_s_per_gpu: float
    flops_per_token: float
    gpus: int
    peak_tflops: float

    @property
    def tflops_per_gpu(self) -> float:
        return self.tokens_per_s_per_gpu * self.flops_per_token / 1e12

    @property
    def mfu(self) -> float:
        return self.tflops_per_gpu / self.peak_tflops

    @property
    def tokens_per_day(self) -> float:
        return self.tokens_per_s_per_gpu * self.gpus * SECONDS_PER_DAY

    def gpu_hours(self, tokens: float) -> float:
        """GPU hours to train ``tokens`` at this rate."""
        return tokens / self.tokens_per_s_per_gpu / 3600.0

    def days(self, tokens: float) -> float:
        """Wall-clock days for ``tokens`` on all GPUs."""
        return tokens / self.tokens_per_day


def from_tokens_per_day(tokens_per_day: float, gpus: int, flops_per_token: float,
                        peak_tflops: float = 989.0) -> Throughput:
    """Operating point from a cluster's tokens/day (the papers' unit)."""
    return Throughput(tokens_per_day / gpus / SECONDS_PER_DAY, flops_per_token, gpus, peak_tflops)


def from_mfu(mfu: float, gpus: int, flops_per_token: float, peak_tflops: float = 989.0) -> Throughput:
    """Operating point from an MFU (fraction, 0..1)."""
    return Throughput(mfu * peak_tflops * 1e12 / flops_per_token, flops_per_token, gpus, peak_tflops)


@dataclass(frozen=True)
class CostLine:
    """One stage of a training budget."""

    stage: str
    gpu_hours: float
    price_per_gpu_hour: float

    @property
    def cost(self) -> float:
        return self.gpu_hours * self.price_per_gpu_hour


# DeepSeek-V3 report, Table 1 (H800 GPU hours; the report rents at $2 per GPU hour).
V3_TABLE1_GPU_HOURS = {"pre-training": 2664e3, "context extension": 119e3, "post-training": 5e3}


def budget(stages: dict[str, float], price_per_gpu_hour: float = 2.0) -> list[CostLine]:
    """Cost lines for GPU-hour budgets per stage; add them with ``sum(l.cost for l in lines)``."""
    if price_per_gpu_hour < 0:
        raise ValueError("price_per_gpu_hour must be >= 0")
    return [CostLine(name, hours, price_per_gpu_hour) for name, hours in stages.items()]
