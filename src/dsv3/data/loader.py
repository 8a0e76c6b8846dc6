"""Packed, resumable, data-parallel batch loader with background prefetching.

Batch format (a dict of CPU int64 tensors, pinned if asked)::

    input_ids [B, S]   tokens
    labels    [B, S]   labels[b, i] = the token after input_ids[b, i]; IGNORE_INDEX (-100) on padding
    doc_ids   [B, S]   only with document_mask=True: document index of each position within its row
                       (0, 1, ...), for a block-diagonal causal mask; an EOS belongs to the document it starts

B is the per-rank batch: the global batch divided by world_size. See dsv3.data.packing for the packing.

Resume. The unit of progress is the number of GLOBAL sequences consumed since the start of training. Global
sequence g is window ``window_order[g % W]`` of epoch ``g // W`` (W windows per epoch), and a step taking a
global batch of G sequences gives rank r the contiguous slice [g + r*G/ws, g + (r+1)*G/ws). A batch is
therefore a pure function of (consumed, G, rank, world_size): ``state_dict()`` stores ``consumed`` and
``step``, and a restored loader yields exactly the batches the original would have. It even stays exact
when the world size changes between runs, as long as G divides by it.

Batch-size ramp. ``batch_size`` is an int or a callable ``step -> global batch size``; the prefetch thread
evaluates the callable ahead, so a ramp costs nothing. ``next_batch(G)`` may also force a size for one step;
if that differs from what was prefetched, the queue is discarded and refilled (correct, only slower).
"""
from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from dsv3.data.packing import IGNORE_INDEX, EpochLayout, windows_per_epoch
from dsv3.data.shards import TokenDataset
from dsv3.errors import UserError

__all__ = ["PackedLoader", "validation_batches", "IGNORE_INDEX"]

STATE_VERSION = 1


def _open(data, verify: bool) -> TokenDataset:
    return data if isinstance(data, TokenDataset) else TokenDataset(Path(data), verify=verify)


def _to_batch(rows: list[tuple], document_mask: bool, pin_memory: bool) -> dict[str, torch.Tensor]:
    batch = {"input_ids": torch.from_numpy(np.stack([r[0] for r in rows])),
             "labels": torch.from_numpy(np.stack([r[1] for r in rows]))}
    if document_mask:
        batch["doc_ids"] = torch.from_numpy(np.stack([r[2] for r in rows]))
    if pin_memory and torch.cuda.is_available():
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return batch


class _Layouts:
    """Epoch layouts built on demand; the last two are kept (a batch may straddle an epoch edge)."""

    def __init__(self, ds: TokenDataset, split: str, seq_len: int, seed: int):
        self.split, self.eos, self.seq_len, self.seed = ds.split(split), ds.eos_id, seq_len, seed
        self._cache: dict[int, EpochLayout] = {}
        self._lock = threading.Lock()  # main thread and prefetch thread may both build batches

    def get(self, epoch: int) -> EpochLayout:
        with self._lock:
            if epoch not in self._cache:
                self._cache[epoch] = EpochLayout(self.split, self.eos, self.seq_len, self.seed, epoch)
                for old in sorted(self._cache)[:-2]:
                    del self._cache[old]
            return self._cache[epoch]


class _Builder:
    """Makes a rank's batch from (consumed, global batch size); shared by the caller and the prefetch thread.

    Kept apart from PackedLoader so the thread holds no reference to the loader, which can then be
    garbage-collected (and its thread stopped) when the trainer drops it.
    """

    def __init__(self, ds: TokenDataset, split: str, seq_len: int, seed: int, rank: int, world_size: int,
                 document_mask: bool, pin_memory: bool, schedule: Callable[[int], int]):
        self.layouts = _Layouts(ds, split, seq_len, seed)
        self.windows_per_epoch = windows_per_epoch(ds.split(split), seq_len)
        self.rank, self.world_size = rank, world_size
        self.document_mask, self.pin_memory, self.schedule = document_mask, pin_memory, schedule

    def check_size(self, size: int, step: int) -> int:
        if size < 1 or size % self.world_size:
            raise UserError(f"global batch size {size} at step {step} must be a positive multiple of "
                            f"world_size {self.world_size}")
        return size

    def scheduled(self, step: int) -> int:
        return self.check_size(int(self.schedule(step)), step)

    def build(self, consumed: int, global_batch: int) -> dict[str, torch.Tensor]:
        local = global_batch // self.world_size
        first = consumed + self.rank * local
        rows = []
        for g in range(first, first + local):
            epoch, i = divmod(g, self.windows_per_epoch)
            rows.append(self.layouts.get(epoch).shuffled_window(i, self.document_mask))
        return _to_batch(rows, self.document_mask, self.pin_memory)


