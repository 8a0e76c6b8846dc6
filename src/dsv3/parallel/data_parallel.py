"""Data parallelism with ZeRO-1: gradients averaged in buckets during backward, optimizer state sharded.

Why these pieces:

* Optimizer sharding is torch's ``ZeroRedundancyOptimizer`` (each rank keeps the AdamW state of its share of
  the parameters, steps them, and broadcasts them to the others). Two instances: one over ``dp_group`` for
  the replicated (dense) parameters, one over ``edp_group`` for the EP-sharded experts, whose replicas are
  only the ranks holding the same experts.
* Gradient reduction is hand-written (``GradReducer``, ~100 lines). DDP would do the bucketing, but it reduces
  every parameter over one group, so the expert shards (different tensors on different EP ranks, reduced over
  their replica group only) would need DDP's private ignore-list API, and it wraps the module (renaming every
  parameter). FSDP2 ``fully_shard`` turns parameters into DTensors (ZeRO-2/3 semantics), which the
  single-device model, the expert sharding and the checkpoint code would all have to understand.

Scaling: a rank's loss is the mean over ITS tokens; the single-process gradient is the mean over ranks.
Dense gradients: sum over dp_group / dp. Expert gradients: the EP all-to-all backward has already summed
the contributions of the ep ranks of this EP group into this rank's experts, so the remaining sum is over
the dp/ep replicas (edp_group), still divided by dp (not by dp/ep). Both are "pre-divide by dp, then sum".
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from dsv3.parallel.mesh import Mesh, group_size


class _Bucket:
    def __init__(self, group, params: list[nn.Parameter], owner: int | None = None, as_view: bool = False):
        self.group, self.params = group, params
        self.owner = owner          # global rank the bucket is reduced to (None: all-reduced)
        self.pending = len(params)
        self.flat: torch.Tensor | None = None
        self.work = None
        # grad_as_bucket_view: one persistent flat buffer; each parameter's gradient lives in its slice.
        # Allocated at the first backward (``ensure_views``), not here: the buckets are rebuilt once when the
        # optimizer's owners are known, and two sets of gradient-sized buffers would then coexist.
        self.as_view = as_view
        self.buffer: torch.Tensor | None = None
        self.views: list[torch.Tensor] = []

    def ensure_views(self) -> list[torch.Tensor]:
        """The bucket's flat buffer (allocated on first use) as one view per parameter, in ``params`` order."""
        if self.buffer is None:
            p0 = self.params[0]
            self.buffer = torch.zeros(sum(p.numel() for p in self.params), dtype=p0.dtype, device=p0.device)
            offsets = [0]
            for p in self.params:
                offsets.append(offsets[-1] + p.numel())
            self.views = [self.buffer[a:b].view_as(p) for p, a, b in zip(self.params, offsets, offsets[1:])]
        return self.views

    def reset(self) -> None:
        self.pending, self.flat, self.work = len(self.params), None, None


