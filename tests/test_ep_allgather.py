"""``parallel.ep_dispatch = "allgather"``'s local half, in one process (the two-process runs against the
single-process reference are in test_parallel_ep.py and test_parallel_cli.py).

``local_experts_partial`` over the ranks' expert slices, summed, must equal the single-device grouped path
(``experts_forward_sorted``) in the output and every gradient. Its grouped GEMMs leave the rows past the last
group unwritten (garbage: on the CPU, torch 2.13's fp32 ``_grouped_mm`` does the same as CUDA); the CPU tests
make those rows NaN, in the outputs and the input gradients, so they fail unless the masking keeps them out. GPU (skipped without CUDA): the same in BF16, and the whole
``allgather_experts_forward`` compiled with ``fullgraph=True`` over a one-rank NCCL group: the layer, functional
collectives included, is one graph with no break (the point of the mode)."""
from __future__ import annotations

import pytest
import torch

from dsv3.model.moe import Routing, experts_forward_sorted
from dsv3.parallel.ep_allgather import allgather_experts_forward, local_experts_partial
from parallel_helpers import rel_err


def _problem(T=48, D=32, F=16, E=8, K=3, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(device, dtype)
    w = [(torch.randn(E, F, D, generator=g) * 0.2).to(device, dtype),
         (torch.randn(E, F, D, generator=g) * 0.2).to(device, dtype),
         (torch.randn(E, D, F, generator=g) * 0.2).to(device, dtype)]
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(device)
    weight = torch.rand(T, K, generator=g).to(device)
    return x, w, idx, weight


def _leaves(x, w, weight):
    return [t.detach().clone().requires_grad_(True) for t in (x, *w, weight)]


def _grads(out, leaves, seed=1):
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    out.backward(dy)
    return [t.grad for t in leaves]


def _split_over_ranks(x, w, idx, weight, ranks):
    """sum over ranks of local_experts_partial on each rank's expert slice, as the combine adds them."""
    E = w[0].shape[0]
    El = E // ranks
    leaves = _leaves(x, w, weight)
    xs, wg, wu, wd, wt = leaves
    total, rows = 0, 0
    for r in range(ranks):
        sl = slice(r * El, (r + 1) * El)
        part, n = local_experts_partial(xs, idx, wt, r * El, wg[sl], wu[sl], wd[sl])
        total = total + part.float()
        rows += int(n)
    return total.to(x.dtype), rows, leaves


class _NaNPastEnd(torch.autograd.Function):
    """Rows >= end set to NaN in the forward (``grad`` False) or in the gradient (``grad`` True)."""

    @staticmethod
    def forward(ctx, t, end, grad):
        ctx.end, ctx.grad = end, grad
        return t.clone() if grad else _poison(t, end)

    @staticmethod
    def backward(ctx, g):
        return (_poison(g, ctx.end) if ctx.grad else g), None, None


def _poison(t, end):
    rows = torch.arange(t.shape[0], device=t.device)[:, None]
    return torch.where(rows < end, t, float("nan"))


@pytest.fixture
def nan_past_last_group(monkeypatch):
    """The worst bytes the allocator could hold: every grouped GEMM (forward, and the input-gradient GEMMs
    inside ``_SlotsGateUp``'s backward) writes NaN past the last group, in its output and in its input
    gradient."""
    from dsv3.parallel import ep_allgather
    real = ep_allgather.slot_gemm

    def poisoned(x, w, ends, counts):
        end = ends[-1]
        return _NaNPastEnd.apply(real(_NaNPastEnd.apply(x, end, True), w, ends, counts), end, False)

    monkeypatch.setattr(ep_allgather, "slot_gemm", poisoned)


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_partials_over_rank_slices_equal_the_grouped_path(ranks, nan_past_last_group):
    x, w, idx, weight = _problem()
    ref_leaves = _leaves(x, w, weight)
    ref = experts_forward_sorted(ref_leaves[0], Routing(idx, ref_leaves[4], None), *ref_leaves[1:4])
    ref_grads = _grads(ref, ref_leaves)
    out, rows, leaves = _split_over_ranks(x, w, idx, weight, ranks)
    assert rows == idx.numel()                           # every copy computed by exactly one rank
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for name, a, b in zip(["x", "gate", "up", "down", "weight"], _grads(out, leaves), ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_rank_with_no_local_copies_gives_zero_and_finite_gradients(nan_past_last_group):
    """A rank none of whose experts is chosen: zero partial, zero (finite) gradients, though every grouped-GEMM
    row is then 'past the last group'."""
    x, w, idx, weight = _problem(E=8, K=2)
    idx = idx % 4                                        # only experts 0-3: rank 1 of 2 holds 4-7
    xs, wg, wu, wd, wt = _leaves(x, w, weight)
    part, n = local_experts_partial(xs, idx, wt, 4, wg[4:], wu[4:], wd[4:])
    assert int(n) == 0 and torch.equal(part, torch.zeros_like(part))
    part.backward(torch.randn_like(part))
    for t in (xs, wg, wu, wd, wt):
        assert t.grad is not None and torch.isfinite(t.grad).all() and not t.grad[t.grad != 0].numel()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _fp32_reference(x, w, idx, weight):
    """Output and gradients of the single-device path in fp32 (on CUDA its grouped GEMM is the per-expert loop)."""
    leaves = [t.float() for t in _leaves(x, w, weight)]
    leaves = [t.detach().requires_grad_(True) for t in leaves]
    out = experts_forward_sorted(leaves[0], Routing(idx, leaves[4], None), *leaves[1:4])
    return out, _grads(out, leaves)


def _bf16_reference(x, w, idx, weight):
    leaves = _leaves(x, w, weight)
    out = experts_forward_sorted(leaves[0], Routing(idx, leaves[4], None), *leaves[1:4])
    return out, _grads(out, leaves)


NAMES = ["out", "x", "gate", "up", "down", "weight"]


def _assert_as_accurate(got, bf16_ref, fp32_ref):
    """BF16 results: no further from the fp32 reference than the single-device BF16 path is (x 1.5, + 1e-3),
    and finite. Element-wise tolerances do not fit: two ranks' partials are rounded to BF16 before their sum,
    so single elements differ by an ulp of the output, and near-zero elements by any relative amount."""
    for name, a, b, r in zip(NAMES, got, bf16_ref, fp32_ref):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, r) <= 1.5 * rel_err(b, r) + 1e-3, (name, rel_err(a, r), rel_err(b, r))


@cuda
def test_gpu_bf16_partials_as_accurate_as_the_grouped_path(nan_past_last_group):
    """With the slot kernels (``dsv3.kernels.local_slots``) and NaN in every row they must skip."""
    x, w, idx, weight = _problem(T=512, D=256, F=128, E=16, K=4, device="cuda", dtype=torch.bfloat16)
    ref32, ref32_grads = _fp32_reference(x, w, idx, weight)
    ref, ref_grads = _bf16_reference(x, w, idx, weight)
    out, rows, leaves = _split_over_ranks(x, w, idx, weight, 2)
    assert rows == idx.numel()
    _assert_as_accurate([out, *_grads(out, leaves)], [ref, *ref_grads], [ref32, *ref32_grads])


@cuda
def test_gpu_layer_compiles_as_one_graph_with_its_collectives(tmp_path):
    import torch.distributed as dist
    from dsv3.parallel.transport import CollectiveTransport
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        t = CollectiveTransport(dist.group.WORLD)
        x, w, idx, weight = _problem(T=512, D=256, F=128, E=16, K=4, device="cuda", dtype=torch.bfloat16)
        stats = torch.zeros(2, dtype=torch.int64, device="cuda")

        def layer(x, wt, wg, wu, wd):
            return allgather_experts_forward(x, Routing(idx, wt, None), wg, wu, wd, t, 0, stats)

        ref32, ref32_grads = _fp32_reference(x, w, idx, weight)
        eager_leaves = _leaves(x, w, weight)
        eager = layer(eager_leaves[0], eager_leaves[4], *eager_leaves[1:4])
        eager_grads = _grads(eager, eager_leaves)
        leaves = _leaves(x, w, weight)
        compiled = torch.compile(layer, fullgraph=True)        # fails on any graph break
        out = compiled(leaves[0], leaves[4], *leaves[1:4])
        _assert_as_accurate([out, *_grads(out, leaves)], [eager, *eager_grads], [ref32, *ref32_grads])
        assert stats.tolist() == [2 * idx.numel(), 2 * 512 * (2 * 256 * 2 + 2 * 4 * 4)]
        # eager, the layer queues its work without waiting for the GPU anywhere, forward and backward
        leaves = _leaves(x, w, weight)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = layer(leaves[0], leaves[4], *leaves[1:4])
            out.backward(torch.ones_like(out))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        dist.destroy_process_group()


def test_auto_dispatch_picks_allgather_at_ep2_only_when_it_can():
    from dsv3.parallel.expert_parallel import resolve_dispatch
    assert resolve_dispatch("auto", 2, 6, False, 1, False) == "allgather"      # small: 3x fewer bytes
    assert resolve_dispatch("auto", 2, 2, False, 1, False) == "alltoall"       # top-2: no fewer bytes
    assert resolve_dispatch("auto", 4, 8, False, 1, False) == "alltoall"       # ep-fold slots: not by default
    for fp8_dispatch, chunks, fp8_experts in ((True, 1, False), (False, 2, False), (False, 1, True)):
        assert resolve_dispatch("auto", 2, 6, fp8_dispatch, chunks, fp8_experts) == "alltoall"
    assert resolve_dispatch("auto", 2, 6, False, 1, False, split_backward=True) == "alltoall"   # DualPipeV
    assert resolve_dispatch("allgather", 4, 8, False, 1, False) == "allgather"  # asked for: kept


def test_allgather_with_what_it_lacks_is_a_user_error():
    from dsv3.errors import UserError
    from dsv3.parallel.mesh import ParallelConfig, validate_layout
    for extra in ({"fp8_dispatch": True}, {"ep_chunks": 2}):
        pc = ParallelConfig.from_dict({"ep": 2, "ep_dispatch": "allgather", **extra})
        with pytest.raises(UserError, match="ep_dispatch = 'allgather' does not support .* set parallel.ep_dispatch"):
            validate_layout(2, pc)
    with pytest.raises(UserError, match="ep_dispatch = 'gather' is invalid"):
        validate_layout(2, ParallelConfig.from_dict({"ep": 2, "ep_dispatch": "gather"}))
    from dsv3.train.config import resolve
    with pytest.raises(UserError, match="does not support train.precision = 'fp8'"):   # before any process group
        resolve({"train": {"precision": "fp8"}, "parallel": {"ep": 2, "ep_dispatch": "allgather"}})
    resolve({"train": {"precision": "fp8", "fp8_modules": "attention,mlp"},
             "parallel": {"ep": 2, "ep_dispatch": "allgather"}})                   # experts in BF16: fine
