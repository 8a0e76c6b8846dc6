"""Checkpoint parity with Hugging Face transformers (the reference implementation), both directions."""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch

from dsv3.config import ModelConfig, RopeScaling
from dsv3.errors import UserError
from dsv3.hf import load_pretrained, save_pretrained
from dsv3.model import DeepseekV3

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=3, num_key_value_heads=3, n_shared_experts=1, n_routed_experts=8,
            kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=10,
            n_group=4, topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1, max_position_embeddings=256,
            rope_scaling=None, num_nextn_predict_layers=1, initializer_range=0.1)

CONFIGS = {
    "sigmoid-groups-bias": dict(),
    "no-q-lora": dict(q_lora_rank=None, n_group=2, topk_group=1, routed_scaling_factor=1.7),
    "yarn": dict(rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=32, beta_fast=32.0,
                                          beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0), n_group=1, topk_group=1),
    "softmax-v2": dict(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
                       norm_topk_prob=False, routed_scaling_factor=1.0, n_shared_experts=2, q_lora_rank=None,
                       num_nextn_predict_layers=0,
                       rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=32, mscale=0.707,
                                                mscale_all_dim=0.707)),
}


def make_config(name: str) -> ModelConfig:
    return ModelConfig(**{**BASE, **CONFIGS[name]}).validate()


def ours_random(cfg: ModelConfig, seed: int = 0) -> DeepseekV3:
    torch.manual_seed(seed)
    model = DeepseekV3(cfg).eval()
    with torch.no_grad():  # norms and biases away from their trivial init so a mix-up would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
        for moe in model.moe_layers():
            if moe.gate.e_score_correction_bias is not None:
                # positive biases of different sizes: they change the choice without any score going below 0,
                # so the result does not depend on how a reference masks dropped groups (0 or -inf)
                moe.gate.e_score_correction_bias.uniform_(0.0, 0.3)
    return model


def hf_class(cfg: ModelConfig):
    if cfg.scoring_func == "softmax":
        return transformers.DeepseekV2ForCausalLM
    return transformers.DeepseekV3ForCausalLM


def hf_load(path: Path, cfg: ModelConfig):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hf_class(cfg).from_pretrained(str(path), attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def v2_hf_config(cfg: ModelConfig) -> dict:
    """transformers' DeepseekV2 needs its own model_type and spelling of the same fields."""
    d = cfg.to_hf_dict()
    d.update(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], topk_method=cfg.topk_method)
    return d


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_exported_weights_load_in_transformers_with_same_logits(tmp_path, name):
    cfg = make_config(name)
    ours = ours_random(cfg)
    save_pretrained(ours, tmp_path / "ckpt")
    if cfg.scoring_func == "softmax":
        (tmp_path / "ckpt" / "config.json").write_text(json.dumps(v2_hf_config(cfg)))
    theirs = hf_load(tmp_path / "ckpt", cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = ours(ids).logits
        b = theirs(input_ids=ids).logits
    err = rel_err(a, b)
    assert err <= 1e-4, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("name", ["sigmoid-groups-bias", "no-q-lora", "yarn", "softmax-v2"])
def test_transformers_saved_weights_load_in_ours_with_same_logits(tmp_path, name):
    cfg = make_config(name)
    if cfg.scoring_func == "softmax":
        hf_cfg = transformers.DeepseekV2Config(**{k: v for k, v in v2_hf_config(cfg).items()
                                                  if k not in ("architectures", "model_type", "rope_scaling")})
    else:
        hf_cfg = transformers.DeepseekV3Config(**{k: v for k, v in cfg.to_hf_dict().items()
                                                  if k not in ("architectures", "model_type", "rope_scaling")})
    torch.manual_seed(3)
    theirs = hf_class(cfg)(hf_cfg).eval()
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.1)
            elif n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
        for n, b in theirs.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.uniform_(0.0, 0.3)
    theirs.save_pretrained(str(tmp_path / "hf"))
    ours = load_pretrained(tmp_path / "hf", config=cfg if cfg.scoring_func == "softmax" else None).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        err = rel_err(ours(ids).logits, theirs(input_ids=ids).logits)
    assert err <= 1e-4, f"{name}: relative error {err:.2e}"


def test_transformers_config_spelling_roundtrip(tmp_path):
    """transformers 5 writes rope_parameters (not rope_scaling) and no MTP weights: both load."""
    cfg = make_config("yarn")
    hf_cfg = transformers.DeepseekV3Config(**{k: v for k, v in cfg.to_hf_dict().items()
                                              if k not in ("architectures", "model_type", "rope_scaling")})
    theirs = transformers.DeepseekV3ForCausalLM(hf_cfg)
    theirs.save_pretrained(str(tmp_path / "hf"))
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "rope_scaling" not in written or written["rope_scaling"] is None or "rope_parameters" in written
    back = ModelConfig.from_json(tmp_path / "hf" / "config.json")
    assert back.rope_scaling is not None and back.rope_scaling.factor == 8.0
    assert back.softmax_scale == pytest.approx(cfg.softmax_scale, rel=1e-12)
    model = load_pretrained(tmp_path / "hf")
    assert len(model.mtp) == cfg.num_nextn_predict_layers


