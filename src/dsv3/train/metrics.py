"""Metrics sinks (metrics.jsonl, expert_load.jsonl, eval.jsonl, TensorBoard), MFU and the live progress line."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from rich.console import Console

from dsv3.config import ModelConfig


def flops_per_token(model_cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token as design section 5 defines them (matmul params x 6 + causal attention)."""
    from dsv3.plan.flops import training_flops_per_token

    return training_flops_per_token(model_cfg, seq_len=seq_len, causal=True).total


def measure_peak_flops(device: torch.device, seconds: float = 0.5) -> tuple[float, str]:
    """(FLOP/s, description) of a dense GEMM on ``device``: bf16 8192^3 on CUDA, fp32 1024^3 on CPU.

    The CPU figure is only a yardstick (there is no published peak to compare against); say so in the log.
    """
    if device.type == "cuda":
        # The fastest of 20 single GEMMs timed with CUDA events: another process on the same GPU time-slices
        # it (a mean over a window read 351 instead of ~729 TFLOP/s on an H200 shared with a smoke test).
        n = 8192
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        best = float("inf")
        for _ in range(20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        return 2 * n ** 3 / best, "measured bf16 GEMM, fastest of 20"
    n, what = 1024, "measured fp32 CPU matmul (a yardstick, not a hardware peak)"
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or reps < 3:
        a @ b
        reps += 1
    rate = 2 * n ** 3 * reps / (time.perf_counter() - start)
    return rate, what


def _clean(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf: keep them readable instead of writing invalid JSON
    return v


class NullSink:
    """Stands in for the file sinks on ranks other than 0 (they write nothing)."""

    def write(self, *args, **kwargs) -> None:
        pass

    def scalars(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlWriter:
    """Appends one JSON object per line, flushed each time (a crash loses nothing already written)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop records beyond ``max_step`` (written after the checkpoint a run resumes from)."""
    path = Path(path)
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= max_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    path.write_text("".join(l + "\n" for l in keep), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class TensorBoard:
    """Scalars to RUN_DIR/tb; a no-op when tensorboard is not installed or disabled."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        self.writer = SummaryWriter(str(Path(run_dir) / "tb"))

    def scalars(self, prefix: str, record: dict, step: int) -> None:
        if self.writer is None:
            return
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """One rich line per ``log_every`` steps: step, loss, lr, grad norm, tokens/s, MFU, MaxVio, ETA."""

    def __init__(self, total_steps: int, quiet: bool = False):
        self.console = Console(stderr=True, highlight=False)
        self.total, self.quiet = total_steps, quiet

    def print(self, msg: str) -> None:
        if not self.quiet:
            self.console.print(msg, soft_wrap=True)

    def step(self, r: dict, eta_s: float) -> None:
        if self.quiet:
            return
        skipped = " [red]skipped (non-finite loss)[/red]" if r.get("skipped") else ""
        mtp = f" mtp {r['loss_mtp_1']:.3f}" if isinstance(r.get("loss_mtp_1"), float) else ""
        self.console.print(
            f"step {r['step']:>5}/{self.total} loss [bold]{r['loss']:.4f}[/bold] (main {r['loss_main']:.3f}{mtp}) "
            f"lr {r['lr']:.2e} gnorm {r['grad_norm']:.2f} {r['tokens_per_s']:,.0f} tok/s MFU {100 * r['mfu']:.2f}% "
            f"maxvio {r['maxvio']:.2f} eta {format_eta(eta_s)}{skipped}", soft_wrap=True)
