"""Cross-entropy over a large vocabulary fused with the output projection, without full fp32 logits.

Tokens are processed in chunks: each chunk's logits are formed, reduced to its loss, and immediately turned
into the gradients w.r.t. the hidden states and the head weight (softmax - onehot), so neither the [T, V]
logits nor their fp32 copy ever exist whole. Backward only scales the stored gradients by the incoming one
(the loss is linear in them). Reference twin: `dsv3.model.lm_loss` on explicit logits.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_TD, w_VD, labels_T, chunk):
        T = h_TD.shape[0]
        valid_T = labels_T != IGNORE_INDEX
        n_valid = valid_T.sum().clamp_min(1).to(torch.float32)
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh_TD = torch.empty_like(h_TD) if want_dh else None
        dw_VD = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if want_dw else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=h_TD.device)
        for s in range(0, T, chunk):
            h = h_TD[s:s + chunk]
            lab = labels_T[s:s + chunk]
            valid = valid_T[s:s + chunk]
            logits = (h @ w_VD.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            safe = lab.clamp_min(0)
            target = logits.gather(1, safe[:, None]).squeeze(1)
            loss_sum += ((lse - target) * valid).sum()
            if want_dh or want_dw:
                g = torch.exp(logits.sub_(lse[:, None]))              # softmax, in place over the logits
                g.scatter_add_(1, safe[:, None], -torch.ones_like(lse[:, None]))
                g.mul_(valid[:, None])
                g = g.to(h.dtype)
                if want_dh:
                    dh_TD[s:s + chunk] = g @ w_VD
                if want_dw:
                    dw_VD += (g.t() @ h).float()
        ctx.save_for_backward(*(t for t in (dh_TD, dw_VD) if t is not None), n_valid)
        ctx.has = (want_dh, want_dw)
        ctx.w_dtype = w_VD.dtype
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        saved = list(ctx.saved_tensors)
        n_valid = saved.pop()
        scale = grad_loss / n_valid
        dh = dw = None
        if ctx.has[0]:
            dh = saved.pop(0) * scale.to(saved[0].dtype if saved else torch.float32)
        if ctx.has[1]:
            dw = (saved.pop(0) * scale).to(ctx.w_dtype)
        return dh, dw, None, None


def linear_cross_entropy(h_TD: torch.Tensor, w_VD: torch.Tensor, labels_T: torch.Tensor,
                         chunk: int = 8192) -> torch.Tensor:
    """mean CE of softmax(h W^T) against labels (-100 ignored); runs in autocast's dtype when it is on."""
    dtype = h_TD.dtype
    if torch.is_autocast_enabled(h_TD.device.type):
        dtype = torch.get_autocast_dtype(h_TD.device.type)
    with torch.autocast(h_TD.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h_TD.to(dtype), w_VD.to(dtype), labels_T, chunk)
