"""Golden values from the DeepSeek-V3 report (arXiv 2412.19437) and the Insights paper (arXiv 2505.09343)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv3.cli import main
from dsv3.config import preset
from dsv3.errors import UserError
from dsv3.plan import comm, flops, kvcache, network, pipeline, throughput
from dsv3.plan.memory import Layout, Recipe, max_micro_batch, memory_per_gpu, peak_bytes
from dsv3.plan.models import DenseConfig, load_model
from dsv3.plan.params import count_params

DATA = Path(__file__).parent / "data"
V2 = str(DATA / "deepseek-v2.json")
QWEN = str(DATA / "qwen2.5-72b.json")
LLAMA = str(DATA / "llama-3.1-405b.json")


def test_v3_parameters_all_conventions():
    pc = count_params(preset("v3"))
    assert pc.total_params() == 671_026_419_200
    assert pc.total_params(mtp=True) == 684_489_845_504
    assert pc.activated_params() == 37_552_297_472
    assert pc.activated_params(input_embedding=False) == 36_625_618_432


def test_v2_lite_and_v2_parameters():
    pc = count_params(preset("v2-lite"))
    assert pc.total_params() == 15_706_484_224 and pc.activated_params() == 2_661_150_208
    v2 = count_params(load_model(V2)[0])  # paper: 236B total, 21B activated; a V2 config has no MTP
    assert round(v2.total_params() / 1e9) == 236 and round(v2.activated_params() / 1e9) == 21
    assert v2.total["mtp"] == 0


def test_dense_parameters_match_published_sizes():
    assert round(count_params(load_model(QWEN)[0]).total_params() / 1e9, 1) == 72.7
    assert round(count_params(load_model(LLAMA)[0]).total_params() / 1e9, 1) == 405.9


def test_training_flops_per_token():
    v3 = preset("v3")
    causal = flops.training_flops_per_token(v3, 4096, True)
    assert round(causal.total / 1e9) == 250 and abs(causal.total / 1e9 - 250.45) < 0.005
    assert round(flops.training_flops_per_token(v3, 4096, True, "params").total / 1e9, 1) == 250.5
    assert round(flops.training_flops_per_token(v3, 4096, False).total / 1e9, 1) == 281.2
    assert round(flops.training_flops_per_token(load_model(V2)[0], 4096).total / 1e9, 1) == 155.3
    # Attention term by formula: 6 * 61 * 128 * (192 + 128) * 4096 / 2.
    assert causal.attention == 6 * 61 * 128 * 320 * 4096 / 2


def test_kv_cache_bytes_and_ratios():
    v3 = kvcache.kv_bytes_per_token(preset("v3"))
    qwen = kvcache.kv_bytes_per_token(load_model(QWEN)[0])
    llama = kvcache.kv_bytes_per_token(load_model(LLAMA)[0])
    assert (v3, qwen, llama) == (70_272, 327_680, 516_096)
    assert round(qwen / v3, 2) == 4.66 and round(llama / v3, 2) == 7.34
    assert kvcache.kv_bytes_per_token(preset("v3"), "fp8") == 35_136
    assert kvcache.kv_bytes_per_token(preset("v3"), form="naive") == 61 * 128 * (192 + 128) * 2


def test_table4_throughput_and_table1_cost():
    tp = throughput.from_tokens_per_day(272.80e9, 2048, 250e9, 989.0)
    assert round(tp.tokens_per_s_per_gpu, 1) == 1541.7
    assert round(tp.tflops_per_gpu) == 385
    assert abs(100 * tp.mfu - 38.94) < 0.05  # paper prints 38.94% (from the step time; see throughput.py)
    lines = throughput.budget(throughput.V3_TABLE1_GPU_HOURS, 2.0)
    assert sum(l.gpu_hours for l in lines) == 2_788_000 and sum(l.cost for l in lines) == 5_576_000
    back = throughput.from_mfu(tp.mfu, 2048, 250e9)
    assert back.tokens_per_day == pytest.approx(272.80e9)


def test_decode_speed_limit():
    lim = comm.decode_limit(7000, 61, 50.0, 32, 9)
    assert lim.ep_step_s * 1e6 == pytest.approx(120.96)
    assert round(lim.token_s * 1e3, 2) == 14.76 and int(lim.tokens_per_s) == 67
    assert round(comm.decode_limit(7000, 61, 900.0).token_s * 1e3, 2) == 0.82
    with pytest.raises(ValueError):
        comm.decode_limit(7000, 61, 0)


def test_node_limited_traffic():
    tr = comm.ep_traffic(preset("v3"), nodes=8)
    assert tr.nodes_reached == 4 and tr.scale_out_bytes == 4 * 7168 * 3 and tr.scale_up_bytes == 8 * 7168 * 3
    assert comm.ep_traffic(preset("v3"), nodes=8, node_limited=False).nodes_reached == 8


def test_network_table3():
    ft2, mpft, ft3, sf, df = network.all_topologies(64)
    got = [(t.endpoints, t.switches, t.links) for t in (ft2, mpft, ft3, sf)]
    assert got == [(2048, 96, 2048), (16384, 768, 16384), (65536, 5120, 131072), (32928, 1568, 32928)]
    paper_df = network.dragonfly(64, groups=511)
    assert (paper_df.endpoints, paper_df.switches, paper_df.links) == (261_632, 16_352, 384_272)
    assert (df.endpoints, df.switches) == (16 * 32 * 513, 32 * 513)  # canonical a*h+1 groups
    assert not sf.constructible  # q = 28 is not a prime power
    # Default prices are a fit to Table 3's cost column: within 5%.
    for t, paper in ((ft2, 9e6), (ft3, 491e6), (paper_df, 1522e6)):
        assert abs(t.cost() - paper) / paper < 0.05
    assert network.multi_plane_fat_tree(64, 2).endpoints == 4096


@pytest.mark.parametrize("pp", [4, 8, 16, 32])
def test_pipeline_table2(pp):
    F, B, W, FB = 1.0, 2.0, 0.8, 2.5
    one = pipeline.schedule_cost("1f1b", pp, F, B, W, FB)
    zb = pipeline.schedule_cost("zb1p", pp, F, B, W, FB)
    dp = pipeline.schedule_cost("dualpipe", pp, F, B, W, FB)
    assert one.bubble == (pp - 1) * (F + B) and zb.bubble == (pp - 1) * (F + B - 2 * W)
    assert dp.bubble == (pp / 2 - 1) * (FB + B - 3 * W)
    assert (one.param_multiple, zb.param_multiple, dp.param_multiple) == (1, 1, 2)
    assert (one.activation_multiple, zb.activation_multiple, dp.activation_multiple) == (pp, pp, pp + 1)
    assert dp.bubble < zb.bubble < one.bubble
    assert one.min_micro_batches == pp and dp.min_micro_batches % 2 == 0


def test_pipeline_rejects_odd_dualpipe():
    with pytest.raises(ValueError, match="even"):
        pipeline.schedule_cost("dualpipe", 5)


def test_memory_terms_follow_the_layout():
    cfg = preset("small")
    base = Layout(gpus=8, pp=2, ep=4, micro_batch=1, seq_len=1024, schedule="1f1b")
    s0 = memory_per_gpu(cfg, base)[0]
    # ZeRO-1 divides optimizer state: with sharding off it grows; weights and grads do not change.
    s0_full = memory_per_gpu(cfg, Layout(**{**base.__dict__, "zero1": False}))[0]
    assert s0_full.parts["optimizer (master + moments)"] > s0.parts["optimizer (master + moments)"]
    assert s0_full.parts["weights"] == s0.parts["weights"]
    # Activations scale with the micro-batch; full recompute keeps less than selective than none.
    s0_mb2 = memory_per_gpu(cfg, Layout(**{**base.__dict__, "micro_batch": 2}))[0]
    assert s0_mb2.parts["activations"] == pytest.approx(2 * s0.parts["activations"])
    acts = [memory_per_gpu(cfg, Layout(**{**base.__dict__, "recompute": r}))[0].parts["activations"]
            for r in ("none", "selective", "full")]
    assert acts[0] > acts[1] > acts[2]
    # Weights of stage 0 by hand: embedding + 8 layers (1 dense) with 64/4 experts each, BF16.
    w = count_params(cfg)
    from dsv3.plan.params import expert_params, mla_attention_params, router_params
    d = cfg.hidden_size
    dense_layer = mla_attention_params(cfg) + 2 * d + 3 * d * cfg.intermediate_size
    moe_layer = mla_attention_params(cfg) + 2 * d + expert_params(cfg) * (1 + 16) + router_params(cfg)
    assert s0.params == w.total["embedding"] + dense_layer + 7 * moe_layer
    assert s0.parts["weights"] == 2 * s0.params


def test_max_micro_batch_is_the_boundary():
    cfg = preset("small")
    layout = Layout(gpus=8, pp=2, ep=4, seq_len=1024, schedule="1f1b")
    budget = 40 * 2 ** 30
    mb = max_micro_batch(cfg, layout, Recipe(), budget)
    assert mb >= 1
    assert peak_bytes(cfg, Layout(**{**layout.__dict__, "micro_batch": mb}), Recipe()) <= budget
    assert peak_bytes(cfg, Layout(**{**layout.__dict__, "micro_batch": mb + 1}), Recipe()) > budget


def test_layout_errors():
    with pytest.raises(ValueError, match="ep"):
        memory_per_gpu(preset("v3"), Layout(gpus=2048, pp=16, ep=3))


# ---------------------------------------------------------------------------------------------- loading
def test_dense_reader_and_errors(tmp_path):
    cfg, label = load_model(QWEN)
    assert isinstance(cfg, DenseConfig) and cfg.head_dim == 128 and cfg.num_key_value_heads == 8
    with pytest.raises(UserError, match="unknown model"):
        load_model("v4")
    with pytest.raises(UserError, match="does not exist"):
        load_model(str(tmp_path / "missing.json"))
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "llama", "hidden_size": 64}')
    with pytest.raises(UserError, match="num_attention_heads"):
        load_model(str(tmp_path))
    toml = tmp_path / "run.toml"
    toml.write_text('[model]\npreset = "tiny"\nnum_hidden_layers = 6\n')
    assert load_model(str(toml))[0].num_hidden_layers == 6


# --------------------------------------------------------------------------------------------------- CLI
def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_model_json(capsys):
    out = _json(capsys, ["plan", "v3", "--seq-len", "4096", "--json", "--compare", QWEN])
    params = out["v3: parameters"]
    assert params["total (main model, no MTP)"] == 671_026_419_200
    kv = out["v3: KV cache (main-model layers)"]
    assert kv["MLA absorbed BF16 bytes/token"] == 70_272 and "4.66x" in kv["qwen2.5-72b BF16 bytes/token (x v3)"]


def test_cli_subverbs_json(capsys):
    dec = _json(capsys, ["plan", "decode", "v3", "--bandwidth", "50", "--hidden", "7000", "--json"])
    assert round(dec["v3: decode speed limit at 50 GB/s"]["time per output token ms"], 2) == 14.76
    net = _json(capsys, ["plan", "network", "--ports", "64", "--json"])
    assert net["FT3 (64-port switches)"]["switches"] == 5120
    cost = _json(capsys, ["plan", "cost", "--gpus", "2048", "--tokens-per-day", "272.8e9", "--flops-per-token",
                          "250e9", "--table1", "--json"])
    assert round(cost["throughput"]["tokens/s/GPU"], 1) == 1541.7
    assert cost["DeepSeek-V3 report Table 1 at $2/GPU hour"]["total $"] == 5_576_000
    pipe = _json(capsys, ["plan", "pipeline", "--pp", "8", "--json"])
    assert pipe["dualpipe, PP 8"]["bubble"] == 3 * (3 + 2 - 3)
    mem = _json(capsys, ["plan", "memory", "small", "--gpus", "8", "--pp", "2", "--ep", "4", "--seq-len", "1024",
                         "--gpu-mem", "80", "--json"])
    assert next(iter(mem.values()))["fits 80 GiB"] is True


def test_cli_tables_and_user_errors(capsys):
    assert main(["plan", "tiny"]) == 0
    assert "parameters" in capsys.readouterr().out
    assert main(["plan", "no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["plan", "memory", "v3", "--gpus", "2048", "--pp", "16", "--ep", "3"]) == 2
    assert "ep (3)" in capsys.readouterr().err
    assert main(["plan", "cost"]) == 2
    with pytest.raises(SystemExit):  # argparse rejects a non-positive value with exit code 2
        main(["plan", "decode", "v3", "--bandwidth", "-1"])


def test_cli_help_lists_subverbs(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    text = capsys.readouterr().out
    for word in ("memory", "decode", "network", "cost", "pipeline", "MODEL"):
        assert word in text
