"""BF16 compute copies of the FP32 master weights, held by the model during a step's passes (``train.weight_cast``).

Why: with ``train.precision = "bf16"`` the trainer keeps FP32 parameters and runs under bf16 autocast, which
casts every weight to bf16 again at each use, i.e. in every micro-batch's forward (~28 ms of a 428 ms `small`
step with 4 micro-batches on an H100), and whose backward casts every bf16 weight gradient back to FP32
before autograd adds it into ``.grad`` (~26 ms). ``weight_cast = "per_step"`` casts each weight once per
optimizer step instead, into a persistent bf16 leaf, and lets the model's modules hold these copies for the
step's forward and backward passes (and for evaluation): autocast then finds bf16 weights and casts nothing,
and one hook per copy adds its bf16 gradient straight into the master's FP32 ``.grad``.

What does not change: outside ``ComputeWeights.swapped_in()`` the modules hold their FP32 parameters as
always, so the optimizer, gradient clipping, checkpoints and ZeRO-1 (whose gradient-bucket hooks sit on the
FP32 parameters and still fire, from the copy's hook, once per accumulation) see FP32 parameters with FP32
gradients, accumulated over the micro-batches in FP32. Buffers (the MoE balance biases, RoPE's frequencies)
are not touched; parameters that need no gradient, or are not floating point, are not copied.

What does change numerically: the model computes with bf16 parameters everywhere, as a model converted with
``.to(torch.bfloat16)`` would; besides the GEMM weights that autocast would cast anyway, that is the
embedding (so the residual stream is bf16 where under autocast it stays FP32), the norm gains and the router
weights (whose logits are then one bf16 GEMM with FP32 output, ``dsv3.model.moe._Bf16RouterLogits``).
On the CPU, where the trainer runs no autocast, the model simply runs in bf16 (what lets tests cover this).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

from dsv3.errors import UserError


def resolve_weight_cast(weight_cast: str, precision: str, device: torch.device) -> str:
    """``train.weight_cast`` as run: 'auto' is 'per_step' for bf16 precision on CUDA, else 'per_use' (fp32 has
    nothing to cast; FP8 quantizes the FP32 masters once per step itself, ``dsv3.fp8.weight_cache``)."""
    if weight_cast == "auto":
        return "per_step" if precision == "bf16" and device.type == "cuda" else "per_use"
    if weight_cast == "per_step" and precision != "bf16":   # RunConfig.validate says so first; kept for direct callers
        raise UserError(f"train.weight_cast = 'per_step' needs train.precision = 'bf16' (not {precision!r}); "
                        "set train.weight_cast = 'auto' or 'per_use'")
    return weight_cast


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


def _swappable(p: nn.Parameter | None, dtype: torch.dtype) -> bool:
    return p is not None and p.requires_grad and p.is_floating_point() and p.dtype != dtype


class ComputeWeights:
    """Persistent ``dtype`` copies of ``module``'s trainable floating-point parameters (the masters).

    ``swapped_in()``: a context in which every module holding a master holds its copy instead (a parameter
    shared by several modules, or registered twice, maps to one copy). The copies are leaf ``nn.Parameter``s
    allocated here once; ``refresh()`` copies (casts) the masters into them with one foreach copy, and only
    the copies marked stale since (``mark_stale()``: after every optimizer step that changed the masters).
    Each copy's post-accumulate-grad hook moves its gradient into its master's ``.grad`` (``g.float()`` when
    that is None, else ``add_``), clears the copy's ``.grad``, and then runs the master's own
    post-accumulate-grad hooks, so hooks registered on the masters (``dsv3.parallel.data_parallel.GradReducer``)
    fire as if autograd had accumulated into the master itself.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype = torch.bfloat16):
        self.dtype = dtype
        self.masters: list[nn.Parameter] = []
        self.copies: list[nn.Parameter] = []
        self._slots: list[tuple[nn.Module, str, int]] = []     # (module, attribute name, index of the master)
        self._index: dict[int, int] = {}                          # id(master) -> index
        for mod in module.modules():
            for name, p in mod._parameters.items():
                if not _swappable(p, dtype):
                    continue
                k = self._index.get(id(p))
                if k is None:
                    k = self._index[id(p)] = len(self.masters)
                    copy = nn.Parameter(torch.empty_like(p, dtype=dtype), requires_grad=True)
                    copy.register_post_accumulate_grad_hook(_grad_to_master(p))
                    copy._dsv3_master = p    # master_of
                    self.masters.append(p)
                    self.copies.append(copy)
                self._slots.append((mod, name, k))
        self._stale = set(range(len(self.masters)))   # never filled yet
        self.active = False
        self.refreshed = 0                             # tensors copied so far (tests: no needless refresh)

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
        """Modules hold the copies inside (forward and backward passes), their masters again after, also when
        the body raises. It does not refresh: call ``refresh()`` first where the masters are current (under
        ZeRO-1's overlapped sync they are not yet, and the forward's parameter waits refresh the copies group by
        group). Re-entering is a no-op."""
        if self.active:
            yield
            return
        for mod, name, k in self._slots:
            mod._parameters[name] = self.copies[k]
        self.active = True
        try:
            yield
        finally:
            for mod, name, k in self._slots:
                mod._parameters[name] = self.masters[k]
            self.active = False


def _grad_to_master(master: nn.Parameter):
    """The compute copy's post-accumulate-grad hook: its gradient goes into the FP32 master's ``.grad``."""
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
