"""Pipeline pieces without torch.distributed: schedules (order, bubble, memory vs the V3 report's Table 2),
the layer partition, the B/W backward split, stage views, and a whole step on one process."""
from __future__ import annotations

import copy

import pytest
import torch

from dsv3.config import preset
from dsv3.errors import UserError
from dsv3.model import DeepseekV3
from dsv3.parallel.pipeline import (PipelineLoss, build_schedule, build_stages, load_stage_state_dict,
                                    partition_layers, run_pipeline_step, stage_parameters, stage_state_dict)
from dsv3.parallel.pipeline.backward import backward_full, backward_input
from dsv3.parallel.pipeline.comm import messages_sent
from dsv3.parallel.pipeline.partition import chunk_owner, layer_cost, num_chunks
from dsv3.parallel.pipeline.schedules import Op, simulate, table2_bubble, validate
from parallel_helpers import pipeline_config as _cfg

CASES = [("1f1b", 2, 1), ("1f1b", 2, 4), ("1f1b", 4, 3), ("1f1b", 4, 8), ("dualpipev", 1, 2),
         ("dualpipev", 2, 4), ("dualpipev", 2, 7), ("dualpipev", 4, 8), ("dualpipev", 4, 13),
         ("dualpipev", 8, 16), ("dualpipev", 8, 20)]


@pytest.mark.parametrize("schedule,pp,m", CASES)
def test_schedule_is_complete_and_dependency_ordered(schedule, pp, m):
    ops = build_schedule(schedule, pp, m)
    validate(schedule, pp, m, ops)                   # one F and one B per (chunk, mb); no deadlock
    C = num_chunks(schedule, pp)
    for r, rops in enumerate(ops):
        pos = {(o.kind, o.chunk, o.mb): i for i, o in enumerate(rops)}
        for o in rops:
            if o.kind == "B":
                assert pos[("F", o.chunk, o.mb)] < pos[("B", o.chunk, o.mb)], f"{o} before its F on rank {r}"
                if o.split:
                    assert pos[("W", o.chunk, o.mb)] > pos[("B", o.chunk, o.mb)], f"W of {o} missing or early"
            if o.kind == "W":
                assert any(x.kind == "B" and x.split and (x.chunk, x.mb) == (o.chunk, o.mb) for x in rops)
    # Sends come before their matching receives: in simulated time every message's producing op ends no
    # later than the consuming op starts, and each channel carries its messages in one order both ends use.
    res = simulate(schedule, pp, m, ops)
    for r, rops in enumerate(ops):
        for kind, g, mb, dst in messages_sent(rops, schedule, pp):
            src_op = ("F", g, mb) if kind == "act" else ("B", g, mb)
            dst_op = ("F", g + 1, mb) if kind == "act" else ("B", g - 1, mb)
            assert res.finish[src_op] <= res.start[dst_op]
            assert chunk_owner(dst_op[1], schedule, pp) == dst
    assert all(chunk_owner(g, schedule, pp) in range(pp) for g in range(C))


@pytest.mark.parametrize("pp,m", [(2, 4), (4, 8), (4, 9), (8, 16)])
@pytest.mark.parametrize("F,B,W", [(1, 2, 1), (1, 1, 0), (2, 3, 1)])
def test_1f1b_bubble_is_table2(pp, m, F, B, W):
    """Every rank idles exactly (PP-1)(F+B), PP = pp (full backwards; W plays no part)."""
    res = simulate("1f1b", pp, m, build_schedule("1f1b", pp, m), F=F, B=B, W=W)
    assert res.bubbles == pytest.approx([table2_bubble("1f1b", pp, F, B, W, F + B)] * pp)


@pytest.mark.parametrize("pp,m", [(2, 4), (2, 9), (4, 8), (4, 10), (8, 20)])
@pytest.mark.parametrize("F,B,W,FB", [(1, 2, 1, 3), (1, 2, 1, 2.5), (1, 2, 1, 2), (1, 1, 0, 2), (1, 1, 0, 1.5)])
def test_dualpipev_bubble_is_table2(pp, m, F, B, W, FB):
    """What we compare: the V3 report's Table 2 (and DeepSeek's DualPipe README, which gives DualPipeV the
    same formula) says (PP/2-1)(F&B+B-3W) with PP = the number of stages = 2*pp chunks and F, B, W, F&B
    per chunk. Our clock simulation (each rank runs its ops back to back once inputs are there; no
    communication time) gives the worst rank's idle time exactly that value for the report's cost
    shape F:B:W = 1:2:1 (B is a full backward = input part + W), and for W = 0 (no split gain), for any
    F&B between max(F, B) and F+B. Ranks nearer the V's tip idle less when F&B < F+B."""
    res = simulate("dualpipev", pp, m, build_schedule("dualpipev", pp, m), F=F, B=B, W=W, FB=FB)
    assert max(res.bubbles) == pytest.approx(table2_bubble("dualpipev", pp, F, B, W, FB))
    assert min(res.bubbles) >= 0


