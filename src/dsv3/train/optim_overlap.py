"""The optimizer's update beside the next forward (``train.optimizer_overlap``, one process on CUDA).

AdamW is memory-bound: on one H100 the 3.2B benchmark model's update reads and writes ~45 GB, 15 ms of a 187 ms
step at 87% of HBM bandwidth, with the GPU's compute idle. The update of a parameter only has to land before
the next forward reads it, so ``OverlappedOptimizerStep.step`` issues it on a side CUDA stream, in the order
the next forward needs the parameters (``dsv3.parallel.data_parallel._forward_groups``: embedding, head and
the other non-layer parameters, then decoder layer by layer), and records one event per group. A forward
pre-hook on the model and on each decoder layer makes the compute stream wait for its group's event (a stream
wait: the host never blocks), so layer i's forward runs while later layers' parameters are still being updated.
ZeRO-1's ``overlap_param_sync`` does the same for the parameter broadcasts.

Same arithmetic as ``optimizer.step()``: the same per-tensor update, in another order (independent tensors).
Ordering: the side stream first waits for everything queued on the compute stream (gradients, clipping);
each gradient is ``record_stream``-ed on the side stream, so ``zero_grad(set_to_none=True)`` right after
``step`` cannot hand its memory to the next forward while the update still reads it. Anything that reads the
parameters or the optimizer state outside a forward (checkpoint, evaluation, export) calls ``wait_all`` first.
On the CPU (no streams) ``step`` is the optimizer's own.
"""
from __future__ import annotations

import torch
from torch import nn

from dsv3.parallel.data_parallel import _forward_groups, _install_param_waits


class OverlappedOptimizerStep:
    """Wraps an optimizer with ``step_params(params)`` (``AdamWLowPrecisionMoments``) for ``model``."""

    def __init__(self, optimizer, model: nn.Module, device: torch.device):
        if not hasattr(optimizer, "step_params"):
            raise TypeError(f"{type(optimizer).__name__} has no step_params(params): it cannot be overlapped")
        self.optimizer, self.device = optimizer, device
        self.cuda = device.type == "cuda"
        self.groups = _forward_groups(model)
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.events: list[torch.cuda.Event | None] = [None] * len(self.groups)
        if self.cuda:
            _install_param_waits(model, self.wait_group)

    def step(self) -> None:
        """Issue the update (on CUDA: on the side stream, group by group; returns at once)."""
        if not self.cuda:
            self.optimizer.step()
            return
        self.wait_all()                        # a previous step's update not yet waited for comes first
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)          # gradients (and their clipping) before the update reads them
        with torch.cuda.stream(self.stream):
            for i, params in enumerate(self.groups):
                for p in params:
                    if p.grad is not None:
                        p.grad.record_stream(self.stream)
                self.optimizer.step_params(params)
                self.events[i] = self.stream.record_event()

    def wait_group(self, i: int) -> None:
        """The current stream waits for group i's update (the forward pre-hooks call this)."""
        ev = self.events[i]
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)
            self.events[i] = None

    def wait_all(self) -> None:
        """The current stream waits for every pending update: before reading parameters or optimizer state
        outside a forward."""
        for i in range(len(self.events)):
            self.wait_group(i)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
