"""``train.optimizer_overlap``: the AdamW update issued group by group in forward order on a side stream
(``dsv3.train.optim_overlap``). CPU: ``step_params`` in forward order is ``step`` bit for bit, the groups cover
every parameter once, the wrapper is the plain step on the CPU, and the config check. GPU (skipped without
CUDA): three training steps with the overlapped update give the plain steps' parameters, eager and compiled."""
from __future__ import annotations

import copy

import pytest
import torch

from dsv3.model import DeepseekV3
from dsv3.parallel.data_parallel import _forward_groups
from dsv3.train.optim import AdamWLowPrecisionMoments
from dsv3.train.optim_overlap import OverlappedOptimizerStep


def _small():
    from parallel_helpers import small_config
    torch.manual_seed(0)
    return DeepseekV3(small_config())


def _fill_grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(p.device, p.dtype)


def test_step_params_in_forward_order_is_step():
    a = _small()
    b = copy.deepcopy(a)
    oa = AdamWLowPrecisionMoments(a.parameters(), lr=1e-2, weight_decay=0.1, fused=False)
    ob = AdamWLowPrecisionMoments(b.parameters(), lr=1e-2, weight_decay=0.1, fused=False)
    for seed in (1, 2):
        _fill_grads(a, seed)
        _fill_grads(b, seed)
        oa.step()
        for params in _forward_groups(b):
            ob.step_params(params)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n
        assert torch.equal(oa.state[pa]["exp_avg_sq"], ob.state[pb]["exp_avg_sq"]), n


def test_groups_cover_every_parameter_once_and_cpu_step_is_plain():
    m = _small()
    ids = [id(p) for group in _forward_groups(m) for p in group]
    assert sorted(ids) == sorted(id(p) for p in m.parameters())
    ref = copy.deepcopy(m)
    wrapped = OverlappedOptimizerStep(AdamWLowPrecisionMoments(m.parameters(), lr=1e-2, fused=False), m,
                                      torch.device("cpu"))
    plain = AdamWLowPrecisionMoments(ref.parameters(), lr=1e-2, fused=False)
    _fill_grads(m, 3)
    _fill_grads(ref, 3)
    wrapped.step()
    plain.step()
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), ref.parameters()))
    with pytest.raises(TypeError, match="step_params"):
        OverlappedOptimizerStep(torch.optim.SGD(m.parameters(), lr=0.1), m, torch.device("cpu"))


def test_optimizer_overlap_needs_bf16_moments(train_data, tmp_path):
    from dsv3.errors import UserError
    from dsv3.train.config import apply_overrides, resolve
    from dsv3.train.trainer import Trainer
    cfg = resolve(apply_overrides({}, ["model.vocab_size=512", "model.num_hidden_layers=2", "train.seq_len=32",
                                       "train.batch_size=2", "train.tensorboard=false", "train.peak_tflops=1.0",
                                       "train.optimizer_overlap=true"]))
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match="train.optimizer_overlap needs one process and train.bf16_moments"):
        Trainer(cfg, tmp_path / "run", train_data, quiet=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a side stream)")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_gpu_overlapped_update_matches_plain_steps(compiled):
    base = _small().cuda()
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(4)).cuda()

    def train(overlap):
        m = copy.deepcopy(base)
        if compiled:
            for layer in m.layers:
                layer.compile()
        opt = AdamWLowPrecisionMoments(m.parameters(), lr=1e-3, weight_decay=0.1)
        runner = OverlappedOptimizerStep(opt, m, torch.device("cuda")) if overlap else opt
        losses = []
        for _ in range(3):
            out = m(ids[:, :-1], ids[:, 1:], return_logits=False)
            out.loss.backward()
            runner.step()
            opt.zero_grad(set_to_none=True)
            losses.append(out.loss.detach())
        if overlap:
            runner.wait_all()
        torch.cuda.synchronize()
        return torch.stack(losses), [p.detach().clone() for p in m.parameters()]

    ref_losses, ref = train(False)
    losses, got = train(True)
    assert torch.equal(losses, ref_losses)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
