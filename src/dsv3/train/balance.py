"""Auxiliary-loss-free load balancing: the per-step update of each MoE layer's routing bias.

Called once per optimizer step, after all micro-batches: the counts a MoE layer accumulated in
``tokens_per_expert`` during training forwards (not eval, not recompute replays) are, optionally, summed over
data-parallel ranks, then ``b_e += gamma * sign(mean(n) - n_e)`` pushes under-loaded experts up and
over-loaded ones down. The bias only chooses experts, so it is a buffer, never in the optimizer.
"""
from __future__ import annotations

from typing import Callable

import torch

from dsv3.model.moe import max_violation


def read_counts(model) -> list[torch.Tensor]:
    """Copies of every MoE layer's accumulated counts (main layers, then MTP layers)."""
    return [moe.tokens_per_expert.detach().clone() for moe in model.moe_layers()]


@torch.no_grad()
def update_balance_biases(model, gamma: float,
                          all_reduce: Callable[[torch.Tensor], None] | None = None) -> list[float]:
    """Update every routing bias from this step's counts, zero the counts, return per-layer MaxVio.

    ``all_reduce(t)`` sums a tensor in place over data-parallel ranks (e.g. torch.distributed.all_reduce);
    None for one process. Layers without a bias (softmax / greedy routing) still report MaxVio.
    """
    vios = []
    for moe in model.moe_layers():
        counts = moe.tokens_per_expert.clone()
        if all_reduce is not None:
            all_reduce(counts)
        n = counts.float()
        vios.append(float(max_violation(counts)) if n.sum() > 0 else 0.0)
        bias = moe.gate.e_score_correction_bias
        if bias is not None and gamma != 0.0:
            bias.add_(gamma * torch.sign(n.mean() - n).to(bias.device, bias.dtype))
        moe.tokens_per_expert.zero_()
    return vios


@torch.no_grad()
def zero_counts(model) -> None:
    """Drop the counts of a step that is skipped (non-finite loss): it must not move the biases."""
    for moe in model.moe_layers():
        moe.tokens_per_expert.zero_()
