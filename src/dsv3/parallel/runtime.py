"""One object the trainer holds for data + expert parallelism: the calls of a training step, in order.

    mesh = init_distributed(cfg.parallel, cfg.model)           # every rank; UserError before any rendezvous
    model_cfg = model_config_for(cfg.model, mesh.config)      # node-limited routing, if configured
    model = DeepseekV3(model_cfg).to(mesh.device)             # same seed on every rank: identical init
    par = DataExpertParallel(model, mesh)                      # shards experts, installs gradient hooks
    optimizer = par.build_optimizer(train_cfg)                 # ZeRO-1 (plain AdamW for one process)
    loader = PackedLoader(..., rank=mesh.dp_rank, world_size=mesh.dp)
    per step:
        for each micro-batch (last one outside no_sync):
            with par.no_sync() if not last else nullcontext():
                loss(mb).backward()
        par.finish_gradients()                                 # averaged gradients in p.grad
        norm = par.clip_grad_norm_(max_norm)                   # global norm, same on every rank
        optimizer.step()
        update_balance_biases(model, gamma, par.count_all_reduce)
        optimizer.zero_grad(set_to_none=True)
        log par.global_mean(local_loss), par.traffic_stats()
    checkpoints: par.full_state_dict() / optimizer.state_dict() on EVERY rank (collectives), write on rank 0;
    par.load_full_state_dict(sd) / optimizer.load_state_dict(sd) on every rank.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from dsv3.parallel import data_parallel as dp
from dsv3.parallel import expert_parallel as ep
from dsv3.parallel.mesh import Mesh


class DataExpertParallel:
    """Applies EP to ``model`` (in place) and owns the gradient reducer; stateless otherwise."""

    def __init__(self, model: nn.Module, mesh: Mesh):
        self.model, self.mesh = model, mesh
        ep.apply_expert_parallel(model, mesh.ep_group, fp8_dispatch=mesh.config.fp8_dispatch,
                                 chunks=mesh.config.ep_chunks, backward_group=mesh.ep_bwd_group,
                                 dispatch=mesh.config.ep_dispatch,
                                 split_backward=mesh.pp > 1 and mesh.config.schedule == "dualpipev")
        self.expert_params = ep.expert_parameters(model)
        self.reducer = dp.GradReducer(model, mesh, self.expert_params) if mesh.dp > 1 else None
        self.count_all_reduce = dp.count_all_reduce(mesh)
        self.optimizer = None                      # set by build_optimizer

    def build_optimizer(self, train_cfg):
        # overlapped parameter sync needs the whole model (its forward runs ``layers``); a pipeline stage's
        # rank module is called piecewise
        overlap = self.mesh.config.overlap_param_sync and self.mesh.pp == 1
        self.optimizer = dp.build_zero_optimizer(self.model, self.mesh, train_cfg, self.expert_params,
                                                 overlap_param_sync=overlap)
        if (self.reducer is not None and self.mesh.config.reduce_to_owner and self.mesh.pp == 1
                and isinstance(self.optimizer, dp.ShardedOptimizer)):
            # each gradient only where ZeRO-1 steps it (a pipeline keeps the all-reduce: its tied embedding /
            # head copies are synced across stages after the reduction)
            self.reducer.reduce_to_owners(self.optimizer.owners())
        return self.optimizer

    def wait_params(self) -> None:
        """Parameters still in flight from the last ZeRO-1 step have landed (before reading them directly)."""
        if isinstance(self.optimizer, dp.ShardedOptimizer):
            self.optimizer.wait_params()

    def no_sync(self):
        return self.reducer.no_sync() if self.reducer is not None else nullcontext()

    def finish_gradients(self) -> None:
        if self.reducer is not None:
            self.reducer.finish()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        owned_only = self.reducer is not None and self.reducer.owner_of is not None
        return dp.clip_grad_norm_(self.model.parameters(), max_norm, self.mesh, self.expert_params, owned_only)

    def global_mean(self, value) -> float:
        return dp.global_mean(value, self.mesh)

    def global_sum(self, value) -> float:
        return dp.global_sum(value, self.mesh)

    def traffic_stats(self) -> dict:
        return ep.traffic_stats(self.model, self.mesh.ep_group)

    def full_state_dict(self) -> dict:
        self.wait_params()
        return ep.full_state_dict(self.model)

    def load_full_state_dict(self, state: dict, strict: bool = True):
        self.wait_params()
        return ep.load_full_state_dict(self.model, state, strict)
