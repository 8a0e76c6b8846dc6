"""The one interface expert parallelism uses to move tokens, and the autograd rules through it.

``Transport.all_to_all(x, in_splits, out_splits)``: row block i of x (in_splits[i] rows) goes to peer i; the
result stacks what every peer sent us (out_splits[j] rows from peer j). ``CollectiveTransport`` implements
it with ``torch.distributed.all_to_all_single`` over a process group: NCCL on GPUs, and gloo on the CPU
(torch 2.13's gloo does uneven splits; tested in tests/test_parallel_ep.py). Neither moves float8 dtypes, so
FP8 payloads travel as their raw bytes (a uint8 view) and are viewed back on arrival.

``Transport.all_gather(x)`` ([n, ...] -> [size*n, ...], block i from peer i) and ``Transport.all_to_all_equal(x)``
([size*n, ...] -> the same shape, block i to peer i, block j of the result from peer j): the fixed-size
exchanges of ``parallel.ep_dispatch = "allgather"`` (``dsv3.parallel.ep_allgather``), on torch's functional
collectives so that torch.compile traces them (sizes come from shapes alone: no host read, no graph break).

``Transport.all_to_all_async(x, in_splits, out_splits) -> (out, handle)``: the same exchange, started and not
waited for; ``out`` may be read only after ``handle.wait()``, and every handle must be waited on exactly once.
On NCCL the transfer runs on the communicator's own stream, ordered after the work queued on the current
stream when it was issued; ``wait()`` makes the current stream wait for it (the host does not block). On gloo
a worker thread runs it and ``wait()`` blocks the host. Collectives start in issue order on every rank, so all
ranks of a group must issue them in the same order (``expert_parallel`` does: its order depends only on the
chunk count). ``LocalTransport`` returns its input and a handle that is already done.

Autograd: the backward of an all-to-all with splits (in, out) is the all-to-all of the output gradient with
splits (out, in): every row's gradient goes back to the rank the row came from. Gradients travel over
``backward_transport(t)``: ``t.for_backward`` where a transport has one (``CollectiveTransport`` built with a
``backward_group``: a second communicator over the same ranks, so that a forward's transfers never wait in
NCCL's queue behind a concurrent backward's; ``parallel.fb_overlap``), else ``t`` itself.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


class Transport(Protocol):
    """Moves row blocks between the ranks of one expert-parallel group."""

    size: int
    rank: int

    def all_to_all(self, x: torch.Tensor, in_splits: list[int], out_splits: list[int]) -> torch.Tensor: ...

    def all_to_all_async(self, x: torch.Tensor, in_splits: list[int], out_splits: list[int]
                         ) -> tuple[torch.Tensor, "Handle"]: ...

    def all_gather(self, x: torch.Tensor) -> torch.Tensor: ...

    def all_to_all_equal(self, x: torch.Tensor) -> torch.Tensor: ...


class Handle(Protocol):
    def wait(self) -> None: ...


class _Done:
    """The handle of a transfer that has already happened."""

    def wait(self) -> None:
        pass


class _Pending:
    """A started all_to_all_single: holds its buffers until ``wait()`` (the allocator must not reuse them early)."""

    def __init__(self, work, *buffers):
        self.work, self.buffers = work, buffers

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work, self.buffers = None, ()


class CollectiveTransport:
    """all_to_all_single over a torch.distributed process group (NCCL or gloo); the gradients of its
    differentiable transfers over ``backward_group`` when given (the same ranks, another communicator)."""

    def __init__(self, group, backward_group=None):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.for_backward = self if backward_group is None else CollectiveTransport(backward_group)
        if self.for_backward.size != self.size or self.for_backward.rank != self.rank:
            raise ValueError("backward_group must hold the same ranks as group, in the same order")

    def all_to_all(self, x: torch.Tensor, in_splits: list[int], out_splits: list[int]) -> torch.Tensor:
        x = x.contiguous()
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        send, recv = (x.view(torch.uint8), out.view(torch.uint8)) if x.dtype in _FP8 else (x, out)
        dist.all_to_all_single(recv, send, out_splits, in_splits, group=self.group)
        return out

    def all_to_all_async(self, x: torch.Tensor, in_splits: list[int], out_splits: list[int]
                         ) -> tuple[torch.Tensor, _Pending]:
        x = x.contiguous()
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        send, recv = (x.view(torch.uint8), out.view(torch.uint8)) if x.dtype in _FP8 else (x, out)
        work = dist.all_to_all_single(recv, send, out_splits, in_splits, group=self.group, async_op=True)
        return out, _Pending(work, send, recv)

    # Fixed-size exchanges (``parallel.ep_dispatch = "allgather"``): torch's functional collectives, which
    # torch.compile traces into the block's graph (no graph break, no host values).
    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        # detached: called inside autograd Functions, which define the gradient (funcol warns otherwise)
        return funcol.wait_tensor(funcol.all_gather_tensor(x.detach().contiguous(), 0, self.group))

    def all_to_all_equal(self, x: torch.Tensor) -> torch.Tensor:
        return funcol.wait_tensor(funcol.all_to_all_single(x.detach().contiguous(), None, None, self.group))


class LocalTransport:
    """A group of one: all_to_all is the identity (ep = 1, and single-process tests of the EP code path)."""

    size = 1
    rank = 0

    def all_to_all(self, x: torch.Tensor, in_splits: list[int], out_splits: list[int]) -> torch.Tensor:
        return x

    def all_to_all_async(self, x: torch.Tensor, in_splits: list[int], out_splits: list[int]
                         ) -> tuple[torch.Tensor, _Done]:
        return x, _Done()

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_to_all_equal(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, transport, in_splits, out_splits):
        ctx.transport, ctx.in_splits, ctx.out_splits = transport, in_splits, out_splits
        return transport.all_to_all(x, in_splits, out_splits)

    @staticmethod
    def backward(ctx, grad):
        return backward_transport(ctx.transport).all_to_all(grad, ctx.out_splits, ctx.in_splits), None, None, None


def backward_transport(t: Transport) -> Transport:
    """The transport that carries the gradients of ``t``'s transfers (``t.for_backward``, else ``t``)."""
    return getattr(t, "for_backward", t)


def all_to_all(x: torch.Tensor, transport: Transport, in_splits: list[int], out_splits: list[int]) -> torch.Tensor:
    """Differentiable all-to-all (backward = the reverse all-to-all of the gradient)."""
    return _AllToAll.apply(x, transport, in_splits, out_splits)
