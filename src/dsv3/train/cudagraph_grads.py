"""Weight gradients that must outlive a CUDA-graph replay (``train.compile_mode`` 'reduce-overhead' / 'max-autotune').

Under cudagraph trees the outputs of a compiled backward live in the graphs' memory pool, and the next replay
writes over them. Autograd's AccumulateGrad stores the first gradient a parameter gets after ``zero_grad`` as
``p.grad`` without copying it, so with gradient accumulation the second micro-batch's replay overwrote the first
micro-batch's weight gradients before its own backward added into them ("accessing tensor output of CUDAGraphs
that has been overwritten by a subsequent run"; its stack trace names the forward op whose weight it is, e.g. the
input RMSNorm's ``weight * x``). ``benchmarks/cudagraph_probe.py`` (H100, 2026-12-07) isolated it: every variant
with two micro-batches and a step marker before each failed, fp32 and bf16 alike; one micro-batch per step trained.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


class OwnedGradients:
    """Make every parameter's gradient a tensor of its own the first time it arrives after a reset.

    A post-accumulate-grad hook clones ``p.grad`` once per step (one copy of the gradients per optimizer step), so
    later micro-batches accumulate into memory outside the CUDA-graph pool. Call ``reset()`` whenever the
    gradients are set to None. Not needed where the data-parallel reducer already copies each gradient into its
    bucket buffer (``grad_as_bucket_view``). Parameters that get no gradient keep ``grad = None``.
    """

    def __init__(self, params: Iterable[nn.Parameter]):
        self._owned: set[int] = set()
        self._handles = [p.register_post_accumulate_grad_hook(self._own) for p in params if p.requires_grad]

    def _own(self, p: torch.Tensor) -> None:
        if id(p) not in self._owned:
            p.grad = p.grad.clone()
            self._owned.add(id(p))

    def reset(self) -> None:
        """The gradients were set to None (``zero_grad``): the next ones are autograd's again."""
        self._owned.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
