"""BF16 copies of the GEMM weights that autocast casts anyway, made once per optimizer step (``train.weight_cast``).

Why: with ``train.precision = "bf16"`` the trainer keeps FP32 parameters and runs under bf16 autocast, which
casts every GEMM weight to bf16 again at each use, i.e. in every micro-batch's forward (~28 ms of a 428 ms
`small` step with 4 micro-batches on an H100), and whose backward casts every bf16 weight gradient back to FP32
before autograd adds it into ``.grad`` (~26 ms). ``weight_cast = "per_step"`` makes these same casts once per
optimizer step instead, into persistent bf16 copies, and lets the model use the copies during the step's
forward and backward passes (and during evaluation): autocast then finds bf16 weights and casts nothing, and
each weight's bf16 gradient goes into its master's FP32 ``.grad`` as autocast's cast backward would send it.

What is copied: only the parameters the forward casts to autocast's dtype at use anyway (``cast_kind``: plain
``nn.Linear`` weights and biases, the routed experts' stacked weights, the output head). The embedding, every
RMSNorm gain and the MoE router weight are not: the embedding lookup and the norms' products are no autocast
ops (the residual stream stays FP32) and the router runs in FP32 with autocast off on purpose. So per_step is
bf16 autocast with the weight casts hoisted out of the micro-batches: it runs under autocast on every device
(the trainer turns bf16 autocast on for it on the CPU too, where ``per_use`` runs FP32), and it computes what
``per_use`` computes, the same values and the same FP32 gradient sums in the same order (bit for bit on the
CPU, eager and compiled: tests/test_train_weight_cast.py; bit for bit in eager on an H100, and with compiled
blocks within what two compilations of one model differ by: tests/test_weight_cast_gpu.py).

Outside ``ComputeWeights.swapped_in()`` the modules hold their FP32 parameters as always, so the optimizer,
gradient clipping, checkpoints and ZeRO-1 (whose gradient-bucket hooks sit on the FP32 parameters and still
fire, once per accumulation) see FP32 parameters with FP32 gradients. Buffers (the MoE balance biases, RoPE's
frequencies) are not touched.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

from dsv3.errors import UserError

SWAP = "swap"           # the module holds the bf16 copy during the passes (a leaf; its hook feeds the master)
PER_CALL = "per_call"   # the module keeps the master; each cast of it (``cast_for_use``) returns the copy


def resolve_weight_cast(weight_cast: str, precision: str, device: torch.device) -> str:
    """``train.weight_cast`` as run: 'auto' is 'per_step' for bf16 precision on CUDA, else 'per_use' (fp32 has
    nothing to cast; FP8 quantizes the FP32 masters once per step itself, ``dsv3.fp8.weight_cache``)."""
    if weight_cast == "auto":
        return "per_step" if precision == "bf16" and device.type == "cuda" else "per_use"
    if weight_cast == "per_step" and precision != "bf16":   # RunConfig.validate says so first; kept for direct callers
        raise UserError(f"train.weight_cast = 'per_step' needs train.precision = 'bf16' (not {precision!r}); "
                        "set train.weight_cast = 'auto' or 'per_use'")
    return weight_cast


def cast_kind(module: nn.Module, name: str) -> str | None:
    """Whether per_step copies the parameters of ``module`` (registered in its parent as ``name``), and how.

    In: parameters the forward casts to autocast's dtype at every use anyway.
    * a plain ``nn.Linear`` (weight and bias): called under autocast, and ``linear`` is on autocast's
      lower-precision list on CUDA and on the CPU -> SWAP (autocast finds bf16 and casts nothing);
    * the routed experts' stacked weights (``moe.Experts``, EP's ``ExpertParallelExperts``) on the bf16 path:
      the grouped GEMMs are not on autocast's lists, so ``experts_forward_sorted`` and the EP paths cast them
      with ``w.to(compute_dtype(x))`` themselves, a no-op on the copy -> SWAP. Except EP with
      ``parallel.ep_chunks`` > 1: ``_ChunkedRouted`` casts inside its own forward and returns the weights'
      gradients, summed over the chunks in FP32, in the weights' dtype; a bf16 copy would round them to bf16
      -> PER_CALL (its cast takes the copy via ``cast_for_use``, the FP32 gradient goes to the master);
    * the output head ``lm_head`` (a plain ``nn.Linear``): its loss, ``linear_cross_entropy``, casts it with
      ``w.to(dtype)`` once per call, for the main loss and again for every MTP depth, and autograd sums these
      calls' gradients after their casts back, in FP32. One swapped bf16 leaf would sum them in bf16 first
      (different roundings), so -> PER_CALL: the module keeps the master and each call's cast
      (``cast_for_use``) returns the copy, with a gradient that reaches the master in FP32 as ``.to``'s does.
      Where the head is called as a module (``return_logits=True``, not in training) autocast casts the master.
    Out (None): ``nn.Embedding`` (a lookup, no autocast op: the residual stream stays FP32), ``RMSNorm``
    (an elementwise product, no autocast op: the gains stay FP32 and promote bf16 inputs to FP32),
    ``moe.Router`` (FP32 logits with autocast off, on purpose), the FP8 modules (``FP8Linear``, expert stacks
    with an ``fp8_recipe``: they quantize the FP32 masters themselves; per_step with fp8 is a config error
    anyway) and anything else. A parameter held by several modules is copied only if all agree
    (``ComputeWeights``): a head tied to the embedding would stay FP32.
    """
    from dsv3.model.moe import Experts
    from dsv3.parallel.expert_parallel import ExpertParallelExperts
    if type(module) is nn.Linear:
        return PER_CALL if name == "lm_head" else SWAP
    if type(module) is Experts and module.fp8_recipe is None:
        return SWAP
    if type(module) is ExpertParallelExperts and module.fp8_recipe is None:
        return PER_CALL if module.dispatch == "alltoall" and module.chunks > 1 else SWAP
    return None


def run_post_accumulate_grad_hooks(p: torch.Tensor) -> None:
    """Call the hooks ``p.register_post_accumulate_grad_hook`` registered, in registration order, as autograd's
    AccumulateGrad does after it has added a gradient into ``p.grad``. For code that accumulates into a leaf's
    ``.grad`` by hand (the compute copies' hook below; the pipeline's deferred weight gradients).

    Reads torch's private ``Tensor._post_accumulate_grad_hooks`` (an ordered dict of handle id -> hook, or None;
    torch 2.1-2.13): torch has no public way to fire them. If it ever goes away, this is the one place to fix."""
    hooks = getattr(p, "_post_accumulate_grad_hooks", None)
    if hooks:
        for hook in list(hooks.values()):
            hook(p)


def master_of(p: torch.Tensor) -> torch.Tensor:
    """The FP32 master of a compute copy (code that reads ``.grad`` inside ``swapped_in``, where the modules
    hold the copies: the pipeline's tied-gradient sum); any other tensor is returned as it is."""
    return getattr(p, "_dsv3_master", p)


class _CastDone(torch.autograd.Function):
    """``master.to(copy.dtype)`` whose result was made earlier (``copy``): forward returns the copy's values,
    backward sends the gradient to the master cast to its dtype, as the cast's own backward would."""

    @staticmethod
    def forward(ctx, master, copy):
        ctx.dtype = master.dtype
        return copy

    @staticmethod
    def backward(ctx, g):
        return g.to(ctx.dtype), None


def cast_for_use(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w.to(dtype)`` for code that casts a weight itself at each use (``linear_cross_entropy``, EP's
    ``_ChunkedRouted``): inside ``ComputeWeights.swapped_in`` a PER_CALL master's copy of that dtype (the same
    values) instead of a new cast; its gradient reaches ``w`` in ``w``'s dtype, call by call, as ``.to``'s
    would."""
    copy = getattr(w, "_dsv3_cast", None)
    if copy is None or copy.dtype != dtype:
        return w.to(dtype)
    return _CastDone.apply(w, copy)


def _swappable(p: nn.Parameter | None, dtype: torch.dtype) -> bool:
    return p is not None and p.requires_grad and p.is_floating_point() and p.dtype != dtype


class ComputeWeights:
    """Persistent ``dtype`` copies of the parameters of ``module`` that the forward casts at use (``cast_kind``).

    ``swapped_in()``: a context in which every module holding a SWAP master holds its copy instead (a
    parameter shared by several modules, or registered twice, maps to one copy), and in which the PER_CALL
    masters' casts return their copies (``cast_for_use``). The copies are allocated here once; ``refresh()``
    copies (casts) the masters into them with one foreach copy, and only the copies marked stale since
    (``mark_stale()``: after every optimizer step that changed the masters). A SWAP copy is a leaf
    ``nn.Parameter`` whose post-accumulate-grad hook moves its gradient into its master's ``.grad``
    (``g.to(master.dtype)`` when that is None, else ``add_``: autocast's cast backward, then AccumulateGrad),
    clears the copy's ``.grad``, and then runs the master's own post-accumulate-grad hooks, so hooks registered
    on the masters (``dsv3.parallel.data_parallel.GradReducer``) fire as if autograd had accumulated into the
    master itself. A PER_CALL master's gradient reaches it through autograd as without copies.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype = torch.bfloat16):
        self.dtype = dtype
        self.masters: list[nn.Parameter] = []
        self.copies: list[nn.Parameter] = []
        self.kinds: list[str] = []
        self._slots: list[tuple[nn.Module, str, int]] = []     # SWAP: (module, attribute name, index of the master)
        self._index: dict[int, int] = {}                          # id(master) -> index
        held: dict[int, list] = {}                                # id(param) -> [(module, attribute, kind)]
        params: dict[int, nn.Parameter] = {}
        for qualname, mod in module.named_modules(remove_duplicate=False):
            kind = cast_kind(mod, qualname.rpartition(".")[2])
            for name, p in mod._parameters.items():
                if _swappable(p, dtype):
                    held.setdefault(id(p), []).append((mod, name, kind))
                    params[id(p)] = p
        for key, slots in held.items():
            kinds = {kind for _, _, kind in slots}
            if len(kinds) != 1 or None in kinds:
                continue                                          # left alone (or held by a module that is)
            p, (kind,) = params[key], kinds
            k = self._index[key] = len(self.masters)
            copy = nn.Parameter(torch.empty_like(p, dtype=dtype), requires_grad=kind == SWAP)
            copy._dsv3_master = p    # master_of
            if kind == SWAP:
                copy.register_post_accumulate_grad_hook(_grad_to_master(p))
                self._slots.extend({(id(mod), name): (mod, name, k) for mod, name, _ in slots}.values())
            self.masters.append(p)
            self.copies.append(copy)
            self.kinds.append(kind)
        self._stale = set(range(len(self.masters)))   # never filled yet
        self.active = False
        self.refreshed = 0                             # tensors copied so far (tests: no needless refresh)

    def hook_fed_masters(self) -> list[nn.Parameter]:
        """The masters whose ``.grad`` the copies' hooks write (SWAP kind), never autograd itself."""
        return [p for p, kind in zip(self.masters, self.kinds) if kind == SWAP]

    def mark_stale(self) -> None:
        """The masters changed (an optimizer step, a load): the next ``refresh`` copies every one."""
        self._stale = set(range(len(self.masters)))

    @property
    def stale(self) -> bool:
        return bool(self._stale)

    @torch.no_grad()
    def refresh(self, masters: Iterable[torch.Tensor] | None = None) -> int:
        """Copy the stale masters (all of them, or only those among ``masters``) into their copies; returns how
        many. The masters must be current: ZeRO-1's overlapped parameter sync calls this per group of
        parameters as they land (``ShardedOptimizer.on_params_landed``)."""
        if not self._stale:
            return 0
        if masters is None:
            todo = sorted(self._stale)
        else:
            todo = sorted({self._index[id(p)] for p in masters if id(p) in self._index} & self._stale)
        if todo:
            torch._foreach_copy_([self.copies[k] for k in todo], [self.masters[k] for k in todo])
            self._stale.difference_update(todo)
            self.refreshed += len(todo)
        return len(todo)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Modules hold the SWAP copies inside (forward and backward passes) and PER_CALL casts return their
        copies; the masters again after, also when the body raises. It does not refresh: call ``refresh()``
        first where the masters are current (under ZeRO-1's overlapped sync they are not yet, and the forward's
        parameter waits refresh the copies group by group). Re-entering is a no-op."""
        if self.active:
            yield
            return
        for mod, name, k in self._slots:
            mod._parameters[name] = self.copies[k]
        for p, c, kind in zip(self.masters, self.copies, self.kinds):
            if kind == PER_CALL:
                p._dsv3_cast = c
        self.active = True
        try:
            yield
        finally:
            for mod, name, k in self._slots:
                mod._parameters[name] = self.masters[k]
            for p, kind in zip(self.masters, self.kinds):
                if kind == PER_CALL:
                    del p._dsv3_cast
            self.active = False


def _grad_to_master(master: nn.Parameter):
    """A SWAP copy's post-accumulate-grad hook: its gradient goes into the FP32 master's ``.grad``."""
    def hook(copy: nn.Parameter) -> None:
        g = copy.grad
        copy.grad = None
        if g is None:
            return
        with torch.no_grad():
            if master.grad is None:
                master.grad = g.to(master.dtype)
            else:
                master.grad.add_(g)
        run_post_accumulate_grad_hooks(master)
    return hook
