"""Pipeline parallelism on gloo (CPU) against the single-process model: loss, every gradient, expert counts.

Each test spawns pp processes; a rank that fails or hangs fails the test (a timeout kills the ranks).
Workers live in this module: spawned children import it by name (pytest puts tests/ on sys.path, and
spawn passes sys.path to the children).
"""
from __future__ import annotations

import json

import torch

from dsv3.model import DeepseekV3
from parallel_helpers import pipeline_config as tiny_config, rel_err, run_ranks, unwrap

MTP_LAMBDA, ALPHA = 0.3, 1e-2


def micro_batches(cfg, m: int, b: int = 1, seq: int = 12, docs: bool = False, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(m):
        ids = torch.randint(0, cfg.vocab_size, (b, seq + 1), generator=g)
        mb = {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}
        if docs:   # two documents per row, split at a row-dependent point
            cut = torch.randint(3, seq - 3, (b, 1), generator=g)
            mb["doc_ids"] = (torch.arange(seq).expand(b, seq) >= cut).long()
        out.append(mb)
    return out


def reference(cfg, mbs: list[dict], seed: int = 0) -> dict:
    """The whole batch in one forward/backward of the unsplit model (the mean over equal micro-batches)."""
    torch.manual_seed(seed)
    model = DeepseekV3(cfg)
    model.train()
    batch = {k: torch.cat([mb[k] for mb in mbs]) for k in mbs[0]}
    out = model(batch["input_ids"], batch["labels"], doc_ids=batch.get("doc_ids"), mtp_lambda=MTP_LAMBDA,
                balance_alpha=ALPHA, return_logits=False)
    out.loss.backward()
    return {"loss": float(out.loss.detach()), "parts": {k: float(v.detach()) for k, v in out.losses.items()},
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            "counts": torch.stack([m.tokens_per_expert.clone() for m in model.moe_layers()]),
            "state": {k: v.clone() for k, v in model.state_dict().items()}}


# -------------------------------------------------------------------------------------- workers

def step_worker(rank, world, cfg, mbs, schedule, trace_dir=None, seed=0):
    """Build the full model (same seed as the reference), keep this rank's stages, run one step."""
    import torch.distributed as dist
    from dsv3.parallel.pipeline import PipelineLoss, build_stages, full_state_dict, run_pipeline_step
    dist.init_process_group("gloo")
    torch.manual_seed(seed)
    model = DeepseekV3(cfg)
    model.train()
    stages = build_stages(model, schedule, rank, world)
    loss, aux = run_pipeline_step(schedule, stages, mbs, PipelineLoss(MTP_LAMBDA, ALPHA, cfg.num_nextn_predict_layers),
                                  trace=trace_dir)
    grads = {}
    for st in stages:
        for n, p in st.named_parameters():
            if p.grad is not None:
                grads[n] = p.grad.clone()
    return {"loss": float(loss), "parts": {k: float(v) for k, v in aux["loss_parts"].items()},
            "grads": grads, "counts": aux["expert_counts"], "timings": aux["timings"],
            "chunks": [(st.chunk, list(st.layer_range)) for st in stages],
            "moe_buffers": torch.stack([m.tokens_per_expert.clone() for m in model.moe_layers()]),
            "full_state": full_state_dict(stages), "trace": aux["trace_path"]}


def layout_error_worker(rank, world, cases):
    """Every case must raise UserError on this rank without communicating (a hang fails the test)."""
    import torch.distributed as dist
    from dsv3.errors import UserError
    from dsv3.parallel.pipeline import PipelineLoss, build_stages, run_pipeline_step
    dist.init_process_group("gloo")
    out = []
    for cfg, schedule, m in cases:
        try:
            model = DeepseekV3(cfg)
            stages = build_stages(model, schedule, rank, world)
            run_pipeline_step(schedule, stages, micro_batches(cfg, m), PipelineLoss())
            out.append(("none", ""))
        except UserError as e:
            out.append(("UserError", str(e)))
    return out


# ---------------------------------------------------------------------------------------- checks

def check(ref: dict, ranks: list[dict], tol: float = 1e-5) -> None:
    for r, rec in enumerate(ranks):
        assert abs(rec["loss"] - ref["loss"]) <= tol * abs(ref["loss"]), f"rank {r}: {rec['loss']} vs {ref['loss']}"
        for k, v in ref["parts"].items():
            assert abs(rec["parts"][k] - v) <= tol * abs(v), f"rank {r} part {k}: {rec['parts'][k]} vs {v}"
        assert torch.equal(rec["counts"], ref["counts"]), f"rank {r}: expert counts differ"
    covered = set()
    for r, rec in enumerate(ranks):
        for n, g in rec["grads"].items():
            assert n in ref["grads"], f"rank {r}: gradient for {n} that the reference has none for"
            e = rel_err(g, ref["grads"][n])
            assert e <= tol, f"rank {r}: grad {n} off by {e:.2e}"
            covered.add(n)
    assert covered == set(ref["grads"]), f"gradients missing: {sorted(set(ref['grads']) - covered)[:5]}"
    # Expert selections: each MoE layer's buffer counts on exactly the rank that runs it.
    assert torch.equal(sum(rec["moe_buffers"] for rec in ranks), ref["counts"])
    for rec in ranks:   # the assembled checkpoint is the unsplit model's state dict
        assert rec["full_state"].keys() == ref["state"].keys()
        assert all(torch.equal(rec["full_state"][k], v) for k, v in ref["state"].items())


# ----------------------------------------------------------------------------------------- tests

def test_pp2_1f1b_matches_single_process():
    """1F1B, pp=2, 4 micro-batches with documents: the MTP embedding is tied across ranks 0 and 1."""
    cfg = tiny_config(4)
    mbs = micro_batches(cfg, 4, docs=True)
    ranks = unwrap(run_ranks(step_worker, 2, cfg, mbs, "1f1b", timeout=90))
    check(reference(cfg, mbs), ranks)
    assert [c for c, _ in ranks[1]["chunks"]] == [1] and "embed_tokens.weight" in ranks[1]["grads"]


def test_pp2_dualpipev_matches_single_process():
    """DualPipeV, pp=2 (4 chunks), 5 micro-batches (>= 2*pp, not a multiple of pp)."""
    cfg = tiny_config(6)
    mbs = micro_batches(cfg, 5)
    ranks = unwrap(run_ranks(step_worker, 2, cfg, mbs, "dualpipev", timeout=90))
    check(reference(cfg, mbs), ranks)
    assert [c for c, _ in ranks[0]["chunks"]] == [0, 3] and [c for c, _ in ranks[1]["chunks"]] == [1, 2]


def test_pp4_dualpipev_matches_single_process(tmp_path):
    """DualPipeV, pp=4 (8 chunks over 8 layers), 8 micro-batches, with Chrome traces."""
    cfg = tiny_config(8)
    mbs = micro_batches(cfg, 8, seq=8)
    ranks = unwrap(run_ranks(step_worker, 4, cfg, mbs, "dualpipev", str(tmp_path), timeout=120))
    check(reference(cfg, mbs), ranks)
    for r, rec in enumerate(ranks):
        events = json.loads(open(rec["trace"]).read())["traceEvents"]
        names = {e["name"][0] for e in events if e.get("ph") == "X"}
        assert {"F", "B", "W"} <= names, f"rank {r} trace lacks compute kinds: {names}"
        assert any(e["name"].startswith("send") for e in events) and any(e["name"].startswith("recv") for e in events)
        assert 0.0 <= rec["timings"]["bubble_fraction"] < 1.0


def test_impossible_layouts_fail_on_every_rank():
    """Too few layers for the chunks, and too few micro-batches for DualPipeV: UserError everywhere, no hang."""
    cases = [(tiny_config(3), "dualpipev", 4),     # 3 layers, 4 chunks
             (tiny_config(1), "1f1b", 2),          # 1 layer, 2 stages
             (tiny_config(4), "dualpipev", 3)]     # needs >= 4 micro-batches
    per_rank = unwrap(run_ranks(layout_error_worker, 2, cases, timeout=60))
    for r, res in enumerate(per_rank):
        kinds = [k for k, _ in res]
        assert kinds == ["UserError"] * 3, f"rank {r}: {res}"
        assert "lower parallel.pp" in res[0][1] and "micro-batches" in res[2][1]
