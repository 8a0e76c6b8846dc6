"""Process layout: world = pp x dp, with expert parallelism (ep) nested inside the data-parallel dimension.

Rank numbering (pp outermost, ep innermost so that an EP group is a block of consecutive ranks, i.e. one
node when ep <= GPUs per node, where its all-to-alls run over NVLink):

    rank    = pp_rank * dp + dp_rank
    dp_rank = edp_rank * ep + ep_rank

Groups a rank belongs to:

* ``dp_group``   the dp ranks of its pipeline stage: dense (replicated) gradients are averaged here, balance
  counts are summed here, the logged loss is averaged here.
* ``ep_group``   ep consecutive dp ranks that together hold all routed experts (rank ep_rank holds experts
  [ep_rank*E/ep, (ep_rank+1)*E/ep)); dispatch/combine all-to-alls run here.
* ``edp_group``  ("expert data parallel") the dp/ep ranks holding the SAME experts; expert gradients are
  reduced here and only here (as V3 runs EP64 inside its DP and reduces each expert over its replicas).
* ``pp_group``   the pp ranks with the same dp_rank (one per stage); only the global grad norm uses it here.
* ``ep_bwd_group`` (``parallel.fb_overlap`` only) the ep_group's ranks again, as a second communicator for
  the backward's all-to-alls: NCCL runs one communicator's collectives in issue order on one stream, so with
  one group the forward of micro-batch i+1 would queue its dispatch behind every transfer of micro-batch i's
  backward, which it is meant to run beside.

Validation (``validate_layout``) is a pure function of (world size, config): every rank computes the same
verdict from the same inputs and raises the same ``UserError`` BEFORE any rendezvous or collective, so a
bad layout never leaves some ranks waiting on others.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dsv3.config import ModelConfig
from dsv3.errors import UserError

BACKENDS = ("auto", "nccl", "gloo")


@dataclass
class ParallelConfig:
    """The ``[parallel]`` section of a run config (every key optional)."""

    pp: int = 1                       # pipeline stages
    dp: int = 0                       # data-parallel ranks per stage; 0 = world_size // pp
    ep: int = 1                       # expert-parallel ranks (divides dp); experts are split over them
    backend: str = "auto"             # 'auto' (nccl on CUDA, gloo on CPU), 'nccl' or 'gloo'
    node_limited_routing: bool = False  # routing groups = the experts of one EP rank (n_group = ep)
    fp8_dispatch: bool = False        # send dispatch payloads as E4M3 + 1x128 scales (combine stays BF16)
    ep_chunks: int = 1                # MoE token chunks per layer: chunk i+1 moves while chunk i computes
    ep_dispatch: str = "auto"         # 'alltoall', 'allgather' (every token to every EP rank, no host sync), 'auto' (allgather at ep 2 < top-k, not DualPipeV)
    fb_overlap: bool = False          # pp = 1, CUDA: micro-batch i+1's forward runs beside micro-batch i's backward
    schedule: str = "1f1b"            # pipeline schedule when pp > 1: '1f1b' or 'dualpipev'
    microbatches: int = 0             # pipeline micro-batches per step; 0 = batch / micro_batch_size
    trace: bool = False               # write a per-rank Chrome trace of the pipeline schedule
    p2p_lookahead: int = 0            # pipeline receives posted ahead of need per channel (0 = when needed; >0 untested on NCCL)
    bucket_mb: float = 25.0           # gradient all-reduce bucket size in MiB
    overlap_param_sync: bool = True   # ZeRO-1 (pp = 1): updated parameters land during the next forward, layer by layer
    reduce_to_owner: bool = True      # ZeRO-1 (pp = 1): each gradient bucket reduced to the rank that steps it
    grad_as_bucket_view: bool = True  # gradients live in the reduction buckets (reduced in place, no flatten/copy-back)
    timeout_s: float = 600.0          # collective timeout (a hang becomes an error after this long)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "ParallelConfig":
        """Build from the TOML table; unknown keys and wrong types are UserErrors naming the key."""
        d = dict(d or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for k, v in d.items():
            if k not in known:
                raise UserError(f"unknown key parallel.{k}: valid keys are {', '.join(known)}")
            t = known[k].type if isinstance(known[k].type, str) else known[k].type.__name__
            ok = {"int": isinstance(v, int) and not isinstance(v, bool),
                  "float": isinstance(v, (int, float)) and not isinstance(v, bool),
                  "bool": isinstance(v, bool), "str": isinstance(v, str)}[t]
            if not ok:
                raise UserError(f"parallel.{k} = {v!r} has the wrong type: expected {t}")
            kwargs[k] = float(v) if t == "float" else v
        return cls(**kwargs)


def validate_layout(world_size: int, pc: ParallelConfig, model: ModelConfig | None = None) -> tuple[int, int, int]:
    """Check a layout without any communication; returns (pp, dp, ep) or raises UserError (one line + fix)."""
    if pc.backend not in BACKENDS:
        raise UserError(f"parallel.backend = {pc.backend!r} is invalid: use one of {', '.join(BACKENDS)}")
    for name in ("pp", "ep"):
        if getattr(pc, name) < 1:
            raise UserError(f"parallel.{name} = {getattr(pc, name)} is invalid: it must be >= 1")
    if pc.dp < 0:
        raise UserError(f"parallel.dp = {pc.dp} is invalid: it must be >= 1 (or 0 for world_size // pp)")
    if pc.schedule not in ("1f1b", "dualpipev"):
        raise UserError(f"parallel.schedule = {pc.schedule!r} is invalid: use '1f1b' or 'dualpipev'")
    if pc.microbatches < 0:
        raise UserError(f"parallel.microbatches = {pc.microbatches} is invalid: use 0 (derived) or a positive count")
    if pc.ep_chunks < 1:
        raise UserError(f"parallel.ep_chunks = {pc.ep_chunks} is invalid: it must be >= 1 (1 = no chunking)")
    from dsv3.parallel.expert_parallel import DISPATCH_CHOICES, allgather_unsupported
    if pc.ep_dispatch not in DISPATCH_CHOICES:
        raise UserError(f"parallel.ep_dispatch = {pc.ep_dispatch!r} is invalid: use 'alltoall' (token copies to "
                        f"their experts' ranks), 'allgather' (fixed-size exchanges, no host sync) or 'auto'")
    if pc.ep_dispatch == "allgather" and (pc.fp8_dispatch or pc.ep_chunks > 1):
        raise UserError(allgather_unsupported(pc.fp8_dispatch, pc.ep_chunks, False))
    if pc.fb_overlap and pc.pp > 1:
        raise UserError("parallel.fb_overlap is for pp = 1 (pipeline schedules pair forwards and backwards "
                        "themselves); set fb_overlap = false or pp = 1")
    if pc.bucket_mb <= 0 or pc.timeout_s <= 0:
        raise UserError("parallel.bucket_mb and parallel.timeout_s must be > 0")
    pp = pc.pp
    if world_size % pp:
        raise UserError(f"world size {world_size} is not divisible by parallel.pp = {pp}; launch a multiple of "
                        f"{pp} processes or change pp")
    dp = pc.dp or world_size // pp
    if pp * dp != world_size:
        raise UserError(f"world size {world_size} != parallel.pp * parallel.dp = {pp} * {dp}; launch {pp * dp} "
                        f"processes (torchrun --nproc-per-node) or set dp = 0 to derive it")
    ep = pc.ep
    if dp % ep:
        raise UserError(f"parallel.ep = {ep} does not divide the data-parallel size {dp}: experts are sharded "
                        f"inside the data-parallel ranks; choose ep among the divisors of {dp}")
    if model is not None and ep > 1:
        if not model.n_routed_experts:
            raise UserError(f"parallel.ep = {ep} but the model has no routed experts; set parallel.ep = 1")
        if model.n_routed_experts % ep:
            raise UserError(f"model.n_routed_experts = {model.n_routed_experts} is not divisible by parallel.ep = "
                            f"{ep}; choose ep dividing the expert count")
    if model is not None and pc.node_limited_routing:
        node_limited_config(model, ep)  # raises if the routing groups cannot be the EP ranks
    return pp, dp, ep


def node_limited_config(model: ModelConfig, ep: int) -> ModelConfig:
    """The model config with one routing group per EP rank (n_group = ep), so topk_group bounds how many ranks
    a token's copies reach (V3's node-limited routing, mapped onto ranks). Changes the model: the single-
    process reference must use the same config."""
    if ep < 2:
        raise UserError("parallel.node_limited_routing needs parallel.ep >= 2 (one routing group per EP rank)")
    if model.topk_group > ep:
        raise UserError(f"parallel.node_limited_routing with ep = {ep} but model.topk_group = "
                        f"{model.topk_group} > ep; lower topk_group to at most {ep}")
    try:
        return model.replace(n_group=ep).validate()
    except UserError as e:
        raise UserError(f"parallel.node_limited_routing (n_group = ep = {ep}): {e}") from None


def model_config_for(model: ModelConfig, pc: ParallelConfig | dict | None) -> ModelConfig:
    """The model config to build under this layout: unchanged, or node-limited (n_group = ep) when
    ``parallel.node_limited_routing`` is on. Call before constructing the model, on every rank."""
    pc = pc if isinstance(pc, ParallelConfig) else ParallelConfig.from_dict(pc)
    return node_limited_config(model, pc.ep) if pc.node_limited_routing else model


@dataclass
class Mesh:
    """This rank's coordinates and process groups (None groups mean a single process: no communication)."""

    rank: int = 0
    world_size: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    pp_rank: int = 0
    dp_rank: int = 0
    ep_rank: int = 0
    edp_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    backend: str = "none"
    config: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    dp_group: Any = None
    ep_group: Any = None
    edp_group: Any = None
    pp_group: Any = None
    ep_bwd_group: Any = None
    # (src pp rank, dst pp rank) -> a two-rank group that carries only src -> dst pipeline messages
    p2p_groups: dict = dataclasses.field(default_factory=dict)

    @property
    def edp(self) -> int:
        """Replicas of each expert shard (ranks in ``edp_group``)."""
        return self.dp // self.ep

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def layout_ranks(world_size: int, pp: int, dp: int, ep: int) -> dict[str, list[list[int]]]:
    """All groups of each kind, as global rank lists (the same lists on every rank)."""
    def rank(p, e_dp, e):
        return p * dp + e_dp * ep + e
    edp = dp // ep
    return {
        "dp": [[p * dp + d for d in range(dp)] for p in range(pp)],
        "ep": [[rank(p, j, e) for e in range(ep)] for p in range(pp) for j in range(edp)],
        "edp": [[rank(p, j, e) for j in range(edp)] for p in range(pp) for e in range(ep)],
        "pp": [[p * dp + d for p in range(pp)] for d in range(dp)],
    }