@pytest.mark.parametrize("pp,m", [(2, 4), (4, 9), (8, 20)])
@pytest.mark.parametrize("B,W", [(1, 0.25), (1.5, 0.5), (3, 0.5), (3, 1)])
@pytest.mark.parametrize("overlap", [1.0, 0.8])
def test_dualpipev_bubble_beats_1f1b_for_other_costs(pp, m, B, W, overlap):
    """Off the 1:2:1 shape the formula is only the report's estimate (the simulated bubble lands above or
    below it); what must hold is that DualPipeV idles less than 1F1B on the same pp ranks doing the same
    work per rank (two chunks each: (pp-1)(2F+2B))."""
    F = 1.0
    res = simulate("dualpipev", pp, m, build_schedule("dualpipev", pp, m), F=F, B=B, W=W, FB=overlap * (F + B))
    assert max(res.bubbles) < (pp - 1) * 2 * (F + B)


@pytest.mark.parametrize("pp", [2, 4, 8])
def test_dualpipev_activation_memory_is_table2(pp):
    """Peak forwards awaiting their backward per rank = PP + 1 stages' activations (PP = 2*pp stages)."""
    for rops in build_schedule("dualpipev", pp, 4 * pp):
        live = peak = 0
        for o in rops:
            live += (o.kind == "F") - (o.kind == "B")
            peak = max(peak, live)
        assert peak == 2 * pp + 1


def test_dualpipev_has_overlapped_pairs_and_deferred_weights():
    ops = build_schedule("dualpipev", 4, 10)
    for r, rops in enumerate(ops):
        assert sum(o.pair for o in rops) > 0
        assert sum(o.kind == "W" for o in rops) == sum(o.split for o in rops) > 0
        for i, o in enumerate(rops):     # a pair is an F of one chunk with a B of the other chunk
            if o.pair:
                assert rops[i - 1].kind == "F" and rops[i - 1].chunk != o.chunk


def test_validate_catches_a_broken_order():
    ops = build_schedule("1f1b", 2, 3)
    bad = [list(ops[0]), list(ops[1])]
    bad[1] = [Op("B", 1, 0)] + [o for o in bad[1] if o != Op("B", 1, 0)]   # B before its F
    with pytest.raises(AssertionError):
        validate("1f1b", 2, 3, bad)
    with pytest.raises(AssertionError):
        validate("1f1b", 2, 3, [ops[0], ops[1][:-1]])                      # a backward missing


def test_too_few_micro_batches():
    with pytest.raises(UserError, match="at least 8 micro-batches"):
        build_schedule("dualpipev", 4, 7)
    build_schedule("1f1b", 4, 1)


# ---------------------------------------------------------------------------------------- partition



def test_partition_is_contiguous_and_min_max_optimal():
    """Against brute force over every split: no other contiguous split has a cheaper costliest chunk."""
    import itertools
    from dsv3.parallel.pipeline.partition import head_cost
    for cfg, schedule, pp in [(_cfg(8, first_k_dense_replace=3), "dualpipev", 2), (_cfg(9), "1f1b", 3),
                              (_cfg(8, vocab_size=8), "dualpipev", 2), (preset("v3"), "1f1b", 2)]:
        part = partition_layers(cfg, schedule, pp)
        L, C = cfg.num_hidden_layers, part.num_chunks
        assert [i for r in part.layers for i in r] == list(range(L)) and all(len(r) for r in part.layers)
        costs = [layer_cost(cfg, i) for i in range(L)]
        best = min(max(sum(costs[a:b]) + (head_cost(cfg) if b == L else 0) for a, b in zip((0, *cut), (*cut, L)))
                   for cut in itertools.combinations(range(1, L), C - 1))
        assert max(part.costs) == pytest.approx(best)
    v3 = partition_layers(preset("v3"), "dualpipev", 8)       # 61 layers (3 dense) into 16 chunks
    assert len(v3.layers) == 16 and v3.layers[0].start == 0 and v3.layers[-1].stop == 61


