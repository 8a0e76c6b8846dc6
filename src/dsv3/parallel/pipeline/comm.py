"""Point-to-point transfer of activations and gradients between pipeline ranks.

A message is ("act", g, m): chunk g's output for micro-batch m, from owner(g) to owner(g+1); or
("grad", g, m): dL/d(input of chunk g), from owner(g) to owner(g-1). Chunks on the same rank hand over
in memory (``Mailbox``) with no communication.

Receives are posted per channel (peer, kind) in the order the *sender's* schedule produces the messages
(every rank can build every rank's op list), a few ahead of need, so that NCCL's in-order matching per
peer pair holds and data lands while this rank computes; gloo additionally matches by tag. Sends are
isend's that nobody waits on until the step ends (``Comm.finish``), so a send never blocks its rank: a
schedule that passes schedules.validate cannot deadlock here.

Channels: with ``p2p_groups`` ({(src, dst): group}, see dsv3.parallel.mesh.build_p2p_groups) each
direction between two ranks has its own communicator, so on NCCL a rank's posted-ahead receives never
sit in front of its own sends on a shared stream. Without it everything goes over ``group`` (fine on gloo).

CUDA: the isend/irecv of NCCL run on NCCL's own streams and ``wait()`` only makes the current stream wait
(the host carries on), so transfers overlap compute without extra streams. Sent tensors are kept alive
until their send completes.
"""
from __future__ import annotations

import collections

import torch
import torch.distributed as dist

from dsv3.parallel.pipeline.partition import chunk_owner, num_chunks
from dsv3.parallel.pipeline.schedules import Op
from dsv3.parallel.pipeline.trace import Tracer


def messages_sent(ops: list[Op], schedule: str, pp: int) -> list[tuple[str, int, int, int]]:
    """(kind, chunk, mb, destination rank) of every message a rank's op list sends, in order."""
    C = num_chunks(schedule, pp)
    out = []
    for op in ops:
        me = chunk_owner(op.chunk, schedule, pp)
        if op.kind == "F" and op.chunk < C - 1:
            dst = chunk_owner(op.chunk + 1, schedule, pp)
            if dst != me:
                out.append(("act", op.chunk, op.mb, dst))
        elif op.kind == "B" and op.chunk > 0:
            dst = chunk_owner(op.chunk - 1, schedule, pp)
            if dst != me:
                out.append(("grad", op.chunk, op.mb, dst))
    return out


class Comm:
    """One step's P2P traffic for one rank of the pipeline group."""

    def __init__(self, rank: int, all_ops: list[list[Op]], schedule: str, pp: int, group, shape_of,
                 dtype: torch.dtype, device: torch.device, tracer: Tracer, m: int, lookahead: int = 2,
                 p2p_groups: dict | None = None):
        self.rank, self.group, self.schedule, self.pp, self.m = rank, group, schedule, pp, m
        self.p2p_groups = p2p_groups or {}
        self.C = num_chunks(schedule, pp)
        self.shape_of, self.dtype, self.device, self.tracer = shape_of, dtype, device, tracer
        self.lookahead = lookahead
        # incoming channels: peer -> deque of expected message keys, in the peer's send order
        self.expected: dict[int, collections.deque] = {}
        for peer, ops in enumerate(all_ops):
            if peer == rank:
                continue
            keys = [(k, g, mb) for k, g, mb, dst in messages_sent(ops, schedule, pp) if dst == rank]
            if keys:
                self.expected[peer] = collections.deque(keys)
        self.posted: dict[tuple, tuple] = {}       # key -> (work, buffer, post time)
        self.sends: list[tuple] = []               # (work, tensor, name, post time)
        self.wait_s = 0.0

    def _global(self, r: int) -> int:
        return dist.get_global_rank(self.group, r) if self.group is not None else r

    def channel(self, src: int, dst: int):
        """The group that carries src -> dst messages (pp ranks)."""
        return self.p2p_groups.get((src, dst), self.group)

    def _tag(self, kind: str, g: int, mb: int) -> int:
        return ((0 if kind == "act" else 1) * self.C + g) * self.m + mb

    def _post_next(self, peer: int) -> bool:
        q = self.expected.get(peer)
        if not q:
            return False
        key = q.popleft()
        buf = torch.empty(self.shape_of(key[2]), dtype=self.dtype, device=self.device)
        work = dist.irecv(buf, src=self._global(peer), group=self.channel(peer, self.rank), tag=self._tag(*key))
        self.posted[key] = (work, buf, self.tracer.now())
        return True

    def prefetch(self) -> None:
        """Keep up to ``lookahead`` receives in flight on every incoming channel."""
        for peer, q in self.expected.items():
            inflight = sum(1 for k in self.posted if self._src(k) == peer)
            while inflight < self.lookahead and q:  # lookahead 0: every receive is posted by recv() itself
                self._post_next(peer)
                inflight += 1

    def _src(self, key) -> int:
        kind, g, _ = key
        return chunk_owner(g, self.schedule, self.pp)

    def recv(self, kind: str, g: int, mb: int) -> torch.Tensor:
        """Block until message (kind, g, mb) is here; posts the receives before it on its channel first."""
        key = (kind, g, mb)
        peer = self._src(key)
        while key not in self.posted:
            if not self._post_next(peer):
                raise RuntimeError(f"pipeline rank {self.rank} waits for {key} that rank {peer} never sends")
        work, buf, posted = self.posted.pop(key)
        start = self.tracer.now()
        work.wait()
        end = self.tracer.now()
        self.wait_s += end - start
        name = f"recv {kind} {g}.{mb}"
        self.tracer.add(name, "recv_wait", "comm", start, end)
        self.tracer.add(name + " (in flight)", "recv", "comm", posted, end)
        return buf

    def send(self, kind: str, g: int, mb: int, tensor: torch.Tensor) -> None:
        dst = chunk_owner(g + 1 if kind == "act" else g - 1, self.schedule, self.pp)
        tensor = tensor.detach().to(self.dtype).contiguous()
        work = dist.isend(tensor, dst=self._global(dst), group=self.channel(self.rank, dst),
                          tag=self._tag(kind, g, mb))
        self.sends.append((work, tensor, f"send {kind} {g}.{mb}", self.tracer.now()))
        self._reap()

    def _reap(self) -> None:
        """Drop the sends that have completed (their tensors can be freed)."""
        keep = []
        for work, tensor, name, t in self.sends:
            if work.is_completed():
                self.tracer.add(name, "send", "comm", t, self.tracer.now())
            else:
                keep.append((work, tensor, name, t))
        self.sends = keep

    def finish(self) -> None:
        """Wait for every send of the step; all receives must have been consumed."""
        for work, tensor, name, t in self.sends:
            work.wait()
            self.tracer.add(name, "send", "comm", t, self.tracer.now())
        self.sends = []
        left = [k for q in self.expected.values() for k in q] + list(self.posted)
        if left:
            raise RuntimeError(f"pipeline rank {self.rank}: messages never consumed: {left[:4]}")


class Mailbox:
    """Hand-over between two chunks of the same rank (DualPipeV's turn at rank pp-1)."""

    def __init__(self):
        self.box: dict[tuple, torch.Tensor] = {}

    def put(self, kind: str, g: int, mb: int, t: torch.Tensor) -> None:
        self.box[(kind, g, mb)] = t

    def take(self, kind: str, g: int, mb: int) -> torch.Tensor:
        return self.box.pop((kind, g, mb))