def mesh_for(rank: int, world_size: int, pc: ParallelConfig, model: ModelConfig | None = None,
             device: torch.device | None = None, backend: str = "none") -> Mesh:
    """Coordinates of ``rank`` (no groups yet): pure arithmetic, used by init and by tests."""
    pp, dp, ep = validate_layout(world_size, pc, model)
    pp_rank, dp_rank = divmod(rank, dp)
    edp_rank, ep_rank = divmod(dp_rank, ep)
    return Mesh(rank=rank, world_size=world_size, pp=pp, dp=dp, ep=ep, pp_rank=pp_rank, dp_rank=dp_rank,
                ep_rank=ep_rank, edp_rank=edp_rank, device=device or torch.device("cpu"), backend=backend,
                config=pc)


def pick_backend(requested: str, device: torch.device) -> str:
    if requested != "auto":
        if requested == "nccl" and device.type != "cuda":
            raise UserError("parallel.backend = 'nccl' needs CUDA devices; use 'gloo' (or 'auto') on the CPU")
        return requested
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(pc: ParallelConfig | dict | None = None, model: ModelConfig | None = None,
                     device: str | torch.device = "auto") -> Mesh:
    """Join the job started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and build the groups.

    Without torchrun's environment this is a single process: a Mesh with no groups (every wrapper in
    dsv3.parallel then does no communication). The layout is validated before the rendezvous, so a bad one
    raises the same UserError on every rank instead of hanging.
    """
    pc = pc if isinstance(pc, ParallelConfig) else ParallelConfig.from_dict(pc)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # 'cuda' under torchrun: this process's GPU
        device = torch.device("cuda", local_rank)
    mesh = mesh_for(rank, world_size, pc, model, device)        # raises on every rank alike
    if world_size == 1 and not dist.is_initialized():
        return mesh
    backend = pick_backend(pc.backend, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=pc.timeout_s),
                                device_id=device if device.type == "cuda" else None)
    mesh.backend = backend
    build_groups(mesh)
    return mesh


