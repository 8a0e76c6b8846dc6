"""dsv3.plan.step: the step-time simulator against the Insights paper's Table 4, Table 2 bubbles, sanity, CLI."""
from __future__ import annotations

import json

import pytest

from dsv3.cli import main
from dsv3.config import preset
from dsv3.plan.pipeline import schedule_cost
from dsv3.plan.rates import load_rates
from dsv3.plan.step import TABLE4, TABLE4_LAYOUT, Layout, Options, parse_layout, predict_step, simulated_bubble


@pytest.fixture(scope="module")
def v3_table4():
    L = TABLE4_LAYOUT
    return predict_step(preset("v3"), Layout(L["pp"], L["ep"], L["dp"]), load_rates("h800"), L["micro_batch"],
                        L["seq_len"], L["microbatches"], "dualpipe")


def test_table4_golden_step_time(v3_table4):
    """Insights paper Table 4 (MPFT): 19.926 s per step, 1,541.7 tokens/s/GPU on 2,048 H800s."""
    r = v3_table4
    assert r["tokens_per_step"] == 15360 * 4096 and r["gpus"] == 2048
    err = r["step_s"] / TABLE4["step_s"] - 1
    tps_err = r["tokens_per_s_per_gpu"] / TABLE4["tokens_per_s_per_gpu"] - 1
    print(f"\nTable 4: simulated {r['step_s']:.3f} s vs {TABLE4['step_s']} s (relative error {100 * err:+.1f}%), "
          f"{r['tokens_per_s_per_gpu']:.1f} vs {TABLE4['tokens_per_s_per_gpu']} tokens/s/GPU ({100 * tps_err:+.1f}%), "
          f"MFU causal {100 * r['mfu_causal']:.2f}% vs {TABLE4['mfu_causal_pct']}%; phases 1F {r['f_s']:.2f} "
          f"bubble {r['bubble_s']:.2f} 1B {r['b_s']:.2f} 1W {r['w_s']:.2f} F&B {r['pairs_s']:.2f} "
          f"opt+DP {r['step_s'] - r['pipeline_s']:.2f} s")
    assert abs(err) < 0.10
    assert abs(tps_err) < 0.11
    # the shape of the breakdown: pairs dominate, the bubble is a tenth, lone chunks a few percent
    assert r["pairs_s"] > 0.5 * r["step_s"]
    assert 0.03 < r["bubble_fraction"] < 0.25
    assert r["mfu_causal"] == pytest.approx(r["tokens_per_s_per_gpu"] * r["flops_per_token_causal"] / 989e12)


@pytest.mark.parametrize("pp", [2, 4, 8])
@pytest.mark.parametrize("m_mult", [1, 3])
@pytest.mark.parametrize("F,B,W", [(1.0, 2.0, 1.0), (1.0, 1.5, 0.5)])
def test_zero_comm_1f1b_bubble_is_table2(pp, m_mult, F, B, W):
    m = pp * m_mult
    assert simulated_bubble("1f1b", pp, m, F, B, W) == pytest.approx(schedule_cost("1f1b", pp, F, B, W).bubble)


@pytest.mark.parametrize("pp", [4, 8, 16])
@pytest.mark.parametrize("FB", [3.0, 2.5, 2.0])
def test_zero_comm_dualpipe_bubble_is_table2(pp, FB):
    """Bidirectional DualPipe on pp ranks: (PP/2-1)(F&B+B-3W) with PP = pp stages, F:B:W = 1:2:1."""
    got = simulated_bubble("dualpipe", pp, 2 * pp + 4, 1.0, 2.0, 1.0, FB)
    assert got == pytest.approx(schedule_cost("dualpipe", pp, 1.0, 2.0, 1.0, FB).bubble)


@pytest.mark.parametrize("pp", [2, 4, 8])
def test_zero_comm_dualpipev_bubble_is_table2(pp):
    """DualPipeV on pp ranks runs 2*pp stages: the same formula with PP = 2*pp."""
    got = simulated_bubble("dualpipev", pp, 3 * pp, 1.0, 2.0, 1.0, 2.5)
    assert got == pytest.approx(schedule_cost("dualpipe", 2 * pp, 1.0, 2.0, 1.0, 2.5).bubble)


def _small(schedule="dualpipe", m=16, **rate_changes):
    rates = load_rates("h800", **rate_changes)
    return predict_step(preset("small"), Layout(pp=4, ep=8, dp=16), rates, 1, 2048, m, schedule)


@pytest.mark.parametrize("schedule", ["1f1b", "dualpipe", "dualpipev"])
def test_more_bandwidth_is_never_slower(schedule):
    for key in ("ib_gbps", "nvlink_gbps"):
        times = [_small(schedule, **{key: bw})["step_s"] for bw in (10, 40, 160, 640)]
        assert all(a >= b - 1e-12 for a, b in zip(times, times[1:])), (key, times)


@pytest.mark.parametrize("schedule", ["1f1b", "dualpipe", "dualpipev"])
def test_more_microbatches_never_raise_the_bubble_fraction(schedule):
    fr = [_small(schedule, m)["bubble_fraction"] for m in (8, 16, 32, 64)]
    assert all(a >= b - 1e-12 for a, b in zip(fr, fr[1:])), fr


def test_no_comm_when_everything_is_local_and_faster_gemms_help():
    r = predict_step(preset("small"), "pp=1,ep=1,dp=1", load_rates("h100"), 2, 2048, 4, "1f1b")
    assert r["exposed_comm_s"] == 0 and r["bubble_s"] == pytest.approx(0.0, abs=1e-12)
    faster = predict_step(preset("small"), "pp=1,ep=1,dp=1", load_rates("h100", grouped_fp8_tflops=2000.0), 2, 2048,
                          4, "1f1b")
    assert faster["step_s"] < r["step_s"]
    # a 2-GPU layout a benchmark can compare with: EP=2 over NVLink
    two = predict_step(preset("small"), "pp=1,ep=2,dp=2", load_rates("h100"), 2, 2048, 4, "1f1b",
                       Options(precision="bf16"))
    assert two["gpus"] == 2 and two["exposed_ep_comm_s"] > 0


def test_parse_layout():
    assert parse_layout("pp=16,ep=64,dp=128") == Layout(16, 64, 128)
    assert parse_layout("dp=4") == Layout(1, 1, 4)
    for bad in ("pp=16,ep=64,dp=12x", "pp16", "tp=2", "pp=2,pp=4", "", "ep=3,dp=4", "pp=0"):
        with pytest.raises(ValueError):
            parse_layout(bad)


def test_cli_json(capsys):
    assert main(["plan", "step", "v3", "--layout", "pp=16,ep=64,dp=128", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    res = obj["result"]
    assert res["gpus"] == 2048 and res["step_s"] > 0 and 0 < res["mfu_causal"] < 1


def test_cli_errors(capsys, tmp_path):
    assert main(["plan", "step", "v3", "--layout", "pp=16,ep=64,dp=12x"]) == 2
    assert main(["plan", "step", "v3", "--layout", "pp=16,ep=5,dp=128"]) == 2
    assert main(["plan", "step", "v3", "--microbatches", "8"]) == 2  # DualPipe on pp=16 needs >= 32
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"ib_gbps": 45.0, "gemm_fp8_tflops": 1500}))
    assert main(["plan", "step", "small", "--layout", "pp=2,ep=2,dp=2", "--microbatches", "8", "--rates", str(f),
                 "--schedule", "1f1b"]) == 0
    f.write_text(json.dumps({"warp_speed": 9}))
    assert main(["plan", "step", "small", "--layout", "pp=2,ep=2,dp=2", "--rates", str(f)]) == 2
