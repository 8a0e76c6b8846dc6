"""Cross-entropy over a large vocabulary fused with the output projection, without full fp32 logits.

Tokens are processed in chunks: each chunk's logits are formed, reduced to its loss, and immediately turned
into the gradients w.r.t. the hidden states and the head weight (softmax - onehot), so neither the [T, V]
logits nor their fp32 copy ever exist whole. Backward only scales the stored gradients by the incoming one
(the loss is linear in them). Reference twin: `dsv3.model.lm_loss` on explicit logits.

Per chunk, everything between the two GEMMs (fp32 upcast, log-sum-exp, target logit, softmax minus one-hot,
masking, the cast back) is one function, ``chunk_loss_and_grad``. On the GPU it runs compiled: Inductor makes
it two passes over the chunk's bf16 logits (the row reduction, then the gradient), where eager ops made about
eight passes over an fp32 copy (11 ms of a 170 ms `small` step on an H200). Eager is the reference twin
(``compiled=False``), and a test compares the two.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


def chunk_loss_and_grad(logits_CV: torch.Tensor, labels_C: torch.Tensor, want_grad: bool = True
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed CE of one chunk's logits (fp32 math) and, with ``want_grad``, its gradient softmax - onehot in the
    logits' dtype, zero on ignored rows (labels == -100); None without (evaluation: no gradient pass).
    Under torch.compile the flag is a constant, so each value gets its own graph."""
    logits = logits_CV.float()
    valid = (labels_C != IGNORE_INDEX)[:, None]
    safe = labels_C.clamp_min(0)[:, None]
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    target = logits.gather(1, safe)
    loss = ((lse - target) * valid).sum()
    if not want_grad:
        return loss, None
    onehot = torch.arange(logits.shape[1], device=logits.device)[None, :] == safe
    grad = torch.where(valid, torch.exp(logits - lse) - onehot.float(), 0.0)
    return loss, grad.to(logits_CV.dtype)


_compiled_chunk = None
# Whether chunks run compiled when a call does not say: None = on CUDA. The trainer sets False when
# train.compile is off, so a run that asked for no torch.compile gets none.
COMPILE_CHUNKS: bool | None = None


def _chunk_fn(device: torch.device, compiled: bool | None):
    """The compiled twin on CUDA (unless ``compiled`` or COMPILE_CHUNKS says otherwise), the eager reference
    elsewhere."""
    global _compiled_chunk
    if compiled is None:
        compiled = device.type == "cuda" and COMPILE_CHUNKS is not False
    if not compiled:
        return chunk_loss_and_grad
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(chunk_loss_and_grad, dynamic=False)
    return _compiled_chunk


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_TD, w_VD, labels_T, chunk, compiled):
        T = h_TD.shape[0]
        n_valid = (labels_T != IGNORE_INDEX).sum().clamp_min(1).to(torch.float32)
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh_TD = torch.empty_like(h_TD) if want_dh else None
        dw_VD = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if want_dw else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=h_TD.device)
        step = _chunk_fn(h_TD.device, compiled)
        for s in range(0, T, chunk):
            h = h_TD[s:s + chunk]
            loss, g = step(h @ w_VD.t(), labels_T[s:s + chunk], want_dh or want_dw)
            loss_sum += loss
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
        return dh, dw, None, None, None


def linear_cross_entropy(h_TD: torch.Tensor, w_VD: torch.Tensor, labels_T: torch.Tensor,
                         chunk: int = 8192, compiled: bool | None = None) -> torch.Tensor:
    """mean CE of softmax(h W^T) against labels (-100 ignored); runs in autocast's dtype when it is on.
    ``compiled``: the per-chunk softmax/gradient compiled (default: on CUDA) or eager (the reference).
    The weight is cast at each call (``train.weight_cast = "per_step"`` hands over its once-per-step copy
    instead, the same values: ``dsv3.train.compute_weights.cast_for_use``)."""
    from dsv3.train.compute_weights import cast_for_use
    dtype = h_TD.dtype
    if torch.is_autocast_enabled(h_TD.device.type):
        dtype = torch.get_autocast_dtype(h_TD.device.type)
    with torch.autocast(h_TD.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h_TD.to(dtype), cast_for_use(w_VD, dtype), labels_T, chunk, compiled)
