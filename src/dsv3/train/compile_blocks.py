"""torch.compile of the decoder blocks as the trainer runs them (``train.compile``, ``train.compile_mode``)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from dsv3.train.config import CUDAGRAPH_MODES


def compile_blocks(layers: Iterable[nn.Module], mode: str = "default") -> None:
    """Compile each block in place (its parameters keep their names). ``mode``: 'default' or a torch.compile mode.

    CUDA-graph modes wrap the compiled forward so the block's hidden state leaves it as a clone. The blocks run
    one compiled function (the same code for every layer), and under cudagraph trees a call whose input is the
    previous call's output can overwrite that output's memory while autograd still holds the tensors saved with
    it (the pattern of pytorch/pytorch#152887, ``z = f(f(x))``); the clone (one copy of the residual stream per
    block, ~25 us at ``small``'s size) gives every call a fresh input. The one-GPU failures blamed on that pattern
    from 2026-11-26 had another cause, found on 2026-12-07 by ``benchmarks/cudagraph_probe.py``: the first
    micro-batch's weight gradients, kept by autograd as ``p.grad`` without a copy, were overwritten by the next
    micro-batch's replay; the trainer now gives them memory of their own (``dsv3.train.cudagraph_grads``)."""
    if mode not in CUDAGRAPH_MODES:
        for layer in layers:
            layer.compile(mode=None if mode == "default" else mode)
        return
    for layer in layers:
        layer.forward = _cloning_forward(torch.compile(layer.forward, mode=mode))


def _cloning_forward(compiled):
    def forward(*args, **kwargs):
        out = compiled(*args, **kwargs)
        if isinstance(out, tuple):
            return (out[0].clone(), *out[1:])
        return out.clone()
    return forward
