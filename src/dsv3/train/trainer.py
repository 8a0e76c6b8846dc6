"""The training loop: micro-batched steps, schedules, clipping, bias update, NaN skips, checkpoints, metrics.

One optimizer step = one global batch from the loader, split into micro-batches whose gradients accumulate
(each weighted by its share of the step's target tokens, so accumulation equals one big batch). After the
optimizer update the balance biases move once, from the counts of all micro-batches.

Exact resume: the loader's batches are a pure function of its state, the schedules a pure function of the
step, and every RNG is saved; so N steps + resume + N steps reproduce 2N steps bit for bit on the CPU.
"""
from __future__ import annotations

import math
import random
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dsv3.data.loader import IGNORE_INDEX, PackedLoader
from dsv3.errors import UserError
from dsv3.fp8.weight_cache import step_scope as fp8_step_scope
from dsv3.model import DeepseekV3
from dsv3.train import balance, checkpoint, metrics, overlap, schedules
from dsv3.train.compile_blocks import compile_blocks
from dsv3.train.compute_weights import ComputeWeights, resolve_weight_cast
from dsv3.train.config import CUDAGRAPH_MODES, RunConfig
from dsv3.train.distributed import Layout
from dsv3.train.evaluate import evaluate
from dsv3.train.gc_schedule import ScheduledGC
from dsv3.train.profiling import profile_one_step


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device = {name!r} but CUDA is not available here; use --set train.device=\"cpu\" "
                        "or \"auto\"")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class Trainer:
    """Owns model, optimizer, loader and sinks of one run directory.

    Args:
        cfg: the resolved run config.
        run_dir: where checkpoints and metrics go (must exist).
        data: the prepared data directory.
        resume: a checkpoint directory to continue from, or None for a fresh start.
        all_reduce: sums a tensor over data-parallel ranks (None: the layout's own, or one process).
        quiet: no progress lines (tests).

    Under torchrun the [parallel] section picks the layout (data + expert parallel); every rank runs the same
    loop, only rank 0 prints and writes files, and the logged loss is the global one.
    """

    def __init__(self, cfg: RunConfig, run_dir: Path, data: Path, resume: Path | None = None,
                 all_reduce: Callable[[torch.Tensor], None] | None = None, quiet: bool = False):
        self.cfg, self.run_dir, self.data = cfg, Path(run_dir), Path(data)
        t = cfg.train
        self.t = t
        self.layout = Layout(cfg.parallel, cfg.model, "auto" if t.device == "auto" else str(pick_device(t.device)))
        self.device = self.layout.device
        self.is_main = self.layout.is_main
        # train.weight_cast = "per_step" (dsv3.train.compute_weights) is bf16 autocast with the weight casts done
        # once per step, so it runs under autocast on every device: on the CPU too, where precision 'bf16' with
        # 'per_use' runs fp32 (with only the GEMM weights in bf16, the model cannot run without autocast)
        self.weight_cast = resolve_weight_cast(t.weight_cast, t.precision, self.device)
        self.autocast = torch.bfloat16 if (t.precision in ("bf16", "fp8") and self.device.type == "cuda"
                                           or self.weight_cast == "per_step") else None
        self.progress = metrics.Progress(t.steps, quiet=quiet or not self.is_main)

        # Some CPU backward kernels (scatter/index-add style) accumulate in thread order; deterministic mode
        # makes two runs, and a run and its resumption, agree bit for bit. Restored in close().
        self._det_before = (torch.are_deterministic_algorithms_enabled(),
                            torch.is_deterministic_algorithms_warn_only_enabled())
        if t.deterministic and self.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(t.seed)
        self.model = DeepseekV3(self.layout.model_config).to(self.device)
        self.model.train()
        self.model.set_recompute(t.recompute)
        if t.precision == "fp8":  # FP8 GEMMs for attention projections, MLPs and experts; the rest stays bf16/fp32
            from dsv3.fp8.recipe import FP8Recipe, convert_to_fp8
            fams = t.fp8_families()
            convert_to_fp8(self.model, FP8Recipe(attention="attention" in fams, mlp="mlp" in fams,
                                                 experts="experts" in fams, backend=t.fp8_backend))
        self.layout.wrap(self.model)          # experts sharded over EP ranks, gradient reducer installed
        self.all_reduce = all_reduce or self.layout.count_all_reduce  # exists only after wrap()
        from dsv3.kernels import cross_entropy
        cross_entropy.COMPILE_CHUNKS = None if t.compile else False   # the fused loss compiles only if asked
        if t.compile and t.compile_mode in CUDAGRAPH_MODES and self.layout.pp > 1:
            raise UserError(f"train.compile_mode = {t.compile_mode!r} (CUDA graphs) does not work with "
                            "parallel.pp > 1: the pipeline holds several micro-batches' graphs at once; use "
                            "'default' or 'max-autotune-no-cudagraphs'")
        if t.compile:
            if self.layout.pp > 1:
                # Pipeline backward passes keep the graph (retain_graph=True: DualPipeV's input-gradient pass
                # runs before the deferred weight-gradient pass), which compiled backward functions refuse
                # when they donate their saved buffers.
                import torch._functorch.config as functorch_config
                functorch_config.donated_buffer = False
            compile_blocks(list(self.model.layers) + list(self.model.mtp), t.compile_mode)
        # CUDA graphs (compile_mode 'reduce-overhead' / 'max-autotune'): each forward starts a new replay
        # generation, so the previous micro-batch's graph outputs (consumed by its backward) may be reused
        self._cudagraphs = t.compile and t.compile_mode in CUDAGRAPH_MODES and self.device.type == "cuda"
        # parallel.fb_overlap: two streams for the forwards (dsv3.train.overlap); on the CPU the plain loop
        self._fb_streams = None
        if self.layout.pc.fb_overlap:
            if self._cudagraphs:
                raise UserError(f"parallel.fb_overlap does not combine with train.compile_mode = "
                                f"{t.compile_mode!r} (CUDA graphs replay on one stream); set fb_overlap = false or "
                                "compile_mode = 'default'")
            if self.device.type == "cuda":
                self._fb_streams = (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device))
        self.optimizer = self.layout.build_optimizer(self.model, t)
        dp = self.layout.dp
        mb = t.micro_batch_size or t.batch_size // dp   # per-rank micro-batch
        if t.batch_size % dp or (t.batch_ramp_start and t.batch_ramp_start % dp) or mb * dp > t.batch_size:
            raise UserError(f"train.batch_size = {t.batch_size} (and batch_ramp_start) must be a multiple of the "
                            f"data-parallel size {dp}, with micro_batch_size * {dp} <= batch_size; adjust them")
        self.ramp = schedules.BatchRamp(t, granularity=mb * dp)
        self.loader = PackedLoader(self.data, "train", seq_len=t.seq_len, batch_size=self.ramp, seed=t.seed,
                                   rank=self.layout.dp_rank, world_size=dp,
                                   document_mask=cfg.data.document_mask, prefetch=cfg.data.prefetch,
                                   pin_memory=self.device.type == "cuda", verify=cfg.data.verify)
        self.step = 0           # optimizer steps done (including skipped ones)
        self.tokens = 0         # tokens of all steps done
        self.nan_skips = 0      # total skipped steps
        self.nan_streak = 0     # skipped steps in a row
        self.last_checkpoint: Path | None = None
        if resume is not None:
            self._restore(resume)
        # train.weight_cast = "per_step": bf16 copies of the fp32 masters that autocast would cast at every use
        # (GEMM weights, head), cast once per optimizer step and used during the step's passes and evaluation
        # (dsv3.train.compute_weights). Built after a resume, so the copies come from the loaded masters. Under
        # ZeRO-1's overlapped parameter sync the copies refresh as the parameters land in the next forward;
        # everywhere else before the step's passes.
        self.compute: ComputeWeights | None = None
        self._refresh_in_forward = False
        if self.weight_cast == "per_step":
            self.compute = ComputeWeights(self.layout.held if self.layout.pp > 1 else self.model)
            self._refresh_in_forward = self.layout.on_params_landed(self.compute.refresh)
            self.compute.refresh()
        # CUDA graphs: the first micro-batch's weight gradients are graph outputs too; give them memory of their
        # own (dsv3.train.cudagraph_grads), unless the data-parallel reducer copies them into its bucket buffers
        # already, or they reach the master through a per_step copy's hook (which writes a fresh fp32 tensor)
        self._owned_grads = None
        reducer = getattr(self.layout.par, "reducer", None)
        if self._cudagraphs and (reducer is None or not reducer.as_view):
            from dsv3.train.cudagraph_grads import OwnedGradients
            fed = set() if self.compute is None else {id(p) for p in self.compute.hook_fed_masters()}
            self._owned_grads = OwnedGradients(p for p in self.model.parameters() if id(p) not in fed)

        self.flops_per_token = metrics.flops_per_token(cfg.model, t.seq_len)
        self.peak_flops, self.peak_desc = (t.peak_tflops * 1e12, "train.peak_tflops") if t.peak_tflops > 0 \
            else metrics.measure_peak_flops(self.device)
        self._stop_signal: int | None = None
        self._trace_step = min(self.step + 2, t.steps - 1)  # trace one warmed-up step when parallel.trace is on
        self.final_eval: dict = {}

    # ------------------------------------------------------------------ resume
    def _restore(self, ckpt: Path) -> None:
        state = checkpoint.load_checkpoint(ckpt)
        self.layout.load_model_state(self.model, state["model"])
        self.layout.load_optimizer_state(self.optimizer, self.model, state["optimizer"])
        tr = state["trainer"]
        self.loader.load_state_dict(tr["loader"])
        self.step, self.tokens = tr["step"], tr["tokens"]
        self.nan_skips, self.nan_streak = tr["nan_skips"], tr["nan_streak"]
        checkpoint.set_rng_state(tr["rng"])
        self.last_checkpoint = Path(ckpt)

    def trainer_state(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "nan_skips": self.nan_skips,
                "nan_streak": self.nan_streak, "loader": self.loader.state_dict()}

    def save(self) -> Path:
        """Every rank gathers the layout-independent state (collectives); rank 0 writes it."""
        model_state = self.layout.model_state(self.model)
        optim_state = self.layout.optimizer_state(self.optimizer, self.model)
        if self.is_main:
            checkpoint.save_checkpoint(self.run_dir, self.step, self.cfg, model_state, optim_state,
                                       self.trainer_state(), self.t.keep_checkpoints)
        self.layout.barrier()
        self.last_checkpoint = checkpoint.checkpoint_path(self.run_dir, self.step)
        return self.last_checkpoint

    # -------------------------------------------------------------------- step
    def _micro_batches(self, batch: dict, size: int):
        n = batch["input_ids"].shape[0]
        for i in range(0, n, size):
            yield {k: v[i:i + size].to(self.device, non_blocking=True) for k, v in batch.items()}

    def train_step(self) -> dict:
        """Take one optimizer step (or skip it on a non-finite loss); return its metrics record."""
        t, step = self.t, self.step
        start = time.perf_counter()
        global_batch = self.ramp(step)
        batch = self.loader.next_batch()
        lr = schedules.lr_at(step, t)
        lam = schedules.mtp_lambda_at(step, t)
        gamma = schedules.bias_gamma_at(step, t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        lay = self.layout
        # Each rank holds its slice of the global batch; every micro-batch's loss is weighted by its share of
        # the GLOBAL target tokens (times dp, as the reducer averages over dp ranks), so the accumulated,
        # reduced gradient is that of the whole batch's mean loss, however the batch is split.
        n_target = lay.global_sum(int((batch["labels"] != IGNORE_INDEX).sum()))
        micro = min(t.micro_batch_size or batch["input_ids"].shape[0], batch["input_ids"].shape[0])
        parts: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=self.device)
        ctx = torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else nullcontext()
        mbs = list(self._micro_batches(batch, micro))
        # micro-batch weights from the host copy of the labels (no device sync); times dp because the reducer
        # averages over the data-parallel replicas
        labels = batch["labels"]
        weights = [lay.dp * int((labels[i:i + micro] != IGNORE_INDEX).sum()) / max(n_target, 1)
                   for i in range(0, labels.shape[0], micro)]
        # FP8: each weight is quantized once for all of this step's micro-batches (weights change only in the
        # optimizer step, after this scope); not under CUDA graphs (see fp8_step_scope)
        fp8_scope = fp8_step_scope(t.precision, self._cudagraphs)
        if lay.pp > 1:
            with fp8_scope, self._compute_copies(masters_current=False):
                pipelined = self._pipeline_backward(mbs, weights, lam, ctx)
            return self._finish_step(start, step, global_batch, lr, lam, gamma, *pipelined)

        def forward(i, mb):
            self._before_forward()
            with ctx:
                return self.model(mb["input_ids"], mb["labels"], doc_ids=mb.get("doc_ids"), mtp_lambda=lam,
                                  balance_alpha=t.balance_alpha, return_logits=False)

        def backward(i, mb, out):
            nonlocal total
            with lay.no_sync(last=i == len(mbs) - 1):   # the gradient reduction starts in the last backward
                (out.loss * (weights[i] * lay.grad_loss_scale)).backward()
            total = total + out.loss.detach().float() * weights[i]
            for k, v in out.losses.items():
                parts[k] = parts.get(k, 0) + v.detach().float() * weights[i]

        with fp8_scope, self._compute_copies(masters_current=False):
            overlap.accumulate(mbs, forward, backward, self._fb_streams)
        lay.finish_gradients()

        loss = lay.global_mean(total)
        parts = {k: lay.global_mean(v) for k, v in parts.items()}
        return self._finish_step(start, step, global_batch, lr, lam, gamma, loss, parts, None)

    def _pipeline_backward(self, mbs, weights, lam, ctx):
        """Forward+backward of all micro-batches through the pipeline schedule (every pp rank, same data)."""
        t, lay = self.t, self.layout
        pc = lay.pc
        if pc.microbatches and pc.microbatches != len(mbs):
            raise UserError(f"parallel.microbatches = {pc.microbatches} but the batch splits into {len(mbs)} "
                            "micro-batches; set train.micro_batch_size = batch_size / microbatches")
        trace = str(self.run_dir / "traces") if pc.trace and self.step == self._trace_step else None
        loss, parts, counts = lay.pipeline_step(mbs, weights, lam, t.balance_alpha,
                                                (lambda: ctx) if self.autocast else None, trace)
        return loss, parts, counts

    def _finish_step(self, start, step, global_batch, lr, lam, gamma, loss, parts, pipeline_counts) -> dict:
        """Clip, update (or skip), move the balance biases, and build the step's metrics record."""
        t, lay = self.t, self.layout
        grad_norm = float("nan")
        skipped = not math.isfinite(loss)
        if not skipped:
            clip = t.grad_clip if t.grad_clip > 0 else float("inf")
            grad_norm = lay.clip_grad_norm_(self.model, clip)
            skipped = not math.isfinite(grad_norm)
        counts = None
        if self._log_load(step) and not skipped:
            counts = list(pipeline_counts) if pipeline_counts is not None else balance.read_counts(self.model)
        if skipped:
            # No update at all: weights, optimizer moments and balance biases stay as they were.
            balance.zero_counts(self.model)
            vios = []
            self.nan_skips += 1
            self.nan_streak += 1
        else:
            self.optimizer.step()
            if self.compute is not None:
                self.compute.mark_stale()
            vios = balance.update_balance_biases(self.model, gamma, self.all_reduce)
            if pipeline_counts is not None:  # a rank only counts its own layers: MaxVio from all of them
                from dsv3.model.moe import max_violation
                vios = [float(max_violation(c)) for c in pipeline_counts]
            self.nan_streak = 0
        self.optimizer.zero_grad(set_to_none=True)
        if self._owned_grads is not None:
            self._owned_grads.reset()

        step_tokens = global_batch * t.seq_len
        self.step += 1
        self.tokens += step_tokens
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        tps = step_tokens / elapsed
        record = {"step": self.step, "loss": loss, "lr": lr, "tokens_per_s": tps, "grad_norm": grad_norm,
                  "tokens": self.tokens, "batch_size": global_batch, "mfu": self.flops_per_token * tps / self.peak_flops,
                  "mtp_lambda": lam, "bias_gamma": gamma, "skipped": skipped, "nan_skips": self.nan_skips,
                  "step_time_s": elapsed}
        for k, v in parts.items():
            record[f"loss_{k}"] = float(v)
        record.update(lay.traffic_stats())  # EP bytes sent per rank and imbalance (a collective)
        if pipeline_counts is not None:
            tm = lay.last_pipeline_timings
            record.update({f"pp_{k}": float(v) for k, v in tm.items() if isinstance(v, (int, float))})
        record["maxvio"] = sum(vios) / len(vios) if vios else 0.0
        record["maxvio_max"] = max(vios) if vios else 0.0
        record["maxvio_layers"] = vios
        if counts is not None:
            self.expert_log.write({"step": self.step, "counts": [c.tolist() for c in counts]})
        return record

    def _log_load(self, step: int) -> bool:
        n = self.t.expert_load_every
        return n > 0 and (step + 1) % n == 0

    # ---------------------------------------------------------------- signals
    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self._stop_signal = signum
        self.progress.print(f"[yellow]signal {signal.Signals(signum).name}: saving a checkpoint after this "
                            "step (Ctrl-C again to abort without saving)[/yellow]")

    def _install_signals(self):
        if threading.current_thread() is not threading.main_thread():
            return {}
        old = {}
        for s in (signal.SIGINT, signal.SIGTERM):
            old[s] = signal.signal(s, self._on_signal)
        return old

    def _compute_copies(self, masters_current: bool):
        """``train.weight_cast = "per_step"``: the modules hold the bf16 compute copies inside, refreshed first if
        the masters changed (unless ZeRO-1's overlapped sync refreshes them as the masters land in the forward,
        and they have not all landed: ``masters_current``). Otherwise nothing."""
        if self.compute is None:
            return nullcontext()
        if masters_current or not self._refresh_in_forward:
            self.compute.refresh()
        return self.compute.swapped_in()

    def _before_forward(self) -> None:
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()

    # ------------------------------------------------------------------- eval
    def evaluate_alone(self, model) -> dict:
        t = self.t
        return evaluate(model, self.data, seq_len=t.seq_len, batch_size=t.micro_batch_size or t.batch_size,
                        max_batches=t.eval_batches, device=self.device, autocast_dtype=self.autocast,
                        document_mask=self.cfg.data.document_mask)

    def evaluate(self) -> dict:
        t = self.t
        return evaluate(self.model, self.data, seq_len=t.seq_len, batch_size=t.micro_batch_size or t.batch_size,
                        max_batches=t.eval_batches, device=self.device, autocast_dtype=self.autocast,
                        document_mask=self.cfg.data.document_mask, rank=self.layout.dp_rank,
                        world_size=self.layout.dp, all_reduce=self.layout.count_all_reduce,
                        before_forward=self._before_forward)

    def _run_eval(self) -> dict:
        # ranks may hold different numbers of evaluation batches (one may hold none): the parameters must not
        # depend on the evaluation's forwards to arrive (ZeRO-1's overlapped parameter sync)
        self.layout.wait_params()
        if self.layout.pp > 1:  # stages live on different ranks: rank 0 assembles the model and evaluates alone
            whole = self.layout.assembled_model(self.model)
            result = {}
            if self.is_main and self.compute is None:
                result = self.evaluate_alone(whole)
            elif self.is_main:   # per_step: the assembled model uses bf16 copies too, as the stages do
                copies = ComputeWeights(whole, self.compute.dtype)
                copies.refresh()
                with copies.swapped_in():
                    result = self.evaluate_alone(whole)
                del copies
            del whole
            self.layout.barrier()
        else:
            with self._compute_copies(masters_current=True):   # compiled blocks see the training dtypes
                result = self.evaluate()
        if result.get("tokens") and self.is_main:
            record = {"step": self.step, "tokens_seen": self.tokens, **result}
            self.eval_log.write(record)
            self.tb.scalars("eval", record, self.step)
            self.progress.print(f"eval  step {self.step}: loss {result['loss']:.4f} ppl {result['ppl']:.2f} "
                                f"maxvio {result.get('maxvio', 0):.2f}")
        return result

    # ------------------------------------------------------------------- loop
    def train(self, until: int | None = None) -> int:
        """Run to ``train.steps`` (or ``until``); returns 0, or 128+signal when interrupted (after saving).

        Raises UserError when ``max_nan_skips`` non-finite losses come in a row (no checkpoint is written
        then: the last one on disk is the last good state).
        """
        t = self.t
        until = until if until is not None else (t.stop_at or None)
        end = min(t.steps, until) if until is not None else t.steps
        if self.is_main:
            for name in ("metrics.jsonl", "eval.jsonl", "expert_load.jsonl"):
                metrics.truncate_jsonl(self.run_dir / name, self.step)
            self.metrics_log = metrics.JsonlWriter(self.run_dir / "metrics.jsonl")
            self.eval_log = metrics.JsonlWriter(self.run_dir / "eval.jsonl")
            self.expert_log = metrics.JsonlWriter(self.run_dir / "expert_load.jsonl")
            self.tb = metrics.TensorBoard(self.run_dir, t.tensorboard)
        else:  # only rank 0 writes files
            self.metrics_log = self.eval_log = self.expert_log = self.tb = metrics.NullSink()
        old_handlers = self._install_signals()
        loop_start, first_step = time.perf_counter(), self.step
        collector = ScheduledGC(t.gc_every).start()
        try:
            while self.step < end:
                collector.step(self.step)
                profiled = t.profile_step and self.step + 1 == t.profile_step
                with profile_one_step(self.run_dir, self.device) if profiled else nullcontext():
                    record = self.train_step()
                self.metrics_log.write({k: v for k, v in record.items()})
                self.tb.scalars("train", {k: v for k, v in record.items() if k != "maxvio_layers"}, self.step)
                done = self.step - first_step
                eta = (time.perf_counter() - loop_start) / done * (end - self.step)
                if record["skipped"] or self.step % t.log_every == 0 or self.step == end or self.step == 1:
                    self.progress.step(record, eta)
                if self.nan_streak >= t.max_nan_skips:
                    last = self.last_checkpoint or "none (no checkpoint was saved yet)"
                    raise UserError(
                        f"training stopped at step {self.step}: {self.nan_streak} non-finite losses in a row "
                        f"({self.nan_skips} in total); last good checkpoint: {last}. Lower train.lr or raise "
                        f"train.warmup_steps and resume with `dsv3 train --resume {self.run_dir}`")
                if self.layout.any(self._stop_signal is not None):  # a stop seen on any rank stops all
                    self._stop_signal = self._stop_signal or signal.SIGTERM
                    path = self.save()
                    # Printed even when quiet: the user must learn where the run stopped and how to go on.
                    print(f"interrupted: saved {path} at step {self.step}; continue with "
                          f"`dsv3 train --resume {self.run_dir}`", file=sys.stderr)
                    return 128 + int(self._stop_signal)
                if t.time_limit_min and self.layout.any(time.perf_counter() - loop_start >= 60 * t.time_limit_min):
                    self.progress.print(f"time limit of {t.time_limit_min:g} min reached at step {self.step}; "
                                        f"continue with `dsv3 train --resume {self.run_dir}`")
                    break
                if t.eval_every and self.step % t.eval_every == 0 and self.step < end:
                    self._run_eval()
                # No periodic save during a run of skipped steps: it could prune the last good checkpoints.
                if self.step % t.save_every == 0 and self.step < end and self.nan_streak == 0:
                    self.save()
            # A run stopped early (time limit, stop_at) always saves: the user resumes from it. A completed run
            # skips it only when asked (benchmarks: `small`'s checkpoint is ~30 GB of writing after the timing).
            stopped_early = self.step < t.steps
            if (t.save_final or stopped_early) and (
                    self.last_checkpoint is None or self.last_checkpoint.name != f"step_{self.step:06d}"):
                self.save()
            self.final_eval = self._run_eval() if t.eval_batches else {}
            return 0
        finally:
            collector.stop()
            for s, h in old_handlers.items():
                signal.signal(s, h)
            for sink in (self.metrics_log, self.eval_log, self.expert_log, self.tb):
                sink.close()

    def close(self) -> None:
        self.loader.close()
        self.layout.close()
        torch.use_deterministic_algorithms(self._det_before[0], warn_only=self._det_before[1])
