"""AdamW with the paper's parameter groups, and a variant that stores its moments in BF16.

Decay applies to matrices (projections, experts, router, head). Norm weights, biases and the input
embedding are not decayed unless configured: shrinking a norm gain or an embedding row toward zero only
fights the normalization that follows it.
"""
from __future__ import annotations

import torch
from torch import nn

from dsv3.train.config import TrainConfig


def param_groups(model: nn.Module, t: TrainConfig) -> list[dict]:
    """Two groups: decayed matrices, and the rest (weight_decay 0)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = name.startswith("embed_tokens.")
        is_norm_or_bias = p.ndim < 2 or name.endswith(".bias")
        if (is_embedding and not t.decay_embeddings) or (is_norm_or_bias and not t.decay_norms):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    """torch AdamW (fp32 moments), or AdamWLowPrecisionMoments when ``bf16_moments``."""
    groups = param_groups(model, t)
    if t.bf16_moments:
        return AdamWLowPrecisionMoments(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
    # foreach=False: the per-parameter loop is bit-reproducible and plenty fast at our CPU sizes; on CUDA the
    # fused kernel is the fast path.
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                             fused=fused or None, foreach=False if not fused else None)


class AdamWLowPrecisionMoments(torch.optim.Optimizer):
    """AdamW (decoupled decay, bias correction) whose exp_avg / exp_avg_sq live in ``moment_dtype``.

    The update is computed in fp32 from the stored moments and written back rounded, so memory halves while
    the arithmetic stays fp32; parameters (the FP32 master weights) are updated in their own dtype.
    On CUDA each tensor is updated by one Triton kernel (``dsv3.kernels.adamw``, ``fused=None`` picks it when
    it can); the per-parameter eager loop below is its reference and the CPU path.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 moment_dtype: torch.dtype = torch.bfloat16, fused: bool | None = None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.moment_dtype = moment_dtype
        self.fused = fused

    def load_state_dict(self, state_dict) -> None:
        # Optimizer.load_state_dict casts floating state to each parameter's dtype (fp32); put the moments
        # back in their storage dtype, or a resumed run would silently continue with fp32 moments.
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(self.moment_dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        from dsv3.kernels.adamw import adamw_step_, can_fuse
        if p.grad is None:
            return
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype)
        state["step"] += 1
        t = float(state["step"])
        if self.fused is not False and can_fuse(p, (p.grad, state["exp_avg"], state["exp_avg_sq"])):
            adamw_step_(p, p.grad, state["exp_avg"], state["exp_avg_sq"], lr=lr, beta1=beta1, beta2=beta2,
                        eps=eps, weight_decay=wd, step=int(t))
            return
        if self.fused:
            raise RuntimeError("fused=True needs CUDA, Triton and contiguous tensors")
        g = p.grad.float()
        m = state["exp_avg"].float().mul_(beta1).add_(g, alpha=1 - beta1)
        v = state["exp_avg_sq"].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
        state["exp_avg"].copy_(m)
        state["exp_avg_sq"].copy_(v)
        bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
        denom = (v.sqrt() / bc2 ** 0.5).add_(eps)
        # decay and update in fp32, one rounding into a low-precision weight (as the fused kernels do)
        p32 = p if p.dtype == torch.float32 else p.float()
        if wd:
            p32.mul_(1 - lr * wd)
        p32.add_(m / denom, alpha=-lr / bc1)
        if p32 is not p:
            p.copy_(p32)