def test_deepseek_release_config_spelling():
    """DeepSeek's config.json spells YaRN as rope_scaling with mscale fields and may carry extra keys."""
    d = {"model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
         "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
         "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5,
         "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
         "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
         "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
         "scoring_func": "sigmoid", "aux_loss_alpha": 0.001, "seq_aux": True, "num_nextn_predict_layers": 1,
         "rope_theta": 10000, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                               "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                               "type": "yarn"},
         "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                 "weight_block_size": [128, 128]}}
    cfg = ModelConfig.from_dict(d, strict=False)
    assert cfg.softmax_scale == pytest.approx(0.135234, abs=1e-6)
    assert cfg == ModelConfig().validate() or cfg.to_dict() == {**ModelConfig().to_dict(), "initializer_range": cfg.initializer_range}


def _dir_digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_save_load_save_is_byte_identical(tmp_path, dtype):
    cfg = make_config("sigmoid-groups-bias")
    model = ours_random(cfg)
    save_pretrained(model, tmp_path / "a", max_shard_bytes=40_000, dtype=dtype)
    assert len(list((tmp_path / "a").glob("*.safetensors"))) > 1  # really sharded
    back = load_pretrained(tmp_path / "a")
    if dtype is None:
        for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
            assert torch.equal(a, b), k
    save_pretrained(back, tmp_path / "b", max_shard_bytes=40_000, dtype=dtype)
    assert _dir_digest(tmp_path / "a") == _dir_digest(tmp_path / "b")


def test_fp8_export_load_export_keeps_codes_and_scales(tmp_path):
    """Re-quantizing dequantized FP8 weights gives the same e4m3 codes; a free scale may move by one fp32 ulp
    (amax * fp32(1/448) is not exactly invertible), so scales are compared to 2 ulp, codes exactly."""
    from safetensors.torch import load_file

    def tensors(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    model = ours_random(make_config("sigmoid-groups-bias"))
    save_pretrained(model, tmp_path / "a", fp8=True)
    save_pretrained(load_pretrained(tmp_path / "a"), tmp_path / "b", fp8=True)
    a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert a.keys() == b.keys()
    n_fp8 = 0
    for k in a:
        if a[k].dtype == torch.float8_e4m3fn:
            n_fp8 += 1
            assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k
        elif k.endswith("weight_scale_inv"):
            assert torch.allclose(a[k], b[k], rtol=2.5e-7, atol=0), k
        else:
            assert torch.equal(a[k], b[k]), k
    assert n_fp8 > 10


def test_fp8_checkpoint_dequantizes_by_the_block_formula(tmp_path):
    """Ragged 128x128 blocks: W = W_fp8 * S[i // 128, j // 128]."""
    from safetensors.torch import load_file

    cfg = ModelConfig(**{**BASE, "hidden_size": 136, "intermediate_size": 200, "vocab_size": 50}).validate()
    model = ours_random(cfg)
    save_pretrained(model, tmp_path / "fp8", fp8=True)
    raw = {}
    for f in sorted((tmp_path / "fp8").glob("*.safetensors")):
        raw.update(load_file(str(f)))
    w8 = raw["model.layers.0.mlp.gate_proj.weight"]
    s = raw["model.layers.0.mlp.gate_proj.weight_scale_inv"]
    assert w8.dtype == torch.float8_e4m3fn and w8.shape == (200, 136) and s.shape == (2, 2)
    direct = torch.empty(200, 136)
    for i in range(200):
        for j in range(136):
            direct[i, j] = w8[i, j].float() * s[i // 128, j // 128]
    back = load_pretrained(tmp_path / "fp8")
    assert torch.equal(back.layers[0].mlp.gate_proj.weight, direct)
    # high-precision tensors stay as they were
    assert raw["model.embed_tokens.weight"].dtype == torch.float32
    assert raw["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    cfg_json = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert cfg_json["quantization_config"]["weight_block_size"] == [128, 128]
    # quantization error stays within E4M3's relative precision of each block's max
    ref = model.layers[0].mlp.gate_proj.weight
    assert rel_err(direct, ref) < 0.05


def test_mtp_layer_layout_matches_release(tmp_path):
    cfg = make_config("sigmoid-groups-bias")
    model = ours_random(cfg)
    save_pretrained(model, tmp_path / "c")
    index = json.loads((tmp_path / "c" / "model.safetensors.index.json").read_text())["weight_map"]
    L = cfg.num_hidden_layers
    for key in ["enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                "shared_head.head.weight", "embed_tokens.weight", "mlp.experts.0.gate_proj.weight",
                "mlp.gate.e_score_correction_bias", "self_attn.kv_b_proj.weight"]:
        assert f"model.layers.{L}.{key}" in index, key
    assert f"model.layers.{L + 1}.enorm.weight" not in index


def test_bad_checkpoint_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    cfg = make_config("no-q-lora")
    save_pretrained(ours_random(cfg), tmp_path / "d")
    shard = next((tmp_path / "d").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: 1000])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_pretrained(tmp_path / "d")
