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
    it: a one-GPU run stopped in its first backward with "accessing tensor output of CUDAGraphs that has been
    overwritten by a subsequent run" (2026-11-26; the pattern of pytorch/pytorch#152887, ``z = f(f(x))``). EP=2,
    whose blocks are cut at the eager exchange so no call takes its own function's output, trained. The clone
    (one copy of the residual stream per block, ~25 us at ``small``'s size) gives every call a fresh input.
    It is not enough: on an H100 (2026-11-26, session 9) ``tests/test_compile.py``'s CUDA test still fails the
    same way, now inside the MoE's resume function after the routed experts' graph break (the shared experts),
    i.e. one layer's replay overwrites activations the previous layer saved for backward. Per-layer graphs
    (not one function shared by every layer) are the next thing to try; turning off
    ``torch._dynamo.config.inline_inbuilt_nn_modules`` is not the way: it is deprecated and a no-op on torch 2.13."""
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
