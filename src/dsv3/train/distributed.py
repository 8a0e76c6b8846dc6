"""The trainer's view of the process layout: one object whose calls are no-ops in a single process.

It joins the torchrun job (`dsv3.parallel.mesh.init_distributed`), wraps the model for data + expert
parallelism (`dsv3.parallel.runtime.DataExpertParallel`), and gives the trainer global reductions, the
rank-0 rule for output, and layout-independent checkpoint state (full expert tensors, optimizer state keyed
by parameter name), so a run saved at one (pp, dp, ep) resumes at another.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist

from dsv3.parallel.mesh import ParallelConfig, init_distributed, model_config_for


class Layout:
    """Mesh + parallel wrappers for one run."""

    def __init__(self, parallel: dict, model_config, device: str):
        self.pc = ParallelConfig.from_dict(parallel)
        self.mesh = init_distributed(self.pc, model_config, device=device)
        self.model_config = model_config_for(model_config, self.pc)
        self.par = None

    # ----------------------------------------------------------------- facts
    @property
    def distributed(self) -> bool:
        return self.mesh.distributed

    @property
    def is_main(self) -> bool:
        return self.mesh.rank == 0

    @property
    def device(self) -> torch.device:
        return self.mesh.device

    @property
    def dp(self) -> int:
        return self.mesh.dp

    @property
    def dp_rank(self) -> int:
        return self.mesh.dp_rank

    # ----------------------------------------------------------- model / optim
    def wrap(self, model) -> None:
        """Shard experts over EP ranks and install the gradient reducer (before building the optimizer)."""
        if self.distributed:
            from dsv3.parallel.runtime import DataExpertParallel
            self.par = DataExpertParallel(model, self.mesh)

    def build_optimizer(self, model, train_cfg):
        if self.par is not None:
            return self.par.build_optimizer(train_cfg)
        from dsv3.train.optim import build_optimizer
        return build_optimizer(model, train_cfg)

    def no_sync(self, last: bool):
        """Gradient reduction waits for the last micro-batch of a step."""
        return self.par.no_sync() if (self.par is not None and not last) else nullcontext()

    def finish_gradients(self) -> None:
        if self.par is not None:
            self.par.finish_gradients()

    def clip_grad_norm_(self, model, max_norm: float) -> float:
        if self.par is not None:
            return float(self.par.clip_grad_norm_(max_norm))
        params = [p for p in model.parameters() if p.grad is not None]
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    @property
    def count_all_reduce(self):
        return self.par.count_all_reduce if self.par is not None else None

    # ---------------------------------------------------------------- reduce
    def global_sum(self, value) -> float:
        return float(value) if self.par is None else float(self.par.global_sum(value))

    def global_mean(self, value) -> float:
        return float(value) if self.par is None else float(self.par.global_mean(value))

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank says True (e.g. one rank got SIGTERM)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def traffic_stats(self) -> dict:
        if self.par is None or self.mesh.ep == 1:
            return {}
        return self.par.traffic_stats()

    # ------------------------------------------------------------ checkpoint
    def model_state(self, model) -> dict:
        """Full state dict (every expert) on every rank: a collective under EP."""
        return self.par.full_state_dict() if self.par is not None else model.state_dict()

    def load_model_state(self, model, state: dict) -> None:
        if self.par is not None:
            self.par.load_full_state_dict(state)
        else:
            model.load_state_dict(state)

    def optimizer_state(self, optimizer, model) -> dict:
        """Optimizer state keyed by parameter name with full expert tensors (a collective under ZeRO)."""
        if self.par is not None:
            return optimizer.state_dict()
        from dsv3.parallel.data_parallel import named_optimizer_state
        return named_optimizer_state(optimizer, model)

    def load_optimizer_state(self, optimizer, model, state: dict) -> None:
        if _index_keyed(state):  # a checkpoint from before name-keyed optimizer state (one process only)
            optimizer.load_state_dict(state)
            return
        if self.par is not None:
            optimizer.load_state_dict(state)
        else:
            from dsv3.parallel.data_parallel import load_named_optimizer_state
            load_named_optimizer_state(optimizer, model, state)

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _index_keyed(state: dict) -> bool:
    keys = list(state.get("state", {}).keys())
    return bool(keys) and all(isinstance(k, int) for k in keys)
