"""The aux-loss-free bias update: by hand from counts, once per step over all micro-batches, not in eval."""
from __future__ import annotations

import copy

import pytest
import torch

from dsv3.config import preset
from dsv3.model import DeepseekV3
from dsv3.train.balance import update_balance_biases
from dsv3.train.config import apply_overrides, resolve

SETS = ["model.vocab_size=512", "model.num_hidden_layers=2", "train.seq_len=32", "train.batch_size=4",
        "train.micro_batch_size=2", "train.tensorboard=false", "train.peak_tflops=1.0", "train.warmup_steps=1",
        "data.prefetch=0", "train.bias_gamma=0.01"]


def _cfg(extra=()):
    return resolve(apply_overrides({}, SETS + list(extra)))


def test_update_from_given_counts_by_hand():
    torch.manual_seed(0)
    model = DeepseekV3(preset("tiny").replace(num_hidden_layers=2))
    layers = model.moe_layers()
    E = layers[0].tokens_per_expert.numel()
    counts = [torch.randint(0, 50, (E,)) for _ in layers]
    before = [m.gate.e_score_correction_bias.clone() for m in layers]
    for m, c in zip(layers, counts):
        m.tokens_per_expert.copy_(c)
    seen = []

    def all_reduce(t):  # a fake 2-rank all-reduce: the other rank saw the same counts
        seen.append(t.clone())
        t.mul_(2)

    vios = update_balance_biases(model, 0.001, all_reduce=all_reduce)
    for m, c, b0, v, s in zip(layers, counts, before, vios, seen):
        n = [2 * int(x) for x in c]
        mean = sum(n) / E
        expect = torch.tensor([b0[e].item() + 0.001 * ((mean > n[e]) - (mean < n[e])) for e in range(E)])
        torch.testing.assert_close(m.gate.e_score_correction_bias, expect.float(), rtol=0, atol=1e-9)
        assert v == pytest.approx((max(n) - mean) / mean)
        assert torch.equal(s, c)
        assert int(m.tokens_per_expert.sum()) == 0  # counts zeroed for the next step


def test_gamma_zero_keeps_bias_but_reports_and_zeroes():
    model = DeepseekV3(preset("tiny").replace(num_hidden_layers=2))
    m = model.moe_layers()[0]
    m.tokens_per_expert.copy_(torch.arange(m.tokens_per_expert.numel()))
    b0 = m.gate.e_score_correction_bias.clone()
    vios = update_balance_biases(model, 0.0)
    assert torch.equal(m.gate.e_score_correction_bias, b0) and vios[0] > 0
    assert int(m.tokens_per_expert.sum()) == 0


def test_trainer_step_uses_counts_of_all_micro_batches_once(train_data, tmp_path):
    from dsv3.train.trainer import Trainer

    cfg = _cfg()
    tr = Trainer(cfg, tmp_path, train_data, quiet=True)
    try:
        ref = copy.deepcopy(tr.model)           # same weights and biases as the trainer's model before step 1
        batch = tr.loader.build(0, 4)           # the batch step 1 will take
        counts = None
        with torch.no_grad():
            for i in (0, 2):                    # the two micro-batches of 2 sequences, independently
                out = ref(batch["input_ids"][i:i + 2], batch["labels"][i:i + 2], return_logits=False)
                c = out.expert_counts
                counts = c if counts is None else [a + b for a, b in zip(counts, c)]
        b0 = [m.gate.e_score_correction_bias.clone() for m in tr.model.moe_layers()]
        tr.metrics_log = tr.eval_log = tr.expert_log = None
        record = tr.train_step()
        assert record["skipped"] is False
        for m, c, b in zip(tr.model.moe_layers(), counts, b0):
            n = c.float()
            assert int(n.sum()) == 4 * 32 * cfg.model.num_experts_per_tok  # every token of both micro-batches
            expect = b + 0.01 * torch.sign(n.mean() - n)
            torch.testing.assert_close(m.gate.e_score_correction_bias, expect, rtol=0, atol=1e-9)
            assert int(m.tokens_per_expert.sum()) == 0
        # MaxVio reported from the same counts
        vio = [float((c.max() - c.float().mean()) / c.float().mean()) for c in counts]
        assert record["maxvio_layers"] == pytest.approx(vio)
        # evaluation forwards count nothing and move no bias
        after = [m.gate.e_score_correction_bias.clone() for m in tr.model.moe_layers()]
        tr.evaluate()
        for m, b in zip(tr.model.moe_layers(), after):
            assert int(m.tokens_per_expert.sum()) == 0
            assert torch.equal(m.gate.e_score_correction_bias, b)
    finally:
        tr.close()


def test_recompute_does_not_double_count():
    torch.manual_seed(0)
    cfgm = preset("tiny").replace(num_hidden_layers=2, vocab_size=512)
    ids = torch.randint(0, 512, (2, 16))
    sums = []
    for mode in ("none", "full"):
        torch.manual_seed(1)
        model = DeepseekV3(cfgm)
        model.set_recompute(mode)
        model(ids, ids, return_logits=False).loss.backward()
        sums.append([m.tokens_per_expert.clone() for m in model.moe_layers()])
    for a, b in zip(*sums):
        assert torch.equal(a, b) and int(a.sum()) == 2 * 16 * cfgm.num_experts_per_tok
