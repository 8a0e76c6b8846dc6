"""Validation: exact token-weighted mean losses, perplexity and MaxVio over the validation split."""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from dsv3.data.loader import IGNORE_INDEX, validation_batches
from dsv3.model.moe import max_violation


@torch.no_grad()
def evaluate(model, data, *, seq_len: int, batch_size: int, max_batches: int | None, device: torch.device,
             autocast_dtype: torch.dtype | None = None, document_mask: bool = False, rank: int = 0,
             world_size: int = 1, all_reduce=None, before_forward=None) -> dict:
    """{'loss', 'ppl', 'loss_mtp_k'..., 'maxvio', 'tokens'} on the validation split.

    Each batch's mean loss is weighted by its count of non-ignored labels, so the result is the mean over
    every token seen (the last batch is padded with ignored rows). MTP losses are weighted the same way
    (their targets are one shorter per row: a small, harmless approximation). Expert counts of eval forwards
    are summed here and never touch the training counters (the model is in eval mode).

    ``batch_size`` rows per batch in total, whatever the layout (rounded up to a multiple of ``world_size``),
    so ``max_batches`` covers the same validation tokens on one process and on several.
    Data parallel: each rank evaluates its slice of every batch (``rank``/``world_size``) and ``all_reduce``
    (an in-place sum of a tensor over the data-parallel ranks) adds the sums; every rank runs every batch, even one whose slice is all padding, because expert
    parallel forwards are collectives. ``before_forward`` (if given) is called before each forward (the
    trainer's CUDA-graph step marker).
    """
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    total_tokens = 0
    counts = None
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    try:
        global_batch = -(-batch_size // world_size) * world_size
        for batch in validation_batches(data, seq_len=seq_len, batch_size=global_batch,
                                        max_batches=max_batches, document_mask=document_mask, rank=rank,
                                        world_size=world_size):
            ids = batch["input_ids"].to(device)
            labels = batch["labels"].to(device)
            doc_ids = batch["doc_ids"].to(device) if document_mask else None
            n = int((labels != IGNORE_INDEX).sum())
            if n == 0 and world_size == 1:
                continue
            if before_forward is not None:
                before_forward()
            with ctx:
                out = model(ids, labels, doc_ids=doc_ids, return_logits=False)
            for k, v in out.losses.items():
                sums[k] = sums.get(k, 0.0) + (float(v) * n if n else 0.0)
            c = [x.detach().cpu() for x in out.expert_counts]
            counts = c if counts is None else [a + b for a, b in zip(counts, c)]
            total_tokens += n
    finally:
        model.train(was_training)
    if all_reduce is not None and world_size > 1:
        keys = sorted(sums)
        packed = torch.tensor([float(total_tokens)] + [sums[k] for k in keys], dtype=torch.float64)
        packed = _reduced(packed, all_reduce, device)
        total_tokens, sums = int(packed[0]), {k: float(v) for k, v in zip(keys, packed[1:])}
        if counts:
            counts = list(_reduced(torch.stack(counts), all_reduce, device).unbind(0))
    if total_tokens == 0:
        return {"tokens": 0}
    result = {"loss": sums["main"] / total_tokens}
    result["ppl"] = math.exp(min(result["loss"], 700.0))
    for k, v in sums.items():
        if k.startswith("mtp_"):
            result[f"loss_{k}"] = v / total_tokens
    if counts:
        vios = [float(max_violation(c)) for c in counts]
        result["maxvio"] = sum(vios) / len(vios)
        result["maxvio_max"] = max(vios)
    result["tokens"] = total_tokens
    return result



def _reduced(t: torch.Tensor, all_reduce, device: torch.device) -> torch.Tensor:
    on_device = t.to(device)
    all_reduce(on_device)
    return on_device.cpu()
