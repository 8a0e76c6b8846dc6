"""Gradient accumulation with one micro-batch's forward beside the previous one's backward (``parallel.fb_overlap``).

DualPipe's forward-and-backward pairing, without a pipeline. The host issues the same sequence as the plain
loop, F0 B0 F1 B1 ..., but each forward runs on one of two CUDA streams, alternating, and waits only for the
forward before it, not for the backward just issued. A backward issued from the host is mostly still queued
on the GPU when the next forward is issued (autograd returns once it has launched the kernels), so the GPU
runs F(i+1) beside B(i):

    stream A:  F0 ......... B0 (autograd runs a backward op on its forward op's stream) ... F2 ...... B2
    stream B:               F1 (from the end of F0, beside B0) ......................... B1 ... F3

What it hides, under expert parallelism: F(i+1)'s dispatch/combine all-to-alls and its host reads of the
splits (which stall only F's stream, while B(i)'s kernels are already queued) run under B(i)'s compute, and
B(i)'s all-to-alls under F(i+1)'s. The backward's transfers need a communicator of their own
(``mesh.ep_bwd_group``): NCCL runs one communicator's collectives in issue order, so F(i+1)'s dispatch would
otherwise wait behind all of B(i)'s transfers.

The arithmetic is the plain loop's: same operations, same order within each micro-batch, gradients summed in
the same micro-batch order (B(i+1) starts after B(i): its loss is issued on the main stream, which
``backward()`` left waiting for B(i)). What may run side by side are a forward and a backward, which share
only the weights (read-only until the optimizer step). Costs: a second micro-batch's activations are alive
while the first is freed, and the two streams' kernels contend for SMs and memory bandwidth.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch


def accumulate(micro_batches: Sequence[Any], forward: Callable[[int, Any], Any],
               backward: Callable[[int, Any, Any], None], streams: Sequence[torch.cuda.Stream] | None = None) -> None:
    """Run ``forward(i, mb) -> out`` and ``backward(i, mb, out)`` for every micro-batch, in order.

    ``streams`` None: the plain loop on the current stream. Two CUDA streams: each forward on
    ``streams[i % 2]``, issued after the previous backward and ordered after the previous forward only
    (module docstring); each backward from the current stream once its forward has finished. The current
    stream waits for both streams at the end."""
    if streams is None:
        for i, mb in enumerate(micro_batches):
            backward(i, mb, forward(i, mb))
        return
    if len(streams) != 2:
        raise ValueError("accumulate needs two streams")
    main = torch.cuda.current_stream()
    ready = main.record_event()          # the micro-batches' copies to the device, and everything before

    def issue_forward(i: int, after: torch.cuda.Event):
        s = streams[i % 2]
        s.wait_event(after)
        with torch.cuda.stream(s):
            out = forward(i, micro_batches[i])
        # the output (loss, its parts) is read on the main stream: its memory must not go back to s's pool
        # while main's reads are still queued
        for t in _tensors(out):
            if t.is_cuda:
                t.record_stream(main)
        return out, s.record_event()

    out, done = issue_forward(0, ready)
    for i, mb in enumerate(micro_batches):
        main.wait_event(done)            # the loss (and all of F(i)) before anything reads it on main
        backward(i, mb, out)
        if i + 1 < len(micro_batches):
            out, done = issue_forward(i + 1, done)
    for s in streams:
        main.wait_stream(s)


def _tensors(obj) -> Iterator[torch.Tensor]:
    """Every tensor in a (nested) dataclass / dict / list / tuple."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name))
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
