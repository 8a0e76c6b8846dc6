"""Activation recomputation (non-reentrant torch.utils.checkpoint), usable inside torch.compile'd blocks.

Selection counts for the balance bias must be taken once per real forward. They are returned as outputs of
the recomputed region and added to the buffers outside it (DecoderLayer.forward), so a replay during backward
recomputes them without counting them again; no flag or side effect lives inside the checkpointed function.
"""
from __future__ import annotations

import torch.utils.checkpoint


def checkpoint(fn, *args):
    """Non-reentrant activation checkpoint of ``fn(*args)``."""
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