class GradReducer:
    """Average gradients over data-parallel replicas, bucket by bucket, while backward is still running.

    Each parameter gets a ``register_post_accumulate_grad_hook``; when the last parameter of a bucket has
    its gradient, the bucket is flattened, pre-divided by dp and all-reduced asynchronously. Buckets are
    launched strictly in index order on every rank (as DDP does), so ranks issue collectives in the same
    order even if their hooks fire in a different order. Parameters are bucketed in reverse registration
    order, roughly the order backward produces them.

    Gradient accumulation: only the backward of the step's LAST micro-batch reduces. Wrap the others in
    ``with reducer.no_sync():``; call ``finish()`` after the last backward (it also reduces buckets whose
    parameters got no gradient, with zeros, so no rank waits on a collective another rank skipped).

    ``grad_as_bucket_view`` (the default): each bucket is one persistent flat buffer and every gradient lives in
    its slice, so the reduction runs in place. Without it a bucket is flattened (``cat``: 8 bytes per fp32
    parameter), pre-divided (8) and copied back (8). With it, and the 1/dp folded into the caller's loss
    (``fold_average_into_loss``, as the trainer does), the only extra pass is the first backward's: autograd
    hands over a fresh gradient tensor when ``p.grad`` is None (after ``zero_grad(set_to_none=True)``), so the
    hook copies it into the slice (8) and points ``p.grad`` there; later micro-batches accumulate in place.
    """

    def __init__(self, model: nn.Module, mesh: Mesh, expert_params: Iterable[nn.Parameter] = (),
                 bucket_mb: float | None = None, grad_as_bucket_view: bool | None = None):
        self.mesh = mesh
        self.as_view = mesh.config.grad_as_bucket_view if grad_as_bucket_view is None else grad_as_bucket_view
        self.scale = 1.0 / mesh.dp
        self._cap = int((bucket_mb if bucket_mb is not None else mesh.config.bucket_mb) * 2 ** 20)
        self._expert_ids = {id(p) for p in expert_params}
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.owner_of: dict[int, int] | None = None
        self._make_buckets()
        self._sync = True
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._params]

    def _make_buckets(self) -> None:
        """Buckets in reverse registration order (roughly the order backward produces gradients), each of one
        (group, dtype, device) and, reducing to owners, of one owner; a new key or the size cap starts a new one."""
        self.buckets: list[_Bucket] = []
        cur, cur_bytes, cur_key, cur_group, cur_owner = [], 0, None, None, None
        for p in reversed(self._params):
            group = self.mesh.edp_group if id(p) in self._expert_ids else self.mesh.dp_group
            owner = None if self.owner_of is None else self.owner_of[id(p)]
            key = (id(group), p.dtype, p.device, owner)
            nbytes = p.numel() * p.element_size()
            if cur and (key != cur_key or cur_bytes + nbytes > self._cap):
                self.buckets.append(_Bucket(cur_group, cur, cur_owner, self.as_view))
                cur, cur_bytes = [], 0
            cur.append(p)
            cur_bytes += nbytes
            cur_key, cur_group, cur_owner = key, group, owner
        if cur:
            self.buckets.append(_Bucket(cur_group, cur, cur_owner, self.as_view))
        self._place = {id(p): (i, j) for i, b in enumerate(self.buckets) for j, p in enumerate(b.params)}
        self._next = 0          # next bucket to launch (index order)
        self._ready = [False] * len(self.buckets)

    def fold_average_into_loss(self) -> float:
        """Reduce by plain sums from now on and return the factor (1/dp) the caller multiplies its loss by
        instead: the average then costs nothing, where the pre-divide read and wrote every gradient (8 bytes
        per fp32 parameter). Only for callers that scale their own loss (the trainer); anything that expects
        averaged gradients after ``finish`` keeps the default."""
        folded, self.scale = self.scale, 1.0
        return folded

    def reduce_to_owners(self, owner_of: dict[int, int]) -> None:
        """ZeRO-1 needs each gradient only on the rank that steps its parameter: reduce every bucket to its
        owner (``owner_of``: id(param) -> global rank) instead of all-reducing it, half the bytes on the link.
        After ``finish`` a rank holds the averaged gradients of its own parameters and None for the others
        (so ``clip_grad_norm_(owned_only=True)`` sums squares over the ranks)."""
        self.owner_of = dict(owner_of)
        self._make_buckets()

    # -------------------------------------------------------------------- control
    @contextmanager
    def no_sync(self):
        """Backward passes inside only accumulate local gradients (micro-batches before the last)."""
        old, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = old

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    # ----------------------------------------------------------------- machinery
    def _on_grad(self, p: nn.Parameter) -> None:
        i, slot = self._place[id(p)]
        b = self.buckets[i]
        if b.as_view:
            self._attach(p, b.ensure_views()[slot])
        if not self._sync:
            return
        b.pending -= 1
        if b.pending == 0:
            self._ready[i] = True
            while self._next < len(self.buckets) and self._ready[self._next]:
                self._launch(self.buckets[self._next])
                self._next += 1

    @staticmethod
    @torch.no_grad()
    def _attach(p: nn.Parameter, view: torch.Tensor) -> None:
        """Make ``p.grad`` the bucket slice ``view`` (copying a freshly produced gradient into it)."""
        g = p.grad
        if g is None or g.data_ptr() != view.data_ptr():
            if g is None:
                view.zero_()
            else:
                view.copy_(g)
            p.grad = view

    def _launch(self, b: _Bucket) -> None:
        if b.as_view:
            for p, view in zip(b.params, b.ensure_views()):   # parameters no backward reached this step: zeros
                self._attach(p, view)
            b.flat = b.buffer
        else:
            grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in b.params]
            b.flat = torch.cat(grads)
        if self.scale != 1.0:
            b.flat.mul_(self.scale)
        if group_size(b.group) > 1:
            if b.owner is None:
                b.work = dist.all_reduce(b.flat, group=b.group, async_op=True)
            else:
                b.work = dist.reduce(b.flat, dst=b.owner, group=b.group, async_op=True)

    @torch.no_grad()
    def finish(self) -> None:
        """Launch what backward did not, wait for every bucket, write the averaged gradients back."""
        if not self._sync:
            return
        while self._next < len(self.buckets):
            self._launch(self.buckets[self._next])
            self._next += 1
        me = dist.get_rank() if dist.is_initialized() else 0
        for b in self.buckets:
            if b.work is not None:
                b.work.wait()
            if b.owner is not None and b.owner != me:   # reduced to another rank: nothing to keep here
                for p in b.params:
                    p.grad = None
                b.reset()
                continue
            if b.as_view:                 # reduced in place: p.grad is already the result
                b.reset()
                continue
            offset = 0
            for p in b.params:
                g = b.flat[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
            b.reset()
        self._next = 0
        self._ready = [False] * len(self.buckets)


# ------------------------------------------------------------------------------ optimizer (ZeRO-1)

def _deferred_sync_zero_class():
    """ZeroRedundancyOptimizer whose ``step`` only updates this rank's shard: ``ShardedOptimizer`` broadcasts
    the parameters itself during the next forward, one per call, a layer ahead of the computation. torch's own
    ``_sync_params`` broadcasts each rank's whole shard and waits at once, so the transfer (29 ms of a 601 ms
    DP=2 step of `small` on two H200s) had nothing beside it."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    class DeferredSyncZero(ZeroRedundancyOptimizer):
        def _sync_params(self):
            pass
    return DeferredSyncZero


class ShardedOptimizer:
    """ZeRO-1 over the mesh: one ZeroRedundancyOptimizer for dense params (dp_group), one for expert shards
    (edp_group). Looks like a torch optimizer to the trainer: ``param_groups`` (set ``lr`` there), ``step``,
    ``zero_grad``.

    ``overlap_param_sync``: ``step`` updates this rank's shard and returns; the parameters travel from their
    owners during the next forward. Its pre-hooks launch the broadcasts group by group, one group ahead of the
    computation (groups: everything outside ``model.layers`` (embedding, final norm, head, MTP), then each
    decoder layer), and each waits for its own group, so layer i+1's transfer runs beside layer i's compute.
    Launching from the forward, not from ``step``, keeps the transfers clear of what ends a step (the
    trainer's device synchronize, the balance-count all-reduce read on the host), which would otherwise wait
    for all of them. Anything else that reads parameters calls ``wait_params()`` first (``step``, checkpoints).
    Every rank launches the same groups in the same order (the same forwards run on every rank)."""

    def __init__(self, model: nn.Module, groups: list[dict], mesh: Mesh, expert_params: Iterable[nn.Parameter],
                 optimizer_class, overlap_param_sync: bool = False, **defaults):
        from torch.distributed.optim import ZeroRedundancyOptimizer

        self._pending: dict[int, object] = {}    # id(param) -> its broadcast's handle (None: not launched yet)
        zero_class = ZeroRedundancyOptimizer
        self._groups: list[list[nn.Parameter]] = []   # forward order; launched in this order on every rank
        self._next_group = 0
        self._landed: list[Callable[[list[nn.Parameter]], object]] = []   # on_params_landed callbacks
        if overlap_param_sync:
            zero_class = _deferred_sync_zero_class()
            self._groups = _forward_groups(model)
            self._next_group = len(self._groups)
            _install_param_waits(model, self._wait_group)
        self.mesh = mesh
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.expert_slices = _expert_slices(model)
        expert_ids = {id(p) for p in expert_params}
        parts = {"dense": [], "expert": []}
        for g in groups:
            opts = {k: v for k, v in g.items() if k != "params"}
            for kind, keep in (("dense", False), ("expert", True)):
                ps = [p for p in g["params"] if (id(p) in expert_ids) == keep]
                if ps:
                    parts[kind].append({"params": ps, **opts})
        self.parts = []
        for kind, pg in (("dense", mesh.dp_group), ("expert", mesh.edp_group)):
            if parts[kind]:
                self.parts.append(zero_class(parts[kind], optimizer_class=optimizer_class, process_group=pg,
                                             parameters_as_bucket_view=True, **defaults))
        # id(param) -> (global rank of its owner, the group it is broadcast over), for the groups of more than
        # one rank; the partition is fixed, so this is worked out once, not per step and parameter
        self._source = {id(p): (dist.get_global_rank(z.process_group, r), z.process_group)
                        for z in self.parts if z.world_size > 1 for p, r in z._param_to_rank.items()}

    @property
    def param_groups(self) -> list[dict]:
        return [g for z in self.parts for g in z.param_groups]

    def step(self, closure=None):
        # The previous step's broadcasts land before this one writes the parameters again. Same order on every
        # rank: dense broadcasts (dp_group), then expert broadcasts (edp_group).
        self.wait_params()
        for z in self.parts:
            z.step()
        if self._groups:   # every parameter now awaits its owner's values; the next forward fetches them
            self._pending = {id(p): None for g in self._groups for p in g}
            self._next_group = 0

    def _launch_through(self, last: int) -> None:
        """Launch the broadcasts of groups up to ``last`` not yet launched, in group order: one async broadcast
        per parameter from its owner, dense and expert shards interleaved in forward order."""
        while self._next_group <= min(last, len(self._groups) - 1):
            for p in self._groups[self._next_group]:
                source = self._source.get(id(p))
                if source is None:                      # a one-rank group: already current
                    self._pending.pop(id(p), None)
                else:
                    src, group = source
                    self._pending[id(p)] = dist.broadcast(p.data, src=src, group=group, async_op=True)
            self._next_group += 1

    def _wait_group(self, i: int) -> None:
        """Forward pre-hook of group ``i``: launch it and the next one (prefetch), then wait for its own."""
        if self._next_group >= len(self._groups) and not self._pending:
            return
        self._launch_through(i + 1)
        for p in self._groups[i]:
            work = self._pending.pop(id(p), None)
            if work is not None:
                work.wait()
        for callback in self._landed:
            callback(self._groups[i])

    def on_params_landed(self, callback: Callable[[list[nn.Parameter]], object]) -> bool:
        """With ``overlap_param_sync``: call ``callback(params)`` whenever parameters updated by a step have
        landed, group by group inside the next forward's waits (and for all groups in ``wait_params``, maybe
        again). Returns False, registering nothing, without ``overlap_param_sync`` (parameters are current when
        ``step`` returns). The trainer's bf16 compute copies refresh this way (``dsv3.train.compute_weights``)."""
        if not self._groups:
            return False
        self._landed.append(callback)
        return True

    def owners(self) -> dict[int, int]:
        """id(param) -> global rank of the rank that steps it (ZeroRedundancyOptimizer's partition)."""
        me = dist.get_rank()
        return {id(p): self._source[id(p)][0] if id(p) in self._source else me
                for z in self.parts for p in z._param_to_rank}

    def wait_params(self) -> None:
        """Every parameter is current (``overlap_param_sync``): the broadcasts not launched yet are launched, in
        order, and all are waited for. A collective: every rank calls it at the same point."""
        if self._groups:
            self._launch_through(len(self._groups) - 1)
        for work in self._pending.values():
            if work is not None:
                work.wait()
        self._pending.clear()
        if self._landed:
            every = [p for g in self._groups for p in g]
            for callback in self._landed:
                callback(every)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for z in self.parts:
            z.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """Layout-independent optimizer state, the same on every rank (COLLECTIVE over dp_group: call on all
        ranks): per parameter NAME, full-size CPU tensors (expert moments re-assembled to [E, ...]). Loads into
        any other layout, or into a single process with ``load_named_optimizer_state``.

        Gathered in two rounds: ``all_gather_object`` of small metadata only (each rank's ep_rank, parameter
        names, state keys, tensor shapes and dtypes, and the non-tensor values), then the tensors themselves as
        raw bytes, broadcast from their owner over dp_group in buffers of at most ``_GATHER_CHUNK_BYTES``
        (several small tensors packed into one buffer, so the collectives scale with the state's size, not
        with the number of parameters). On NCCL the buffers travel on ``mesh.device``; every rank ends with
        the whole state in host memory, so this suits models whose optimizer state fits one host's memory."""
        self.wait_params()
        if group_size(self.mesh.dp_group) > 1:
            gathered = _gather_states(self.mesh, self._local_state(to_cpu=False))
        else:
            gathered = [(self.mesh.ep_rank, self._local_state())]
        return self._assemble(gathered)

    def _local_state(self, to_cpu: bool = True) -> dict:
        """This rank's state by parameter name (tensors detached; on the CPU unless ``to_cpu`` is False)."""
        local = {}
        for z in self.parts:
            for p, st in z.optim.state.items():
                local[self.names[id(p)]] = {k: (v.detach().cpu() if to_cpu else v.detach()) if torch.is_tensor(v)
                                            else v for k, v in st.items()}
        return local

    def _assemble(self, gathered: list[tuple[int, dict]]) -> dict:
        """(ep_rank, {name: {key: value}}) per dp rank -> the named format (expert shards concatenated)."""
        full, shards = {}, {}
        for ep_rank, st in gathered:
            for name, v in st.items():
                if name in self.expert_slices:
                    shards.setdefault(name, {})[ep_rank] = v
                else:
                    full[name] = v
        for name, by_rank in shards.items():
            first = by_rank[0]
            full[name] = {k: torch.cat([by_rank[r][k] for r in range(self.mesh.ep)])
                          if torch.is_tensor(v) and v.ndim > 0 else v for k, v in first.items()}
        return {"format": NAMED_FORMAT, "state": full}

    def _state_dict_via_objects(self) -> dict:
        """The former ``state_dict``: every rank's state pickled through ``all_gather_object`` (slow and
        memory-hungry on NCCL). Kept only as the reference for tests of ``state_dict``."""
        local = self._local_state()
        if group_size(self.mesh.dp_group) > 1:
            gathered = [None] * self.mesh.dp
            dist.all_gather_object(gathered, (self.mesh.ep_rank, local), group=self.mesh.dp_group)
        else:
            gathered = [(self.mesh.ep_rank, local)]
        return self._assemble(gathered)

    def load_state_dict(self, state: dict) -> None:
        """Load a ``state_dict()`` of any layout (no communication); each rank takes its owned parameters'
        state, expert tensors sliced to its shard. Hyperparameters (lr, ...) are not restored: the trainer
        sets them from the config and schedules."""
        self.wait_params()
        for z in self.parts:
            _load_named(z.optim, self.names, self.expert_slices, state)

    def local_state_dicts(self) -> list[dict]:
        """This rank's shard of the optimizer state (per inner optimizer); layout-dependent."""
        return [z.optim.state_dict() for z in self.parts]

    def load_local_state_dicts(self, states: list[dict]) -> None:
        for z, s in zip(self.parts, states):
            z.optim.load_state_dict(s)


def _forward_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """Parameters grouped in the order the next forward first needs them: everything outside ``model.layers``
    (embedding, final norm, head, MTP: the model's pre-hook), then each decoder layer's own."""
    layers = list(getattr(model, "layers", ()))
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    return [[p for p in model.parameters() if id(p) not in in_layers]] + [list(layer.parameters()) for layer in layers]


def _install_param_waits(model: nn.Module, wait_group: Callable[[int], None]) -> None:
    """Forward pre-hooks: the model's for group 0, decoder layer i's for group i + 1 (``_forward_groups``).
    They run eagerly (``torch.compiler.disable``): a compiled layer breaks its graph once, before any of its
    computation, to launch and wait on the communication."""
    layers = list(getattr(model, "layers", ()))

    def waiter(i):
        @torch.compiler.disable
        def hook(module, args):
            wait_group(i)
        return hook
    model.register_forward_pre_hook(waiter(0))
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(waiter(i + 1))


NAMED_FORMAT = "dsv3-named-optimizer-v1"

# Largest buffer (bytes) that ``state_dict`` broadcasts at once (a single bigger tensor goes alone, uncopied on
# its owner): bounds the extra device memory of a checkpoint while keeping the number of collectives small.
_GATHER_CHUNK_BYTES = 256 * 2 ** 20


def _gather_states(mesh: Mesh, local: dict) -> list[tuple[int, dict]]:
    """(ep_rank, {name: {key: value}}) of every rank of dp_group, in group-rank order (COLLECTIVE): the
    tensor-wise gather of ``gather_tensor_dicts`` over dp_group, with each rank's ep_rank carried in the
    metadata round."""
    headers, dicts = _gather_tensor_dicts(local, mesh.dp_group, header=mesh.ep_rank)
    return list(zip(headers, dicts))


def gather_tensor_dicts(local: dict, group, chunk_bytes: int | None = None) -> list[dict]:
    """Every rank's ``local`` dict, in group-rank order, with its tensors as CPU tensors (COLLECTIVE over
    ``group``; None means the default group): what ``dist.all_gather_object`` of the dicts returns, bit for
    bit (keys in order, dtypes, shapes, 0-dim tensors, non-tensor values), without pickling the tensors.

    ``local`` maps keys to tensors, to non-tensor values, or to dicts one level deep of {key: tensor | value}
    (optimizer state: name -> {"step", "exp_avg", ...}); anything deeper counts as a non-tensor value.

    Round 1, ``all_gather_object`` of metadata: per rank, its keys in order with per entry ("tensor", shape,
    dtype), ("value", v) or ("dict", [(key, spec), ...]). Round 2: every rank walks the tensors in the same
    order (owner rank, then metadata order), cuts them into chunks of at most ``chunk_bytes`` (default
    ``_GATHER_CHUNK_BYTES``; a single bigger tensor goes alone) and broadcasts each chunk from its owner as one
    uint8 buffer (byte views: bit-exact, and any dtype, including float8 and bool, crosses gloo and NCCL
    alike), on the group's device: this rank's current CUDA device under NCCL, else the CPU.
    Receivers slice the buffer back into CPU tensors, each with its own storage (contiguous, detached):
    values match the pickled gather, but strides and storage sharing between entries are not kept, the
    containers are plain dicts, and a tensor hidden inside a non-tensor value still travels pickled."""
    return _gather_tensor_dicts(local, group, chunk_bytes=chunk_bytes)[1]


def _leaf_spec(v) -> tuple:
    return ("tensor", tuple(v.shape), v.dtype) if torch.is_tensor(v) else ("value", v)


def _gather_tensor_dicts(local: dict, group, header=None,
                         chunk_bytes: int | None = None) -> tuple[list, list[dict]]:
    """``gather_tensor_dicts`` plus a small picklable ``header`` per rank sent along with the metadata;
    returns (headers, dicts), both in group-rank order."""
    if group is None:
        group = dist.group.WORLD
    cap = _GATHER_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    # NCCL moves CUDA tensors only (init_distributed set this rank's device current); gloo, CPU tensors
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
        else torch.device("cpu")
    meta = [(name, ("dict", [(k, _leaf_spec(x)) for k, x in v.items()]) if isinstance(v, dict) else _leaf_spec(v))
            for name, v in local.items()]
    metas: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(metas, (header, meta), group=group)
    me = dist.get_rank(group)

    headers: list = []
    out: list[dict] = []
    for r, (rheader, rmeta) in enumerate(metas):
        result: dict = {}
        todo = []   # (container, key, shape, dtype, nbytes, path in ``local``) of each tensor, in order
        for name, spec in rmeta:
            if spec[0] == "dict":
                inner = result[name] = {}
                for k, sub in spec[1]:
                    inner[k] = sub[1] if sub[0] == "value" else None
                    if sub[0] == "tensor":
                        todo.append((inner, k, sub[1], sub[2], math.prod(sub[1]) * sub[2].itemsize, (name, k)))
            else:
                result[name] = spec[1] if spec[0] == "value" else None
                if spec[0] == "tensor":
                    todo.append((result, name, spec[1], spec[2], math.prod(spec[1]) * spec[2].itemsize, (name,)))
        headers.append(rheader)
        out.append(result)
        chunks, cur, cur_bytes = [], [], 0
        for item in todo:
            if cur and cur_bytes + item[4] > cap:
                chunks.append(cur)
                cur, cur_bytes = [], 0
            cur.append(item)
            cur_bytes += item[4]
        if cur:
            chunks.append(cur)
        src = dist.get_global_rank(group, r)
        for chunk in chunks:
            nbytes = sum(item[4] for item in chunk)
            if nbytes == 0:
                buf = torch.empty(0, dtype=torch.uint8)
            else:
                if r == me:
                    views = []
                    for *_, path in chunk:
                        t = local[path[0]] if len(path) == 1 else local[path[0]][path[1]]
                        views.append(t.detach().to(dev).reshape(-1).view(torch.uint8))
                    buf = views[0] if len(views) == 1 else torch.cat(views)
                else:
                    buf = torch.empty(nbytes, dtype=torch.uint8, device=dev)
                dist.broadcast(buf, src=src, group=group)
                buf = buf.cpu()
            offset = 0
            for container, key, shape, dtype, n, _ in chunk:
                container[key] = buf[offset:offset + n].clone().view(dtype).reshape(shape)
                offset += n
    return headers, out


def _expert_slices(model: nn.Module) -> dict[str, slice]:
    """EP-sharded expert parameter name -> the rows of the full [E, ...] tensor this rank holds."""
    from dsv3.parallel.expert_parallel import EXPERT_PARAMS, ExpertParallelExperts
    out = {}
    for mod_name, m in model.named_modules():
        if isinstance(m, ExpertParallelExperts):
            for p in EXPERT_PARAMS:
                out[f"{mod_name}.{p}"] = slice(m.first, m.first + m.num_local)
    return out


def _load_named(optim: torch.optim.Optimizer, names: dict[int, str], slices: dict[str, slice], state: dict) -> None:
    if state.get("format") != NAMED_FORMAT:
        from dsv3.errors import UserError
        raise UserError("optimizer state is not in the layout-independent format (saved by a different "
                        "version?); resume with a checkpoint written by this version")
    on_device = any(g.get("fused") or g.get("capturable") for g in optim.param_groups)
    for group in optim.param_groups:
        for p in group["params"]:
            saved = state["state"].get(names[id(p)])
            if saved is None:
                continue
            st = {}
            for k, v in saved.items():
                if torch.is_tensor(v):
                    if v.ndim > 0:
                        v = v[slices[names[id(p)]]] if names[id(p)] in slices else v
                        v = v.to(p.device).clone()
                    else:
                        v = v.to(p.device if on_device else "cpu").clone()
                st[k] = v
            optim.state[p] = st


def named_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """A single-process optimizer's state in the layout-independent format of ``ShardedOptimizer``."""
    names = {id(p): n for n, p in model.named_parameters()}
    state = {names[id(p)]: {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in st.items()}
             for p, st in optimizer.state.items()}
    return {"format": NAMED_FORMAT, "state": state}


def load_named_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, state: dict) -> None:
    """Load the layout-independent format into a single-process (or EP-sharded, unsharded-ZeRO) optimizer."""
    _load_named(optimizer, {id(p): n for n, p in model.named_parameters()}, _expert_slices(model), state)


