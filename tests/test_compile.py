"""Compiled blocks (train.compile) with activation recomputation: the same loss and gradients as eager, and
expert selections counted once. (A checkpoint with a context_fn inside a compiled block broke the first GPU
run; this keeps that class of failure in CI, on the CPU's inductor.)"""
import torch

from dsv3.config import preset
from dsv3.model import DeepseekV3


def test_compiled_blocks_with_selective_recompute_match_eager():
    torch.manual_seed(0)
    cfg = preset("tiny").replace(num_hidden_layers=2, vocab_size=256)
    eager = DeepseekV3(cfg)
    compiled = DeepseekV3(cfg)
    compiled.load_state_dict(eager.state_dict())
    for layer in list(compiled.layers) + list(compiled.mtp):
        layer.compile()
    for m in (eager, compiled):
        m.set_recompute("selective")
    ids = torch.randint(0, 256, (2, 32))
    a = eager(ids, ids, return_logits=False)
    b = compiled(ids, ids, return_logits=False)
    a.loss.backward()
    b.loss.backward()
    assert torch.allclose(a.loss, b.loss, rtol=1e-5)
    for (n, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), n
    for x, y in zip(eager.moe_layers(), compiled.moe_layers()):
        assert torch.equal(x.tokens_per_expert, y.tokens_per_expert)
        assert int(y.tokens_per_expert.sum()) == 2 * 32 * cfg.num_experts_per_tok
