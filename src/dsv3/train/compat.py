"""Adapters for model behaviour the trainer depends on, kept here until the model side is fixed.

MTP padding: ``dsv3.model.mtp_shift`` takes the MTP input tokens t_{i+k} from ``labels``, so a padded
position (label -100: the loader pads the last window of every epoch, and the validation iterator pads its
last batch) becomes an input id of -100 and the embedding lookup fails (IndexError on the CPU, a device-side
assert on CUDA). Those positions' MTP targets are ignored anyway, so any valid id is correct there: a
forward pre-hook on the embedding clamps negative ids to 0. It is installed only when mtp_shift still
produces negative ids, and is a no-op for real inputs (token ids are never negative).
"""
from __future__ import annotations

import torch

from dsv3.model import mtp_shift


def mtp_shift_leaks_padding() -> bool:
    """True when mtp_shift turns an ignored label into a negative input id (the model-side bug)."""
    ids = torch.zeros(1, 4, dtype=torch.long)
    labels = torch.tensor([[1, 2, -100, -100]])
    next_ids, _ = mtp_shift(ids, labels, 1, None)
    return bool((next_ids < 0).any())


def _clamp_ids(module, args):
    return (args[0].clamp_min(0),) + tuple(args[1:])


def guard_mtp_padding(model) -> None:
    """Make padded batches safe for MTP (see the module docstring); idempotent."""
    if model.config.num_nextn_predict_layers == 0 or getattr(model, "_dsv3_pad_guard", False):
        return
    if mtp_shift_leaks_padding():
        model.embed_tokens.register_forward_pre_hook(_clamp_ids)
        model._dsv3_pad_guard = True