class PackedLoader:
    """Infinite iterator over packed training batches of one split (see the module docstring).

    Args:
        data: a data directory written by `dsv3 prepare`, or an open TokenDataset.
        seq_len: S, tokens per row.
        batch_size: GLOBAL sequences per step (all ranks together), int or callable step -> int.
        seed: fixes document and window shuffles; epoch e reshuffles with (seed, e).
        rank, world_size: data-parallel position; each rank gets a disjoint slice of every global batch.
        document_mask: also yield ``doc_ids``.
        prefetch: batches prepared ahead by a background thread (0: build in the calling thread).
        pin_memory: pin batches (when CUDA is present) for non_blocking copies.
        verify: hash every data file on open (False: sizes only).
    """

    def __init__(self, data, split: str = "train", *, seq_len: int, batch_size: int | Callable[[int], int],
                 seed: int = 0, rank: int = 0, world_size: int = 1, document_mask: bool = False,
                 prefetch: int = 4, pin_memory: bool = False, verify: bool = True):
        if seq_len < 1:
            raise UserError(f"seq_len {seq_len} must be positive")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} must be in [0, world_size={world_size})")
        self.ds = _open(data, verify)
        self.split_name, self.seq_len, self.seed = split, int(seq_len), int(seed)
        self.rank, self.world_size = rank, world_size
        self.document_mask, self.pin_memory, self.prefetch = document_mask, pin_memory, int(prefetch)
        schedule = batch_size if callable(batch_size) else (lambda step, _b=int(batch_size): _b)
        self._builder = _Builder(self.ds, split, self.seq_len, self.seed, rank, world_size, document_mask,
                                 pin_memory, schedule)
        self.windows_per_epoch = self._builder.windows_per_epoch
        if self.windows_per_epoch == 0:
            raise UserError(f"split {split!r} of {self.ds.path} holds no tokens; prepare more data")
        self.step = 0       # batches handed out
        self.consumed = 0   # global sequences handed out
        self._worker: _Prefetcher | None = None

    # ---- batch construction: a pure function of (consumed, global batch) ----

    def global_batch_size(self, step: int) -> int:
        """The scheduled global batch size at ``step``, checked against world_size."""
        return self._builder.scheduled(step)

    def build(self, consumed: int, global_batch: int) -> dict[str, torch.Tensor]:
        """This rank's batch for the global batch of ``global_batch`` sequences starting at ``consumed``."""
        return self._builder.build(consumed, self._builder.check_size(int(global_batch), self.step))

    # ---- iteration ----

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.next_batch()

    def next_batch(self, batch_size: int | None = None) -> dict[str, torch.Tensor]:
        """The next batch; ``batch_size`` (global) overrides the schedule for this step."""
        b = self._builder
        size = b.scheduled(self.step) if batch_size is None else b.check_size(int(batch_size), self.step)
        batch = None
        if self.prefetch > 0:
            if self._worker is None:
                self._worker = _Prefetcher(b, self.step, self.consumed, self.prefetch)
            batch = self._worker.take(self.consumed, size)
            if batch is None:  # prefetched for another size: restart the thread from here
                self._stop_worker()
                batch = b.build(self.consumed, size)
                self.step, self.consumed = self.step + 1, self.consumed + size
                self._worker = _Prefetcher(b, self.step, self.consumed, self.prefetch)
                return batch
        else:
            batch = b.build(self.consumed, size)
        self.step, self.consumed = self.step + 1, self.consumed + size
        return batch

    @property
    def epoch(self) -> int:
        """Epoch of the next sequence to be consumed."""
        return self.consumed // self.windows_per_epoch

    # ---- resume ----

    def state_dict(self) -> dict:
        """Small JSON-able state; together with the constructor arguments it fixes every later batch."""
        return {"version": STATE_VERSION, "step": self.step, "consumed": self.consumed, "seed": self.seed,
                "seq_len": self.seq_len, "split": self.split_name, "tokenizer_sha256": self.ds.tokenizer_sha256,
                "split_tokens": self.ds.split(self.split_name).n_tokens}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; refuses a state taken on other data, seed or sequence length."""
        expect = self.state_dict()
        for key in ("version", "seed", "seq_len", "split", "tokenizer_sha256", "split_tokens"):
            if state.get(key) != expect[key]:
                raise UserError(f"loader state does not match this run ({key}: saved {state.get(key)!r}, now "
                                f"{expect[key]!r}); resume with the same data, seed and seq_len")
        self._stop_worker()
        self.step, self.consumed = int(state["step"]), int(state["consumed"])

    # ---- shutdown ----

    def _stop_worker(self) -> None:
        if self._worker is not None:
            self._worker.stop()
            self._worker = None

    def close(self) -> None:
        """Stop the prefetch thread (safe to call more than once); the loader can still be used after."""
        self._stop_worker()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class _Prefetcher:
    """A daemon thread building batches ahead of the consumer into a bounded queue.

    It keeps its own (step, consumed) cursor; each queued item is tagged with the cursor it was built at,
    so the consumer can check it got the batch it asked for.
    """

    def __init__(self, builder: _Builder, step: int, consumed: int, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(builder, step, consumed), daemon=True,
                                        name="dsv3-prefetch")
        self._thread.start()

    def _run(self, builder: _Builder, step: int, consumed: int) -> None:
        try:
            while not self._stop.is_set():
                size = builder.scheduled(step)
                item = (consumed, size, builder.build(consumed, size), None)
                if not self._put(item):
                    return
                step, consumed = step + 1, consumed + size
        except BaseException as e:  # handed to the consumer, raised there
            self._put((None, None, None, e))

    def _put(self, item) -> bool:
        # A timed put so that stop() is noticed even when the queue is full.
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def take(self, consumed: int, size: int):
        """The next prefetched batch if it starts at ``consumed`` with ``size`` sequences, else None."""
        while True:
            try:
                at, got_size, batch, error = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the prefetch thread stopped unexpectedly") from None
        if error is not None:
            raise error
        return batch if (at, got_size) == (consumed, size) else None

    def stop(self) -> None:
        """Signal the thread, unblock it, and wait for it to exit."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)


