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
        self.stages = self.held = None
        self.last_pipeline_timings: dict = {}
        # what each micro-batch's backward loss is multiplied by on top of its weight: 1/dp where the gradient
        # reducer sums instead of averaging (pp = 1, dp > 1), else 1
        self.grad_loss_scale = 1.0

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
    @property
    def pp(self) -> int:
        return self.mesh.pp

    def wrap(self, model) -> None:
        """Pipeline: split into this rank's stages. Otherwise shard experts over EP ranks and install the
        gradient reducer. Call before building the optimizer."""
        self.model = model
        if self.pp > 1:
            from dsv3.parallel.pipeline import build_stages, rank_module
            self.stages = build_stages(model, self.pc.schedule, self.mesh.pp_rank, self.pp)
            self.held = rank_module(self.stages)   # this rank's parameters under the full model's names
            if self.mesh.dp > 1:                   # data/expert parallel inside each pipeline stage
                from dsv3.parallel.runtime import DataExpertParallel
                self.par = DataExpertParallel(self.held, self.mesh)
        elif self.distributed:
            from dsv3.parallel.runtime import DataExpertParallel
            self.par = DataExpertParallel(model, self.mesh)
            if self.par.reducer is not None:   # the trainer's loss weights carry the 1/dp of the average
                self.grad_loss_scale = self.par.reducer.fold_average_into_loss()

    def build_optimizer(self, model, train_cfg):
        if self.par is not None:
            return self.par.build_optimizer(train_cfg)
        from dsv3.train.optim import build_optimizer
        return build_optimizer(self.held if self.pp > 1 else model, train_cfg)

    def pipeline_step(self, micro_batches, weights, mtp_lambda, balance_alpha, forward_context, trace_dir):
        """One optimizer step's forward+backward over the pipeline; (loss, parts, expert_counts [L, E])."""
        from dsv3.parallel.pipeline import PipelineLoss, run_pipeline_step
        loss_fn = PipelineLoss(mtp_lambda, balance_alpha, max(self.model.config.num_nextn_predict_layers, 1))
        # With dp > 1 the schedule's W steps write .grad directly: reduce once after the step (finish()).
        with self.par.no_sync() if self.par is not None else nullcontext():
            loss, aux = run_pipeline_step(self.pc.schedule, self.stages, micro_batches, loss_fn,
                                          group=self.mesh.pp_group, weights=weights,
                                          p2p_groups=self.mesh.p2p_groups,
                                          lookahead=self.pc.p2p_lookahead,
                                          forward_context=forward_context,
                                          trace=trace_dir)  # also sums the tied embedding's grads (1F1B)
        self.finish_gradients()
        self.last_pipeline_timings = aux.get("timings", {})
        counts = aux["expert_counts"]
        if self.count_all_reduce is not None:  # global MaxVio: counts of every data-parallel replica
            counts = counts.to(self.device)
            self.count_all_reduce(counts)
            counts = counts.cpu()
        parts = {k: self.global_mean(float(v)) for k, v in aux["loss_parts"].items()}
        return self.global_mean(float(loss)), parts, counts

    def no_sync(self, last: bool):
        """Gradient reduction waits for the last micro-batch of a step."""
        return self.par.no_sync() if (self.par is not None and not last) else nullcontext()

    def finish_gradients(self) -> None:
        if self.par is not None:
            self.par.finish_gradients()

    def wait_params(self) -> None:
        """Every rank's parameters current (ZeRO-1 with ``parallel.overlap_param_sync`` fetches them during the
        next forward): call on every rank before anything that may not run the same forwards everywhere."""
        if self.par is not None:
            self.par.wait_params()

    def on_params_landed(self, callback) -> bool:
        """ZeRO-1 with ``parallel.overlap_param_sync``: ``callback(params)`` runs as the parameters a step updated
        land during the next forward (``ShardedOptimizer.on_params_landed``); True if registered. False
        everywhere else: the parameters are current as soon as the optimizer step returns."""
        from dsv3.parallel.data_parallel import ShardedOptimizer
        opt = self.par.optimizer if self.par is not None else None
        return isinstance(opt, ShardedOptimizer) and opt.on_params_landed(callback)

    def clip_grad_norm_(self, model, max_norm: float) -> float:
        if self.pp > 1 and self.par is not None:  # global norm over dp/ep and pp; tied copies counted once
            from dsv3.parallel.data_parallel import clip_grad_norm_ as dp_clip
            from dsv3.parallel.pipeline import norm_parameters
            norm = float(dp_clip(norm_parameters(self.stages), float("inf"), self.mesh, self.par.expert_params))
            if norm > max_norm:
                scale = max_norm / (norm + 1e-6)
                for p in self.held.parameters():   # the tied copy too, so both copies stay equal
                    if p.grad is not None:
                        p.grad.mul_(scale)
            return norm
        if self.par is not None:
            return float(self.par.clip_grad_norm_(max_norm))
        if self.pp > 1:  # squares summed over the pipeline ranks; tied copies counted once
            from dsv3.parallel.pipeline import norm_parameters
            sq = torch.zeros((), dtype=torch.float64, device=self.device)
            for p in norm_parameters(self.stages):
                if p.grad is not None:
                    sq += p.grad.detach().double().pow(2).sum()
            dist.all_reduce(sq, group=self.mesh.pp_group)
            norm = float(sq.sqrt())
            if norm > max_norm:
                scale = max_norm / (norm + 1e-6)
                for p in self.held.parameters():
                    if p.grad is not None:
                        p.grad.mul_(scale)
            return norm
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
        """Full state dict (every expert, every stage) on every rank: a collective under EP and PP."""
        if self.pp > 1 and self.par is not None:  # experts gathered over EP, then stages over pp
            from dsv3.parallel.data_parallel import gather_tensor_dicts
            mine = {k: v.detach() if torch.is_tensor(v) else v for k, v in self.par.full_state_dict().items()}
            parts = gather_tensor_dicts(mine, self.mesh.pp_group)
            full = {}
            for part in parts:
                full.update(part)
            return {k: full[k] for k in _full_keys(self.model) if k in full}
        if self.pp > 1:
            from dsv3.parallel.pipeline import full_state_dict
            return full_state_dict(self.stages, self.mesh.pp_group)
        return self.par.full_state_dict() if self.par is not None else model.state_dict()

    def assembled_model(self, model):
        """Pipeline: a whole single-process model with every stage's current weights (a collective; built on
        rank 0 only, None elsewhere), for evaluation or sampling."""
        state = self.model_state(model)
        if not self.is_main:
            return None
        from dsv3.model import DeepseekV3
        whole = DeepseekV3(model.config).to(self.device)
        whole.load_state_dict(state)
        return whole

    def load_model_state(self, model, state: dict) -> None:
        if self.pp > 1 and self.par is not None:
            own = self.held.state_dict()
            self.par.load_full_state_dict({k: state[k] for k in own})
        elif self.par is not None:
            self.par.load_full_state_dict(state)
        else:
            model.load_state_dict(state)

    def optimizer_state(self, optimizer, model) -> dict:
        """Optimizer state keyed by parameter name with full expert tensors (a collective under ZeRO)."""
        from dsv3.parallel.data_parallel import named_optimizer_state
        if self.par is not None and self.pp == 1:
            return optimizer.state_dict()
        if self.pp > 1:  # each stage owns its parameters' state: gather the names of all of them
            from dsv3.parallel.data_parallel import gather_tensor_dicts
            mine = optimizer.state_dict() if self.par is not None else named_optimizer_state(optimizer, self.held)
            parts = gather_tensor_dicts(mine["state"], self.mesh.pp_group)
            merged = {}
            for part in parts:
                merged.update(part)
            return {**mine, "state": merged}
        return named_optimizer_state(optimizer, model)

    def load_optimizer_state(self, optimizer, model, state: dict) -> None:
        if _index_keyed(state):  # a checkpoint from before name-keyed optimizer state (one process only)
            optimizer.load_state_dict(state)
            return
        if self.par is not None:
            optimizer.load_state_dict(state)
        else:
            from dsv3.parallel.data_parallel import load_named_optimizer_state
            load_named_optimizer_state(optimizer, self.held if self.pp > 1 else model, state)

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _index_keyed(state: dict) -> bool:
    keys = list(state.get("state", {}).keys())
    return bool(keys) and all(isinstance(k, int) for k in keys)


def _full_keys(model) -> list[str]:
    """State-dict keys of the unsplit model, in its order (expert tensors under their usual names)."""
    return list(model.state_dict().keys())
