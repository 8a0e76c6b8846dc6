"""The one-pass Triton AdamW (dsv3.kernels.adamw) against its reference, the eager loop of
AdamWLowPrecisionMoments, and against torch's fused AdamW for bf16 weights (the peers' optimizer in
benchmarks/train_step.py). GPU-only checks skip on CPU; the CPU checks cover the fallback rules."""
from __future__ import annotations

import pytest
import torch

from dsv3.kernels.adamw import can_fuse
from dsv3.train.optim import AdamWLowPrecisionMoments

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _run(make_opt, param_dtype, device, steps=12):
    g = torch.Generator(device=device).manual_seed(0)
    # a large matrix (many blocks, a ragged last one) and a small vector, decayed and not
    w = torch.nn.Parameter(torch.randn(1000, 300, device=device, generator=g).to(param_dtype))
    b = torch.nn.Parameter(torch.randn(77, device=device, generator=g).to(param_dtype))
    opt = make_opt([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}])
    for _ in range(steps):
        w.grad = torch.randn(w.shape, device=device, generator=g).to(param_dtype)
        b.grad = torch.randn(b.shape, device=device, generator=g).to(param_dtype)
        opt.step()
    return (w.detach(), b.detach()), opt


def _ours(fused, moment_dtype):
    return lambda groups: AdamWLowPrecisionMoments(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                                                   moment_dtype=moment_dtype, fused=fused)


def test_cpu_takes_the_loop_and_fused_true_refuses():
    p = torch.zeros(4)
    assert not can_fuse(p, (p,))
    (w, _), _ = _run(_ours(None, torch.bfloat16), torch.float32, "cpu", steps=2)
    assert torch.isfinite(w).all()
    with pytest.raises(RuntimeError, match="fused=True"):
        _run(_ours(True, torch.bfloat16), torch.float32, "cpu", steps=1)


@cuda
@pytest.mark.parametrize("param_dtype,moment_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float32),
                                                      (torch.bfloat16, torch.bfloat16)])
def test_triton_adamw_matches_eager_loop(param_dtype, moment_dtype):
    """12 steps with weight decay: the kernel against the loop, weights and stored moments."""
    (w1, b1), o1 = _run(_ours(True, moment_dtype), param_dtype, "cuda")
    (w0, b0), o0 = _run(_ours(False, moment_dtype), param_dtype, "cuda")
    for a, b in ((w1, w0), (b1, b0)):
        if param_dtype == moment_dtype == torch.float32:   # the same fp32 arithmetic but for FMA contraction
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            continue
        # Rounded storage amplifies the last fp32 bit: where FMA contraction puts m, v or a bf16 weight on the
        # other side of a rounding boundary, that element differs from then on by a fraction of a step or a
        # rounding of the weight. Bound: a tenth of one step (lr = 1e-2) plus two roundings of the weight; and
        # nearly every element agrees to fp32 precision.
        bound = 0.1 * 1e-2 + 2 * torch.finfo(param_dtype).eps * b.float().abs()
        assert bool(((a.float() - b.float()).abs() <= bound).all())
        agree = (a.float() - b.float()).abs() <= 1e-6 + 1e-5 * b.float().abs()
        assert agree.float().mean().item() > 0.95
    for s1, s0 in zip(o1.state.values(), o0.state.values()):
        assert s1["exp_avg"].dtype == moment_dtype
        for key in ("exp_avg", "exp_avg_sq"):
            # stored moments: a rounding flip carries into later steps (and near zero, after cancellation in
            # beta m + (1 - beta) g, is large relative to the value): bounded by a few roundings of the
            # largest moment, and nearly all agree to a fraction of one rounding
            a, b = s1[key].float(), s0[key].float()
            diff = (a - b).abs()
            assert diff.max().item() <= 4 * torch.finfo(moment_dtype).eps * b.abs().max().item()
            assert (diff <= 1e-6 + 1e-2 * b.abs()).float().mean().item() > 0.97


@cuda
def test_triton_adamw_matches_torch_fused_adamw_on_bf16_weights():
    """bf16 weights, bf16 moments: what torch.optim.AdamW(fused=True) keeps for bf16 parameters."""
    (w1, b1), _ = _run(_ours(True, torch.bfloat16), torch.bfloat16, "cuda")
    (w0, b0), _ = _run(lambda gr: torch.optim.AdamW(gr, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=True),
                       torch.bfloat16, "cuda")
    torch.testing.assert_close(w1, w0, rtol=1e-2, atol=1e-2)
    assert (w1 == w0).float().mean().item() > 0.9
