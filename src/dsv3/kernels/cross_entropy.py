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


# False: each chunk's g^T h is rounded to the operands' dtype, cast to fp32 and added (the pre-2026-12-07 code),
# the other side of ``benchmarks/train_step.py --ab kernels.cross_entropy.GEMM_ACCUMULATES``
GEMM_ACCUMULATES = True


def add_weight_grad(dw_VD: torch.Tensor | None, g_CV: torch.Tensor, h_CD: torch.Tensor) -> torch.Tensor:
    """dw + g^T h in fp32 (dw None: the first chunk's g^T h): the head's weight gradient summed over chunks.

    On CUDA with bf16/fp16 operands the GEMM writes its fp32 result itself (``out_dtype``) and later chunks
    accumulate into it in the GEMM's epilogue (``addmm(..., out=dw)``): exact products, fp32 sums. The old form,
    ``dw += (g^T h).float()``, rounded each chunk's sum to bf16 first and then made three more passes over the
    fp32 [V, D] buffer per chunk (a cast, a read-add-write, the zero fill): ~2 ms of a 3.2B step in an H100 profile.
    Elsewhere (the reference) the same sums in fp32 torch math."""
    low_precision_gpu = g_CV.is_cuda and g_CV.dtype in (torch.bfloat16, torch.float16)
    if low_precision_gpu and GEMM_ACCUMULATES:
        if dw_VD is None:
            return torch.mm(g_CV.t(), h_CD, out_dtype=torch.float32)
        return torch.addmm(dw_VD, g_CV.t(), h_CD, out_dtype=torch.float32, out=dw_VD)
    part = (g_CV.t() @ h_CD).float() if low_precision_gpu else g_CV.t().float() @ h_CD.float()
    return part if dw_VD is None else dw_VD.add_(part)


def scaled_to(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t * scale computed in fp32 and rounded once to ``dtype`` (the scale, grad / n_valid, is never rounded to a
    bf16 t's dtype first), in one pass where t is fp32 (``t.float()`` is then t itself)."""
    return torch.mul(t.float(), scale, out=torch.empty(t.shape, dtype=dtype, device=t.device))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_TD, w_VD, labels_T, chunk, compiled):
        T = h_TD.shape[0]
        n_valid = (labels_T != IGNORE_INDEX).sum().clamp_min(1).to(torch.float32)
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh_TD = torch.empty_like(h_TD) if want_dh else None
        dw_VD = None
        loss_sum = torch.zeros((), dtype=torch.float32, device=h_TD.device)
        step = _chunk_fn(h_TD.device, compiled)
        for s in range(0, T, chunk):
            h = h_TD[s:s + chunk]
            loss, g = step(h @ w_VD.t(), labels_T[s:s + chunk], want_dh or want_dw)
            loss_sum += loss
            if want_dh:
                dh_TD[s:s + chunk] = g @ w_VD
            if want_dw:
                dw_VD = add_weight_grad(dw_VD, g, h)
        if want_dw and dw_VD is None:   # no tokens at all
            dw_VD = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device)
        ctx.save_for_backward(*(t for t in (dh_TD, dw_VD) if t is not None), n_valid)
        ctx.has = (want_dh, want_dw)
        ctx.w_dtype = w_VD.dtype
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        saved = list(ctx.saved_tensors)
        n_valid = saved.pop()
        scale = grad_loss.float() / n_valid
        dh = dw = None
        if ctx.has[0]:
            dh_TD = saved.pop(0)
            dh = scaled_to(dh_TD, scale, dh_TD.dtype)
        if ctx.has[1]:
            dw = scaled_to(saved.pop(0), scale, ctx.w_dtype)
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
