"""``parallel.fb_overlap``: micro-batch i+1's forward beside micro-batch i's backward (``dsv3.train.overlap``).

CPU: the loop's order and its output walk, the layout check, and the backward's transfers going over the
transport's backward communicator. GPU (skipped without CUDA): the two-stream loop gives the plain loop's
gradients and losses on a small MoE model. The two-process EP=2 run with it on is in test_parallel_cli.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from dsv3.errors import UserError
from dsv3.parallel.mesh import ParallelConfig, validate_layout
from dsv3.parallel.transport import LocalTransport, all_to_all, backward_transport
from dsv3.train import overlap


def test_plain_loop_order():
    calls = []
    overlap.accumulate([10, 20, 30], lambda i, mb: calls.append(("F", i, mb)) or mb * 2,
                       lambda i, mb, out: calls.append(("B", i, out)))
    assert calls == [("F", 0, 10), ("B", 0, 20), ("F", 1, 20), ("B", 1, 40), ("F", 2, 30), ("B", 2, 60)]


def test_output_tensors_are_found_in_nested_outputs():
    @dataclass
    class Out:
        loss: torch.Tensor
        losses: dict = field(default_factory=dict)
        counts: list = field(default_factory=list)
        note: str = "x"

    a, b, c, d = (torch.full((1,), float(i)) for i in range(4))
    found = list(overlap._tensors(Out(a, {"main": b}, [c, (d, None)])))
    assert [t.item() for t in found] == [0.0, 1.0, 2.0, 3.0]


def test_fb_overlap_layout_check():
    with pytest.raises(UserError, match="parallel.fb_overlap is for pp = 1"):
        validate_layout(2, ParallelConfig(pp=2, fb_overlap=True))
    with pytest.raises(UserError, match="wrong type"):
        ParallelConfig.from_dict({"fb_overlap": 1})
    assert validate_layout(2, ParallelConfig(ep=2, fb_overlap=True)) == (1, 2, 2)


class _Counting(LocalTransport):
    def __init__(self):
        self.calls = 0

    def all_to_all(self, x, in_splits, out_splits):
        self.calls += 1
        return x


def test_gradients_travel_over_the_backward_transport():
    fwd, bwd = _Counting(), _Counting()
    fwd.for_backward = bwd
    assert backward_transport(fwd) is bwd and backward_transport(bwd) is bwd
    x = torch.randn(4, 3, requires_grad=True)
    all_to_all(x, fwd, [4], [4]).sum().backward()
    assert (fwd.calls, bwd.calls) == (1, 1)
    assert torch.equal(x.grad, torch.ones(4, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (two streams)")
def test_gpu_two_streams_match_the_plain_loop():
    """Same gradients (and losses) as the plain loop, on a small MoE model with MTP, three micro-batches."""
    from dsv3.model import DeepseekV3
    from parallel_helpers import small_config

    torch.manual_seed(0)
    model = DeepseekV3(small_config()).cuda()
    g = torch.Generator().manual_seed(1)
    mbs = [torch.randint(0, 256, (2, 33), generator=g).cuda() for _ in range(3)]

    def run(streams):
        model.zero_grad(set_to_none=True)
        losses = []

        def fwd(i, ids):
            return model(ids[:, :-1], ids[:, 1:], mtp_lambda=0.3, return_logits=False)

        def bwd(i, ids, out):
            out.loss.backward()
            losses.append(out.loss.detach().clone())

        overlap.accumulate(mbs, fwd, bwd, streams)
        torch.cuda.synchronize()
        return torch.stack(losses), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref = run(None)
    loss, got = run((torch.cuda.Stream(), torch.cuda.Stream()))
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=0)
    assert got.keys() == ref.keys()
    for n in ref:
        err = (got[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-12)
        assert err <= 1e-5, (n, float(err))