def build_groups(mesh: Mesh) -> Mesh:
    """Create every group of every kind (new_group is collective: all ranks create all groups, same order)."""
    ranks = layout_ranks(mesh.world_size, mesh.pp, mesh.dp, mesh.ep)
    for kind in ("dp", "ep", "edp", "pp"):
        for members in ranks[kind]:
            g = dist.new_group(members)
            if mesh.rank in members:
                setattr(mesh, f"{kind}_group", g)
    if mesh.config.fb_overlap and mesh.ep > 1:
        for members in ranks["ep"]:
            g = dist.new_group(members)
            if mesh.rank in members:
                mesh.ep_bwd_group = g
    if mesh.pp > 1:
        build_p2p_groups(mesh, ranks["pp"])
    return mesh


def build_p2p_groups(mesh: Mesh, pp_lists: list[list[int]]) -> None:
    """One group per direction between neighbouring stages, and connect each once, in a fixed order.

    Why: NCCL runs a pair's sends and receives on one stream per communicator, in issue order, and a
    receive kernel holds that stream until its data arrives. With both directions on one communicator, a
    receive posted ahead on rank a (waiting for b's send) and one posted ahead on rank b (waiting for a's
    send) each block the send the other waits for: a deadlock that gloo never shows. With a group per
    direction, a rank only sends on one and only receives on the other, both in the same message order,
    so every transfer can complete. The warm-up exchange creates each communicator while all ranks walk
    the same list (lazy creation inside the schedule could block two ranks on two different groups).
    """
    for members in pp_lists:
        for i in range(len(members) - 1):
            for a, b in ((i, i + 1), (i + 1, i)):
                g = dist.new_group([members[a], members[b]])
                if mesh.rank in (members[a], members[b]):
                    mesh.p2p_groups[(a, b)] = g
    token = torch.zeros(1, device=mesh.device)
    for (a, b), g in sorted(mesh.p2p_groups.items()):
        if mesh.pp_rank == a:
            dist.send(token, dst=dist.get_global_rank(mesh.pp_group, b), group=g)
        else:
            dist.recv(token, src=dist.get_global_rank(mesh.pp_group, a), group=g)


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)
