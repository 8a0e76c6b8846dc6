"""train.weight_cast on the GPU: per_step (autocast's weight casts hoisted to once per optimizer step,
dsv3.train.compute_weights) computes what per_use (bf16 autocast over the fp32 parameters) computes, bit for bit,
eager and with compiled blocks, on CUDA's kernels (grouped GEMMs, the Triton permutes, cuDNN attention). The CPU
twin is tests/test_train_weight_cast.py."""
import contextlib

import pytest
import torch

from dsv3.config import preset
from dsv3.model import DeepseekV3

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_gpu_per_step_matches_per_use_bit_for_bit(compiled):
    from dsv3.train.compute_weights import ComputeWeights

    torch.manual_seed(0)
    cfg = preset("tiny").replace(num_hidden_layers=3, vocab_size=256)
    per_use = DeepseekV3(cfg).cuda()
    per_step = DeepseekV3(cfg).cuda()
    per_step.load_state_dict(per_use.state_dict())
    if compiled:
        for m in (per_use, per_step):
            for layer in list(m.layers) + list(m.mtp):
                layer.compile()
    cw = ComputeWeights(per_step)
    cw.refresh()
    batches = [torch.randint(0, 256, (2, 64), device="cuda") for _ in range(2)]
    losses = {}
    for name, m in (("per_use", per_use), ("per_step", per_step)):
        out = []
        with cw.swapped_in() if m is per_step else contextlib.nullcontext():
            for ids in batches:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = m(ids, ids, return_logits=False).loss
                loss.backward()
                out.append(loss.detach())
        losses[name] = torch.stack(out)
    assert torch.equal(losses["per_step"], losses["per_use"]), losses
    bad = [n for (n, p), q in zip(per_use.named_parameters(), per_step.parameters())
           if (p.grad is None) != (q.grad is None) or (p.grad is not None and not torch.equal(p.grad, q.grad))]
    assert not bad, bad