def build_zero_optimizer(model: nn.Module, mesh: Mesh, t, expert_params: Iterable[nn.Parameter] = (),
                         overlap_param_sync: bool = False):
    """The trainer's optimizer (same parameter groups and AdamW variant as ``dsv3.train.optim``), sharded
    ZeRO-1 style when the mesh is distributed; the plain optimizer for one process. ``overlap_param_sync``:
    see ``ShardedOptimizer`` (only for a whole model, whose own forward runs its ``layers``)."""
    from dsv3.train.optim import AdamWLowPrecisionMoments, build_optimizer, param_groups

    if not mesh.distributed:
        return build_optimizer(model, t)
    common = dict(lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
    if t.bf16_moments:
        cls, extra = AdamWLowPrecisionMoments, {}
    else:
        fused = next(model.parameters()).is_cuda
        cls, extra = torch.optim.AdamW, dict(fused=fused or None, foreach=False if not fused else None)
    return ShardedOptimizer(model, param_groups(model, t), mesh, expert_params, cls,
                            overlap_param_sync=overlap_param_sync, **common, **extra)


# ------------------------------------------------------------------------------ global quantities

@torch.no_grad()
def clip_grad_norm_(params: Iterable[nn.Parameter], max_norm: float, mesh: Mesh,
                    expert_params: Iterable[nn.Parameter] = (), owned_only: bool = False) -> torch.Tensor:
    """Clip to the GLOBAL gradient norm and return it (fp32 scalar, the same on every rank).

    Call after ``GradReducer.finish()``: every dp rank then holds the same averaged dense gradients (counted
    once, no communication), and the expert shards of one EP group together hold every expert once (their
    squares are summed over ep_group). Pipeline stages hold disjoint layers: summed over pp_group.
    ``owned_only`` (the reducer reduced to owners): each rank holds only its own parameters' gradients, and
    those are disjoint over dp_group (dense ones and every EP shard's), so all the squares sum over dp_group.
    """
    params = [p for p in params if p.grad is not None]
    expert_ids = {id(p) for p in expert_params}
    dev = params[0].grad.device if params else mesh.device
    # One multi-tensor norm per kind (torch.nn.utils.clip_grad_norm_'s kernels): each gradient is read once,
    # where a per-parameter pow(2).sum() wrote a squared copy of every gradient and launched ~4 kernels each.
    sq = {}
    for kind, keep in (("dense", False), ("expert", True)):
        grads = [p.grad.detach() for p in params if (id(p) in expert_ids) == keep]
        sq[kind] = (torch.stack([n.float() for n in torch._foreach_norm(grads)]).pow(2).sum() if grads
                    else torch.zeros((), dtype=torch.float32, device=dev))
    dense_sq, expert_sq = sq["dense"], sq["expert"]
    if owned_only:
        total_sq = dense_sq + expert_sq
        if group_size(mesh.dp_group) > 1:
            dist.all_reduce(total_sq, group=mesh.dp_group)
    else:
        if group_size(mesh.ep_group) > 1:
            dist.all_reduce(expert_sq, group=mesh.ep_group)
        total_sq = dense_sq + expert_sq
    if group_size(mesh.pp_group) > 1:
        dist.all_reduce(total_sq, group=mesh.pp_group)
    norm = total_sq.sqrt()
    if math.isfinite(max_norm) and params:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        grads = [p.grad.detach() for p in params]
        for dtype in {g.dtype for g in grads}:
            torch._foreach_mul_([g for g in grads if g.dtype == dtype], coef.to(dtype))
    return norm


def count_all_reduce(mesh: Mesh) -> Callable[[torch.Tensor], None] | None:
    """The ``all_reduce`` hook for ``dsv3.train.balance.update_balance_biases``: sums the expert counts over
    dp_group in place, so every rank sees the global counts and moves its biases identically. None for a
    single data-parallel rank. (Counts are per layer, so the pipeline dimension is not involved.)"""
    if group_size(mesh.dp_group) <= 1:
        return None
    group = mesh.dp_group

    def all_reduce(t: torch.Tensor) -> None:
        dist.all_reduce(t, group=group)
    return all_reduce


@torch.no_grad()
def global_mean(value: torch.Tensor | float, mesh: Mesh) -> float:
    """Mean of a per-rank scalar over dp_group (the logged loss: each rank's loss is the mean over an equal
    share of the global batch, so the mean of the rank means is the global mean)."""
    t = torch.as_tensor(value, dtype=torch.float64).detach().reshape(1).clone().cpu()
    if group_size(mesh.dp_group) > 1:
        if mesh.backend == "nccl":
            t = t.to(mesh.device)
        dist.all_reduce(t, group=mesh.dp_group)
    return float(t.item()) / mesh.dp


@torch.no_grad()
def global_sum(value: torch.Tensor | float | int, mesh: Mesh) -> float:
    """Sum of a per-rank scalar over dp_group (e.g. target-token counts)."""
    t = torch.as_tensor(value, dtype=torch.float64).detach().reshape(1).clone().cpu()
    if group_size(mesh.dp_group) > 1:
        if mesh.backend == "nccl":
            t = t.to(mesh.device)
        dist.all_reduce(t, group=mesh.dp_group)
    return float(t.item())
