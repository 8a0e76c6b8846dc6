"""Data parallelism (ZeRO-1) on gloo against the single-process run of the same global batch."""
from __future__ import annotations

import pytest
import torch

from dsv3.errors import UserError
from dsv3.parallel import data_parallel as dp
from dsv3.parallel.mesh import Mesh, ParallelConfig, layout_ranks, mesh_for, validate_layout
from parallel_helpers import (assert_matches_reference, make_batches, parallel_worker, reference_run, rel_err,
                              run_ranks, small_config, unwrap)

STEPS, BATCH, SEQ = 3, 8, 16


@pytest.fixture(scope="module")
def setup():
    cfg = small_config()
    batches = make_batches(cfg, STEPS, BATCH, SEQ)
    return cfg, batches, reference_run(cfg, batches)


def test_reference_clips(setup):
    _, _, ref = setup
    assert min(ref["norm"]) > 0.05  # the clip is active, so the global norm matters
    assert any(float(b.abs().sum()) > 0 for b in ref["biases"][-1])


def test_dp2_matches_single_process(setup):
    """DP=2, 2 micro-batches per rank (the first under no_sync)."""
    cfg, batches, ref = setup
    ranks = unwrap(run_ranks(parallel_worker, 2, cfg, batches, {"dp": 2}, 2))
    assert_matches_reference(ref, ranks)
    for rec in ranks:  # ZeRO-1: each rank holds optimizer state for only part of the parameters
        assert 0 < rec["n_owned"] < rec["n_params"]
    assert sum(rec["n_owned"] for rec in ranks) == ranks[0]["n_params"]
    for rec in ranks:  # gradient buckets were all-reduced during backward, not after it
        for launched, n_buckets in rec["overlapped"]:
            assert n_buckets > 3 and launched == n_buckets
    for s in range(STEPS):  # reduce to owner: each gradient ends on exactly the rank that steps its parameter
        assert sorted(n for rec in ranks for n in rec["grads"][s]) == sorted(ref["grads"][s])
    for rec in ranks:  # the updated parameters were still in flight when the next forward began; it waited for all
        assert rec["pending_before_forward"][0] == 0 and min(rec["pending_before_forward"][1:]) == rec["n_params"]
        assert rec["pending_after_forward"] == [0] * STEPS
    for s in range(STEPS):  # grad_as_bucket_view: every gradient a rank keeps is a slice of its reduction bucket
        assert [rec["grads_in_buckets"][s] for rec in ranks] == [len(rec["grads"][s]) for rec in ranks]


def test_dp2_parameter_sync_overlap_and_reduce_to_owner_change_nothing(setup):
    """ZeRO-1 with the broadcasts waited inside step (overlap_param_sync = false, torch's own sync) and the
    gradients all-reduced (reduce_to_owner = false) from flattened copies (grad_as_bucket_view = false) against
    the defaults: the same owned gradients bit for bit
    in the first step; afterwards only the global norm's summation order differs (squares summed per rank,
    then over ranks), a few ulps carried through the clipped update."""
    cfg, batches, ref = setup
    flags = {"overlap_param_sync": False, "reduce_to_owner": False, "grad_as_bucket_view": False}
    on, off = (unwrap(run_ranks(parallel_worker, 2, cfg, batches, {"dp": 2, **extra}, 2)) for extra in ({}, flags))
    assert_matches_reference(ref, off)
    for a, b in zip(on, off):
        assert set(b["pending_before_forward"]) == {0} and a["loss"][0] == b["loss"][0]
        assert set(b["grads_in_buckets"]) == {0} and min(a["grads_in_buckets"]) > 0
        assert all(abs(x - y) <= 1e-6 * abs(y) for x, y in zip(a["loss"] + a["norm"], b["loss"] + b["norm"]))
        assert a["grads"][0].keys() < b["grads"][0].keys()
        assert all(torch.equal(a["grads"][0][k], b["grads"][0][k]) for k in a["grads"][0])
        for ga, gb in zip(a["grads"][1:], b["grads"][1:]):
            assert all(rel_err(ga[k], gb[k]) <= 1e-5 for k in ga)
        assert all(rel_err(a["state"][k], b["state"][k]) <= 1e-5 for k in a["state"])


def test_dp4_ep2_matches_single_process(setup):
    """DP=4 with EP=2: experts reduced over their 2 replicas only, dense params over all 4."""
    cfg, batches, ref = setup
    ranks = unwrap(run_ranks(parallel_worker, 4, cfg, batches, {"ep": 2}, 1))
    assert_matches_reference(ref, ranks)
    assert [r["ep_rank"] for r in ranks] == [0, 1, 0, 1]


def test_single_process_helpers_are_no_ops():
    mesh = Mesh()
    assert dp.count_all_reduce(mesh) is None
    assert dp.global_mean(torch.tensor(2.5), mesh) == 2.5
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 3.0)
    norm = dp.clip_grad_norm_([p], 1.0, mesh)
    assert float(norm) == pytest.approx(6.0)
    assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-5)


def test_layout_arithmetic():
    groups = layout_ranks(8, pp=2, dp=4, ep=2)
    assert groups["dp"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert groups["ep"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["edp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    m = mesh_for(7, 8, ParallelConfig(pp=2, ep=2))
    assert (m.pp_rank, m.dp_rank, m.ep_rank, m.edp_rank, m.edp) == (1, 3, 1, 1, 2)


@pytest.mark.parametrize("world,pc,cfg_changes,needle", [
    (4, dict(pp=3), {}, "not divisible by parallel.pp"),
    (4, dict(dp=3), {}, "!= parallel.pp * parallel.dp"),
    (4, dict(ep=3), {}, "does not divide the data-parallel size"),
    (4, dict(ep=4), dict(n_routed_experts=6, n_group=1, topk_group=1), "not divisible by parallel.ep"),
    (2, dict(backend="mpi"), {}, "parallel.backend"),
    (2, dict(ep=2, node_limited_routing=True), dict(topk_group=3), "topk_group"),
])
def test_layout_validation_messages(world, pc, cfg_changes, needle):
    with pytest.raises(UserError) as e:
        validate_layout(world, ParallelConfig(**pc), small_config(**cfg_changes))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unknown_parallel_key():
    with pytest.raises(UserError, match="unknown key parallel.zero"):
        ParallelConfig.from_dict({"zero": 1})
    with pytest.raises(UserError, match="wrong type"):
        ParallelConfig.from_dict({"ep": "2"})