@pytest.mark.parametrize("layers,schedule,pp", [(3, "dualpipev", 2), (7, "dualpipev", 4), (1, "1f1b", 2)])
def test_partition_refuses_too_few_layers(layers, schedule, pp):
    with pytest.raises(UserError, match="cannot split .* lower parallel.pp"):
        partition_layers(_cfg(layers), schedule, pp)


def test_unknown_schedule():
    with pytest.raises(UserError, match="unknown"):
        partition_layers(_cfg(4), "gpipe", 2)


# --------------------------------------------------------------------------------- B/W split backward

def test_backward_split_matches_full_backward():
    """B gives dL/dx and leaves weights untouched; W then gives exactly backward()'s weight gradients,
    including a weight used twice (two join nodes) and one whose path skips the input."""
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(6, 6, bias=False), torch.nn.Linear(6, 6)
    free = torch.nn.Parameter(torch.randn(6))

    def run(x):
        h = torch.tanh(lin1(x))
        h = lin1(h) * torch.sigmoid(lin2(h))     # lin1 twice: its second use sits on the input path
        return h + free, (h.square().mean() + free.sum()).reshape(())

    params = list(lin1.parameters()) + list(lin2.parameters()) + [free]
    x0 = torch.randn(3, 6)
    gy = torch.randn(3, 6)
    x = x0.clone().requires_grad_()
    y, aux = run(x)
    dx_full = backward_full([y, aux], [gy, None], x).clone()
    full = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    x = x0.clone().requires_grad_()
    y, aux = run(x)
    dx, job = backward_input([y, aux], [gy, None], x, params)
    assert all(p.grad is None for p in params), "B must not touch weight gradients"
    assert torch.allclose(dx, dx_full, rtol=1e-6, atol=1e-7)
    job.run()
    for p, g in zip(params, full):
        assert torch.allclose(p.grad, g, rtol=1e-6, atol=1e-7)


class _CountedMatmul(torch.autograd.Function):
    """x @ w with a count of its backward runs (a custom Function computes every input's gradient each time)."""
    runs = 0

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w

    @staticmethod
    def backward(ctx, g):
        _CountedMatmul.runs += 1
        x, w = ctx.saved_tensors
        return g @ w.t(), x.t() @ g


