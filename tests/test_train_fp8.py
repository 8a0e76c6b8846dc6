"""precision = "fp8": the V3 recipe's FP8 GEMMs train the tiny model on CPU (exact emulation of the GPU math)
and stay close to the fp32 run of the same data and seed."""
import pytest
import torch

from dsv3.config import preset
from dsv3.fp8.linear import FP8Linear
from dsv3.fp8.recipe import FP8Recipe, convert_to_fp8
from dsv3.model import DeepseekV3


def test_fp8_model_matches_fp32_model_closely_and_uses_fp8_gemms():
    torch.manual_seed(0)
    cfg = preset("tiny").replace(vocab_size=512)
    ref = DeepseekV3(cfg)
    fp8 = DeepseekV3(cfg)
    fp8.load_state_dict(ref.state_dict())
    report = convert_to_fp8(fp8, FP8Recipe())
    n_fp8 = sum(isinstance(m, FP8Linear) for m in fp8.modules())
    assert n_fp8 > 10 and all(moe.experts.fp8_recipe is not None for moe in fp8.moe_layers())
    assert not isinstance(fp8.lm_head, FP8Linear) and not isinstance(fp8.moe_layers()[0].gate, FP8Linear)
    ids = torch.randint(0, 512, (2, 64))
    a, b = ref(ids, ids), fp8(ids, ids)
    rel = abs(a.loss.item() - b.loss.item()) / a.loss.item()
    assert rel < 5e-3, rel
    a.loss.backward()
    b.loss.backward()
    errs, cos = {}, {}
    for (n, p), q in zip(ref.named_parameters(), fp8.parameters()):
        if p.grad is not None and p.grad.norm() > 0:
            errs[n] = ((p.grad - q.grad).norm() / p.grad.norm()).item()
            cos[n] = torch.nn.functional.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0).item()
    # E4M3 operands on every forward and backward GEMM cost ~3.7% per GEMM (tests/test_fp8_linear.py); in a MoE
    # model that noise also flips some routing decisions (a token's k-th expert), so per-tensor gradient errors
    # of 10-40% are expected (measured: median 0.15, max 0.41 on this seed) while directions agree.
    med = sorted(errs.values())[len(errs) // 2]
    assert med < 0.25, med
    assert min(cos.values()) > 0.85, min(cos.items(), key=lambda kv: kv[1])
    assert report is not None


def test_trainer_accepts_fp8_precision(tmp_path):
    from dsv3.cli import main
    from dsv3.data.synthetic import make_docs, write_text_tree

    write_text_tree(tmp_path / "docs", make_docs(30))
    assert main(["prepare", str(tmp_path / "docs"), "--out", str(tmp_path / "data"), "--vocab-size", "300",
                 "--no-progress"]) == 0
    common = ["--data", str(tmp_path / "data"), "--set", "train.steps=3", "--set", "train.seq_len=64",
              "--set", "train.batch_size=4", "--set", "model.vocab_size=300", "--set", "train.sample_tokens=0",
              "--set", "train.eval_batches=1", "--quiet"]
    assert main(["train", "--out", str(tmp_path / "fp8"), "--set", 'train.precision="fp8"', *common]) == 0
    assert main(["train", "--out", str(tmp_path / "fp32"), "--set", 'train.precision="fp32"', *common]) == 0
    import json
    a = [json.loads(x)["loss"] for x in (tmp_path / "fp32" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x)["loss"] for x in (tmp_path / "fp8" / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert abs(x - y) / x < 1e-2, (a, b)
