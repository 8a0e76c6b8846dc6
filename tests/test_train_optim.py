"""AdamW variant with BF16 moments against torch.optim.AdamW; parameter groups."""
from __future__ import annotations

import torch

from dsv3.config import preset
from dsv3.model import DeepseekV3
from dsv3.train.config import TrainConfig
from dsv3.train.optim import AdamWLowPrecisionMoments, param_groups


def _run(opt_cls, steps=20, **kw):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 32))
    b = torch.nn.Parameter(torch.randn(32))
    opt = opt_cls([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
                  lr=1e-2, betas=(0.9, 0.95), eps=1e-8, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        w.grad = torch.randn(w.shape, generator=g)
        b.grad = torch.randn(b.shape, generator=g)
        opt.step()
    return w.detach().clone(), b.detach().clone(), opt


def test_fp32_moments_match_torch_adamw():
    ref_w, ref_b, _ = _run(torch.optim.AdamW, foreach=False)
    w, b, _ = _run(AdamWLowPrecisionMoments, moment_dtype=torch.float32)
    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b, ref_b, rtol=1e-5, atol=1e-6)


def test_bf16_moments_close_to_torch_adamw_and_stored_in_bf16():
    torch.manual_seed(0)
    w0 = torch.randn(64, 32)
    ref_w, _, _ = _run(torch.optim.AdamW, foreach=False)
    w, _, opt = _run(AdamWLowPrecisionMoments, moment_dtype=torch.bfloat16)
    state = next(iter(opt.state.values()))
    assert state["exp_avg"].dtype == torch.bfloat16 and state["exp_avg_sq"].dtype == torch.bfloat16
    # 20 steps of lr 1e-2 move each weight by ~0.2; bf16 moments (8-bit mantissa) change that by well under 2%.
    moved = (ref_w - w0).abs().mean()
    assert (w - ref_w).abs().mean() < 0.02 * moved
    assert not torch.equal(w, ref_w)  # the moments really were rounded


def test_param_groups_exclude_norms_and_embedding():
    model = DeepseekV3(preset("tiny").replace(num_hidden_layers=2))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, TrainConfig())
    dn = {names[id(p)] for p in decay["params"]}
    nn_ = {names[id(p)] for p in no_decay["params"]}
    assert "embed_tokens.weight" in nn_ and "norm.weight" in nn_ and "layers.0.input_layernorm.weight" in nn_
    assert "lm_head.weight" in dn and "layers.1.mlp.gate.weight" in dn and "layers.0.self_attn.q_a_proj.weight" in dn
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert len(dn) + len(nn_) == len(list(model.parameters()))
    decay2, _ = param_groups(model, TrainConfig(decay_embeddings=True, decay_norms=True))
    assert len(decay2["params"]) == len(list(model.parameters()))