def test_backward_split_runs_an_opaque_node_once():
    """A weight joining at a custom autograd.Function (or a compiled region, AOTAutograd's CompiledFunction) is
    differentiated in B: that node's backward runs once in B + W (it ran twice: B computed and dropped its weight
    gradient, W ran it again). A built-in weight on the same path stays deferred to W. Gradients = backward()'s."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 6))
    lin = torch.nn.Linear(6, 6)
    x0, gy = torch.randn(3, 6), torch.randn(3, 6)

    def run(x):
        return lin(torch.tanh(_CountedMatmul.apply(x, w)))

    x = x0.clone().requires_grad_()
    dx_full = backward_full([run(x)], [gy], x).clone()
    full = [p.grad.clone() for p in (w, *lin.parameters())]
    for p in (w, *lin.parameters()):
        p.grad = None
    _CountedMatmul.runs = 0
    x = x0.clone().requires_grad_()
    dx, job = backward_input([run(x)], [gy], x, [w, *lin.parameters()])
    assert _CountedMatmul.runs == 1 and w.grad is not None and lin.weight.grad is None
    job.run()
    assert _CountedMatmul.runs == 1
    assert torch.allclose(dx, dx_full, rtol=1e-6, atol=1e-7)
    for p, g in zip((w, *lin.parameters()), full):
        assert torch.allclose(p.grad, g, rtol=1e-6, atol=1e-7)


def test_backward_split_without_input_is_all_w():
    emb = torch.nn.Embedding(10, 4)
    out = emb(torch.tensor([1, 2, 3])).sum()
    dx, job = backward_input([out], [None], None, list(emb.parameters()))
    assert dx is None and emb.weight.grad is None
    job.run()
    assert emb.weight.grad is not None and float(emb.weight.grad.sum()) == 12.0


# ----------------------------------------------------------------------------- stages on one process

def _reference(cfg, mbs):
    torch.manual_seed(0)
    model = DeepseekV3(cfg)
    model.train()
    ref = copy.deepcopy(model)
    batch = {k: torch.cat([mb[k] for mb in mbs]) for k in mbs[0]}
    out = ref(batch["input_ids"], batch["labels"], mtp_lambda=0.3, balance_alpha=1e-2, return_logits=False)
    out.loss.backward()
    return model, ref, out


def _mbs(cfg, m, seq=10):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg.vocab_size, (m, seq + 1), generator=g)
    return [{"input_ids": ids[i:i + 1, :-1], "labels": ids[i:i + 1, 1:]} for i in range(m)]


@pytest.mark.parametrize("schedule,split,recompute", [("1f1b", False, "none"), ("dualpipev", True, "none"),
                                                      ("dualpipev", False, "none"), ("dualpipev", True, "full"),
                                                      ("dualpipev", True, "selective")])
def test_single_process_step_matches_model(schedule, split, recompute):
    """pp = 1: the whole op machinery (local hand-over between DualPipeV's two chunks, B/W split, also
    under activation recomputation) without communication reproduces the unsplit model's loss and
    gradients, and the expert counts (once per real forward)."""
    cfg = _cfg(4)
    mbs = _mbs(cfg, 3)
    model, ref, out = _reference(cfg, mbs)
    model.set_recompute(recompute)
    stages = build_stages(model, schedule, 0, 1)
    loss, aux = run_pipeline_step(schedule, stages, mbs, PipelineLoss(0.3, 1e-2, 1), split_backward=split)
    assert abs(float(loss) - float(out.loss.detach())) <= 1e-5 * abs(float(out.loss.detach()))
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert float((p.grad - q.grad).norm() / q.grad.norm()) <= 1e-5, n
    assert aux["expert_counts"].shape == (len(model.moe_layers()), cfg.n_routed_experts)
    for moe, moe_ref, c in zip(model.moe_layers(), ref.moe_layers(), aux["expert_counts"]):
        assert torch.equal(moe.tokens_per_expert, moe_ref.tokens_per_expert) and torch.equal(c, moe_ref.tokens_per_expert)


def test_stage_views_share_parameters_and_names():
    cfg = _cfg(6)
    model = DeepseekV3(cfg)
    full = dict(model.named_parameters())
    seen = {}
    for r in range(2):
        for st in build_stages(model, "dualpipev", r, 2):
            for n, p in st.named_parameters():
                assert full[n] is p, f"{n} is not the model's parameter"
                seen[n] = p
    assert set(seen) == set(full)
    from dsv3.parallel.pipeline import rank_module
    for r in range(2):
        stages = build_stages(model, "dualpipev", r, 2)
        held = dict(rank_module(stages).named_parameters())
        assert all(full[n] is p for n, p in held.items())
        assert set(held) == {n for st in stages for n, _ in st.named_parameters()}
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    stages = build_stages(model, "dualpipev", 1, 2)
    mine = stage_state_dict(stages)
    assert set(mine) <= set(sd) and any(k.startswith("layers.") for k in mine)
    with torch.no_grad():
        for p in stage_parameters(stages):
            p.zero_()
    load_stage_state_dict(stages, sd)
    assert all(torch.equal(v, sd[k]) for k, v in stage_state_dict(stages).items())


def test_token_weighted_micro_batches_match_trainer_accumulation():
    """The trainer weights micro-batch m by its share of target tokens; with ignored labels (-100) the
    pipeline's gradients equal sum_m w_m * grad(loss_m) of the unsplit model."""
    cfg = _cfg(4)
    mbs = _mbs(cfg, 4)
    mbs[1]["labels"] = mbs[1]["labels"].clone()
    mbs[1]["labels"][0, :5] = -100
    n = [int((mb["labels"] != -100).sum()) for mb in mbs]
    w = [k / sum(n) for k in n]
    torch.manual_seed(0)
    model = DeepseekV3(cfg)
    model.train()
    ref = copy.deepcopy(model)
    total = 0.0
    for mb, wm in zip(mbs, w):
        out = ref(mb["input_ids"], mb["labels"], mtp_lambda=0.3, balance_alpha=1e-2, return_logits=False)
        (out.loss * wm).backward()
        total += float(out.loss.detach()) * wm
    loss, _ = run_pipeline_step("dualpipev", build_stages(model, "dualpipev", 0, 1), mbs,
                                PipelineLoss(0.3, 1e-2, 1), weights=w)
    assert abs(float(loss) - total) <= 1e-5 * abs(total)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert float((p.grad - q.grad).norm() / q.grad.norm()) <= 1e-5, name