def validation_batches(data, *, seq_len: int, batch_size: int, max_batches: int | None = None,
                       split: str = "validation", rank: int = 0, world_size: int = 1,
                       document_mask: bool = False, verify: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Evaluation batches in a fixed order (documents as stored, windows in sequence), at most ``max_batches``.

    ``batch_size`` is global. The last batch is completed with rows whose labels are all IGNORE_INDEX, so
    every batch has the same shape on every rank; sum the loss over labels != IGNORE_INDEX and divide by
    their count to get the exact mean over the split.
    """
    if batch_size < 1 or batch_size % world_size:
        raise UserError(f"validation batch size {batch_size} must be a positive multiple of world_size {world_size}")
    ds = _open(data, verify)
    layout = EpochLayout(ds.split(split), ds.eos_id, seq_len, seed=0, epoch=0, shuffle=False)
    local = batch_size // world_size
    n_batches = -(-layout.n_windows // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    empty = (np.full(seq_len, ds.eos_id, dtype=np.int64), np.full(seq_len, IGNORE_INDEX, dtype=np.int64),
             np.zeros(seq_len, dtype=np.int64))
    for b in range(n_batches):
        first = b * batch_size + rank * local
        rows = [layout.window(j, document_mask) if j < layout.n_windows else empty
                for j in range(first, first + local)]
        yield _to_batch(rows, document_mask, pin_memory=False)
