"""convert_to_fp8 on a module tree with Hugging Face DeepseekV3 names."""

import torch
import torch.nn as nn

from dsv3.fp8.linear import FP8Linear
from dsv3.fp8.recipe import FP8Recipe, convert_to_fp8


class Attn(nn.Module):
    def __init__(self, d, q_lora):
        super().__init__()
        if q_lora:
            self.q_a_proj = nn.Linear(d, 64, bias=False)
            self.q_b_proj = nn.Linear(64, 4 * 48, bias=False)
        else:
            self.q_proj = nn.Linear(d, 4 * 48, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, 32 + 16, bias=False)
        self.kv_a_layernorm = nn.LayerNorm(32)
        self.kv_b_proj = nn.Linear(32, 4 * 64, bias=False)
        self.o_proj = nn.Linear(4 * 32, d, bias=False)


class MLP(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)


class Experts(nn.Module):
    def __init__(self, e, d, f):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.randn(e, f, d))
        self.up_proj = nn.Parameter(torch.randn(e, f, d))
        self.down_proj = nn.Parameter(torch.randn(e, d, f))


class MoE(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gate = nn.Linear(d, 8, bias=False)  # router: 8 experts, would even be 16-aligned if 16
        self.experts = Experts(8, d, 32)
        self.shared_experts = MLP(d, 48)


class Layer(nn.Module):
    def __init__(self, d, moe, q_lora):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(d)
        self.self_attn = Attn(d, q_lora)
        self.mlp = MoE(d) if moe else MLP(d, 80)


class Model(nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.embed_tokens = nn.Embedding(100, d)
        self.layers = nn.ModuleList([Layer(d, False, True), Layer(d, True, False)])
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, 128, bias=False)  # 16-aligned, still skipped
        self.odd = nn.Linear(d, 24, bias=False)  # not attention/MLP


def test_convert_swaps_exactly_the_eligible_linears():
    torch.manual_seed(0)
    m = Model()
    m.layers[1].mlp.gate = nn.Linear(64, 16, bias=False)  # 16-aligned router must still be skipped
    before = {k: v.clone() for k, v in m.state_dict().items()}
    params_before = {n: p for n, p in m.named_parameters()}
    opt = torch.optim.AdamW(m.parameters())
    report = convert_to_fp8(m, FP8Recipe())
    expected = {
        "layers.0.self_attn.q_a_proj", "layers.0.self_attn.q_b_proj", "layers.0.self_attn.kv_a_proj_with_mqa",
        "layers.0.self_attn.kv_b_proj", "layers.0.self_attn.o_proj",
        "layers.0.mlp.gate_proj", "layers.0.mlp.up_proj", "layers.0.mlp.down_proj",
        "layers.1.self_attn.q_proj", "layers.1.self_attn.kv_a_proj_with_mqa", "layers.1.self_attn.kv_b_proj",
        "layers.1.self_attn.o_proj",
        "layers.1.mlp.shared_experts.gate_proj", "layers.1.mlp.shared_experts.up_proj",
        "layers.1.mlp.shared_experts.down_proj",
    }
    assert set(report["converted"]) == expected
    for name, mod in m.named_modules():
        assert isinstance(mod, FP8Linear) == (name in expected), name
    skipped = dict(report["skipped"])
    assert "router" in skipped["layers.1.mlp.gate"]
    assert "lm_head" in skipped and "odd" in skipped
    assert report["experts"] == ["layers.1.mlp.experts"]
    assert m.layers[1].mlp.experts.fp8_recipe is not None
    # names, values and Parameter identities unchanged -> checkpoints and optimizer untouched
    after = m.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(p is params_before[n] for n, p in m.named_parameters())
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in m.parameters()}


def test_convert_skips_unaligned_and_disabled():
    m = MLP(64, 40)  # 40 % 16 != 0
    rep = convert_to_fp8(m)
    assert rep["converted"] == [] and all("multiples of 16" in r for _, r in rep["skipped"])
    m = Model()
    rep = convert_to_fp8(m, FP8Recipe(attention=False, experts=False))
    assert not any("self_attn" in n for n in rep["converted"])
    assert m.layers[1].mlp.experts.fp8_recipe is None


def test_converted_model_runs_forward_backward():
    torch.manual_seed(1)
    mlp = MLP(128, 256)
    ref = MLP(128, 256)
    ref.load_state_dict(mlp.state_dict())
    convert_to_fp8(mlp)
    x = torch.randn(8, 128)

    def run(mod):
        return mod.down_proj(torch.nn.functional.silu(mod.gate_proj(x)) * mod.up_proj(x))

    y, y_ref = run(mlp), run(ref)
    assert ((y - y_ref).norm() / y_ref.norm()) < 0.06
    y.sum().backward()
    assert all(p.grad is not None for p in mlp.parameters())
    # idempotent
    assert convert_to_fp8(mlp)["converted"] == []


def test_fp8_probe_benchmark_runs_on_cpu(tmp_path):
    """benchmarks/fp8_probe.py (the GPU diagnosis of the FP8 accuracy gap) in its CPU smoke mode: the reference
    and 'auto' kernels are the same code on the CPU, so their losses must agree exactly."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fp8_probe.py"
    spec = importlib.util.spec_from_file_location("fp8_probe", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "p.json"
    assert mod.main(["--device", "cpu", "--preset", "tiny", "--seq", "32", "--batch", "2", "--steps", "2",
                     "--variants", "bf16,fp8,fp8-ref", "--out", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert runs["fp8"]["losses"] == runs["fp8-ref"]["losses"]
    assert runs["bf16"]["drop"] > 0 and abs(runs["fp8"]["first"] - runs["bf16"]["first"]) < 1e-2
    assert mod.main(["--device", "cpu", "--variants", "fp16", "--out", str(out)]) == 2
