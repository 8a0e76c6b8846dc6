"""summarize_trace: the GPU timeline numbers of a profiled step, checked on a hand-made trace whose answers
are worked out by hand below."""
from __future__ import annotations

import json

from dsv3.train.profiling import kernel_kind, summarize_trace


def _k(name, ts, dur, tid=7):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "tid": tid}


def test_summary_of_a_handmade_timeline(tmp_path):
    # compute stream: gemm [0,100), elementwise [150,200), attention [400,500)
    # comm stream:    nccl [50,300)  -> overlapped by compute on [50,100) and [150,200): exposed 150 us
    # idle: [300,400) = 100 us; window 500 us; busy 400 us
    events = [_k("sm90_xmma_gemm_bf16", 0, 100), _k("vectorized_elementwise_kernel", 150, 50),
              _k("ncclDevKernel_SendRecv", 50, 250, tid=9), _k("flash_fwd_kernel", 400, 100),
              {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 1000}]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": events}))
    s = summarize_trace(path)
    assert s["kernels"] == 4
    assert s["window_ms"] == 0.5 and s["busy_ms"] == 0.4 and s["idle_ms"] == 0.1
    assert s["comm_exposed_ms"] == 0.15
    assert s["kernel_ms"]["gemm"] == 0.1 and s["kernel_ms"]["communication"] == 0.25
    assert s["kernel_ms"]["attention"] == 0.1 and s["kernel_ms"]["other"] == 0.05
    assert s["longest_gaps"][0] == {"ms": 0.1, "after": "ncclDevKernel_SendRecv"}
    assert [(k["name"], k["ms"], k["calls"]) for k in s["top_kernels"]] == [
        ("ncclDevKernel_SendRecv", 0.25, 1), ("sm90_xmma_gemm_bf16", 0.1, 1), ("flash_fwd_kernel", 0.1, 1),
        ("vectorized_elementwise_kernel", 0.05, 1)]


def test_top_kernels_sum_repeated_calls(tmp_path):
    events = [_k("triton_poi_fused_add_mul_cat_expand_select_" + "x" * 100, 0, 30), _k("gemm", 40, 50),
              _k("triton_poi_fused_add_mul_cat_expand_select_" + "x" * 100, 100, 30)]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": events}))
    top = summarize_trace(path, top=1)["top_kernels"]
    assert top == [{"ms": 0.06, "calls": 2, "name": "triton_poi_fused_add_mul_cat_expand_select_" + "x" * 100}]


def test_cpu_trace_gives_zeros(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": [{"ph": "X", "cat": "cpu_op", "name": "aten::add", "ts": 0,
                                                 "dur": 5}]}))
    s = summarize_trace(path)
    assert s["kernels"] == 0 and s["busy_ms"] == 0.0


def test_kernel_kinds():
    assert kernel_kind("ncclDevKernel_AllReduce_Sum_f32") == "communication"
    assert kernel_kind("triton_poi_fused_add_0") == "triton"
    assert kernel_kind("nvjet_tst_128x256") == "gemm"
    assert kernel_kind("void at::native::index_elementwise_kernel") == "other"


def test_profiled_step_leaves_no_cyclic_garbage(tmp_path):
    """The profiler's event trees are reference cycles; profile_one_step frees them on exit (at the same step
    on every rank) rather than leaving them to a later, unsynchronized automatic collection."""
    import gc

    import torch

    from dsv3.train.profiling import profile_one_step

    x = torch.randn(64, 64, requires_grad=True)
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        with profile_one_step(tmp_path, torch.device("cpu")):
            for _ in range(20):
                (x @ x).relu().sum().backward()
        left = gc.collect()
    finally:
        if was:
            gc.enable()
    assert (tmp_path / "profile" / "rank0.summary.json").exists()
    assert left == 0
