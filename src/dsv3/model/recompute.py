"""Activation recomputation that tells the model when a forward is a replay.

Selection counts for the bias update must be taken once per real forward; under recomputation the forward
runs again during backward, and counting it would double the counts. torch.utils.checkpoint lets us enter a
context for the replay only, which sets the flag read by ``is_recomputing``.
"""
from __future__ import annotations

import contextlib
import threading

import torch.utils.checkpoint

_state = threading.local()


def is_recomputing() -> bool:
    """True while torch.utils.checkpoint replays a forward for backward."""
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def _recomputing():
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def checkpoint(fn, *args, **kwargs):
    """Non-reentrant activation checkpoint of ``fn(*args, **kwargs)`` with the replay flag set."""
    return torch.utils.checkpoint.checkpoint(
        fn, *args, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), _recomputing()), **kwargs)
