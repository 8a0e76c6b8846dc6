"""train.weight_cast = "per_step": autocast's weight casts done once per optimizer step (dsv3.train.compute_weights).

The reference is per_use under bf16 autocast: the same fp32 parameters run under
``torch.autocast("cpu", dtype=torch.bfloat16)``, autograd summing the fp32 gradients. per_step copies only the
weights autocast (or the model's own casts) would cast at use anyway, so it must compute exactly that: the same
losses and the same fp32 gradient sums in the same order, bit for bit.
Workers of the gloo tests live in this module (spawned children import it by name, as in test_parallel_pp.py).
"""
from __future__ import annotations

import collections
import contextlib
import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dsv3.config import preset
from dsv3.errors import UserError
from dsv3.model import DeepseekV3
from dsv3.model.layers import RMSNorm
from dsv3.model.moe import Experts, Router
from dsv3.train.compute_weights import PER_CALL, SWAP, ComputeWeights, cast_kind, resolve_weight_cast
from dsv3.train.config import RunConfig, apply_overrides, resolve
from dsv3.train.trainer import Trainer
from parallel_helpers import pipeline_config, rel_err, run_ranks, unwrap


def _autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _tiny(**changes) -> DeepseekV3:
    """2 layers (dense + MoE) + 1 MTP layer, biases on the attention projections (a Linear bias is copied too)."""
    cfg = preset("tiny").replace(num_hidden_layers=2, vocab_size=256, attention_bias=True, **changes)
    torch.manual_seed(0)
    m = DeepseekV3(cfg)
    m.train()
    return m


def _micro_batches(vocab: int, n: int = 2):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (2, 16), generator=g) for _ in range(n)]


def _per_use(model: DeepseekV3, mbs) -> list:
    """The reference: each micro-batch's forward under CPU bf16 autocast, its backward into the fp32 .grad."""
    losses = []
    for ids in mbs:
        with _autocast():
            out = model(ids, ids, return_logits=False)
        out.loss.backward()
        losses.append(out.loss.detach())
    return losses


def _assert_same_gradients(model, ref) -> None:
    bad = [n for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters())
           if p.grad is None or p.grad.dtype != torch.float32 or not torch.equal(p.grad, q.grad)]
    assert not bad, f"gradients not bit-identical to per_use under autocast: {bad}"


# ------------------------------------------------------------------------------------------ mechanism

def test_two_micro_batches_match_per_use_under_autocast_bit_for_bit():
    m = _tiny()
    ref = copy.deepcopy(m)
    names = [n for n, _ in m.named_parameters()]
    masters = list(m.parameters())
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    fired = collections.Counter()
    for n, p in m.named_parameters():   # as the data-parallel GradReducer registers its bucket hooks
        p.register_post_accumulate_grad_hook(lambda p, n=n: fired.update([n]))
    mbs = _micro_batches(m.config.vocab_size)

    cw = ComputeWeights(m)
    assert cw.refresh() == len(cw.masters) and cw.refresh() == 0          # no needless second copy
    losses = []
    with cw.swapped_in():
        for i, ids in enumerate(mbs):
            with _autocast():
                out = m(ids, ids, return_logits=False)
            out.loss.backward()
            losses.append(out.loss.detach())
            assert all(c.grad is None for c in cw.copies)                 # moved out by the hook
            # every master's hooks once per micro-batch: copied ones from the copy's hook or (head) autograd,
            # the others from autograd as always
            assert set(fired.values()) == {i + 1} and len(fired) == len(names)
    assert all(a is b for a, b in zip(m.parameters(), masters))          # the masters are back, the same objects
    assert not hasattr(m.lm_head.weight, "_dsv3_cast")

    ref_losses = _per_use(ref, mbs)
    assert all(torch.equal(a, b) for a, b in zip(losses, ref_losses)), (losses, ref_losses)
    _assert_same_gradients(m, ref)
    for n, p in m.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p.detach(), before[n]), n   # masters left alone

    # refresh only after the masters changed, and then with the new values
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01)
    assert cw.refresh() == 0 and cw.refreshed == len(cw.masters)
    cw.mark_stale()
    assert cw.refresh() == len(cw.masters)
    assert all(torch.equal(c, p.detach().to(torch.bfloat16)) for c, p in zip(cw.copies, cw.masters))
    with pytest.raises(RuntimeError, match="inside"):                     # an error inside still swaps back
        with cw.swapped_in():
            raise RuntimeError("inside")
    assert all(a is b for a, b in zip(m.parameters(), masters)) and not cw.active
    assert not hasattr(m.lm_head.weight, "_dsv3_cast")


@pytest.mark.parametrize("variant", [dict(chunks=1), dict(chunks=2), dict(dispatch="allgather")],
                         ids=["ep_alltoall", "ep_chunks2", "ep_allgather"])
def test_expert_parallel_paths_match_per_use_bit_for_bit(variant):
    """EP's expert modules on one process (a group of one): their own weight casts, also _ChunkedRouted's (which
    sums the chunks' weight gradients in fp32, so its weights are PER_CALL, not swapped)."""
    from dsv3.parallel.expert_parallel import ExpertParallelExperts, apply_expert_parallel
    from dsv3.parallel.transport import LocalTransport
    m = _tiny()
    apply_expert_parallel(m, None, transport=LocalTransport(), **variant)
    assert all(type(e) is ExpertParallelExperts for e in (m.layers[1].mlp.experts, m.mtp[0].mlp.experts))
    ref = copy.deepcopy(m)
    mbs = _micro_batches(m.config.vocab_size)
    cw = ComputeWeights(m)
    cw.refresh()
    want = PER_CALL if variant.get("chunks", 1) > 1 else SWAP
    assert cw.kinds[[id(p) for p in cw.masters].index(id(m.layers[1].mlp.experts.up_proj))] == want
    with cw.swapped_in():
        losses = _per_use(m, mbs)
    assert all(torch.equal(a, b) for a, b in zip(losses, _per_use(ref, mbs)))
    _assert_same_gradients(m, ref)


def test_per_step_copies_exactly_the_weights_autocast_casts():
    """The copied set: Linear weights and biases, the expert stacks (SWAP), the head (PER_CALL); never the
    embedding, a norm gain or the router, and the residual stream stays fp32 inside the model."""
    m = _tiny()
    cw = ComputeWeights(m)
    cw.refresh()
    names = {id(p): n for n, p in m.named_parameters()}
    got = {names[id(p)]: k for p, k in zip(cw.masters, cw.kinds)}
    want = {}
    for mod_name, mod in m.named_modules():
        if type(mod) is nn.Linear or type(mod) is Experts:
            for pn, _ in mod.named_parameters(recurse=False):
                want[f"{mod_name}.{pn}"] = PER_CALL if mod_name == "lm_head" else SWAP
    assert got == want
    assert {"layers.0.self_attn.o_proj.bias", "layers.1.mlp.experts.gate_proj", "mtp.0.eh_proj.weight",
            "layers.1.mlp.shared_experts.down_proj.weight"} <= set(got)
    left = set(names.values()) - set(got)
    assert left == {n for n in names.values()
                    if n == "embed_tokens.weight" or n.endswith("norm.weight") or n.endswith("mlp.gate.weight")}
    assert {"embed_tokens.weight", "norm.weight", "layers.1.mlp.gate.weight", "mtp.0.mlp.gate.weight",
            "layers.0.self_attn.q_a_layernorm.weight", "layers.0.self_attn.kv_a_layernorm.weight",
            "mtp.0.enorm.weight", "mtp.0.hnorm.weight", "mtp.0.shared_head.norm.weight"} <= left

    # every module's parameter and output dtypes, with the copies and under per_use
    def dtypes(swapped: bool) -> dict:
        seen = collections.defaultdict(set)

        def hook(name):
            def record(mod, args, out):
                seen[name, "weight"].update(p.dtype for p in mod.parameters(recurse=False))
                o = out[0] if isinstance(out, tuple) else out
                if isinstance(o, torch.Tensor):
                    seen[name, "out"].add(o.dtype)
                elif o is not None:   # the router's decision
                    seen[name, "out"].update({o.weight_TK.dtype, o.scores_TE.dtype})
            return record
        handles = [mod.register_forward_hook(hook(name)) for name, mod in m.named_modules() if name]
        ids = _micro_batches(m.config.vocab_size, 1)[0]
        with cw.swapped_in() if swapped else contextlib.nullcontext(), _autocast():
            if swapped:
                assert m.lm_head.weight.dtype == torch.float32 and m.lm_head.weight._dsv3_cast.dtype == torch.bfloat16
            m(ids, ids, return_logits=False)
        for h in handles:
            h.remove()
        return seen
    per_step, per_use = dtypes(True), dtypes(False)
    assert {k: v for k, v in per_step.items() if k[1] == "out"} == {k: v for k, v in per_use.items() if k[1] == "out"}
    f32, bf16 = {torch.float32}, {torch.bfloat16}
    mods = dict(m.named_modules())
    for name, mod in mods.items():
        if not name:
            continue
        if type(mod) in (nn.Embedding, RMSNorm, Router):
            assert per_step[name, "weight"] == f32, name
        elif type(mod) is nn.Linear and name != "lm_head" or type(mod) is Experts:
            assert per_step[name, "weight"] == bf16, name
            if type(mod) is nn.Linear:
                assert per_step[name, "out"] == bf16, name                       # the GEMMs run in bf16
        if type(mod) is Router:
            assert per_step[name, "out"] == f32, name                            # fp32 routing
    assert per_step["embed_tokens", "out"] == f32                               # fp32 residual stream ...
    assert all(per_step[f"layers.{i}", "out"] == f32 for i in range(len(m.layers)))   # ... through every block
    # (an MTP depth's stream starts as eh_proj's bf16 output under autocast, with or without copies)


def test_cast_kind_leaves_fp8_and_tied_weights_alone():
    from dsv3.fp8.linear import FP8Linear
    from dsv3.parallel.expert_parallel import ExpertParallelExperts
    from dsv3.parallel.transport import LocalTransport
    assert cast_kind(nn.Linear(4, 4), "q_b_proj") == SWAP and cast_kind(nn.Linear(4, 4), "lm_head") == PER_CALL
    assert cast_kind(FP8Linear(4, 4), "q_b_proj") is None
    assert cast_kind(nn.Embedding(4, 4), "embed_tokens") is None and cast_kind(RMSNorm(4), "norm") is None
    cfg = preset("tiny").replace(num_hidden_layers=2, vocab_size=256)
    experts = Experts(cfg)
    assert cast_kind(experts, "experts") == SWAP
    assert cast_kind(ExpertParallelExperts(experts, LocalTransport()), "experts") == SWAP
    assert cast_kind(ExpertParallelExperts(experts, LocalTransport(), chunks=2), "experts") == PER_CALL
    experts.fp8_recipe = object()
    assert cast_kind(experts, "experts") is None
    assert cast_kind(ExpertParallelExperts(experts, LocalTransport()), "experts") is None
    # a head tied to the embedding is the embedding's weight too, whose lookup autocast does not cast
    m = _tiny()
    m.lm_head.weight = m.embed_tokens.weight
    assert all(p is not m.embed_tokens.weight for p in ComputeWeights(m).masters)


def test_pipeline_deferred_weight_gradients_match_per_use_bit_for_bit():
    """DualPipeV's split backward on one process (its W pass accumulates by hand, pipeline/backward.py), against
    the same pipeline step under autocast without copies."""
    from dsv3.parallel.pipeline import PipelineLoss, build_stages, rank_module, run_pipeline_step
    cfg = pipeline_config(4)
    torch.manual_seed(0)
    model = DeepseekV3(cfg)
    model.train()
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg.vocab_size, (3, 11), generator=g)
    mbs = [{"input_ids": ids[i:i + 1, :-1], "labels": ids[i:i + 1, 1:]} for i in range(3)]
    w = [0.5, 0.3, 0.2]

    def step(m, cw=None):
        stages = build_stages(m, "dualpipev", 0, 1)
        if cw is not None:
            cw = cw(rank_module(stages))
            cw.refresh()
        with cw.swapped_in() if cw is not None else contextlib.nullcontext():
            loss, _ = run_pipeline_step("dualpipev", stages, mbs, PipelineLoss(0.3, 1e-2, 1), weights=w,
                                        split_backward=True, forward_context=_autocast)
        return loss, cw

    loss, cw = step(model, ComputeWeights)
    ref_loss, _ = step(ref)
    assert len(cw.masters) > 0 and all(c.grad is None for c in cw.copies)
    assert torch.equal(loss, ref_loss), (loss, ref_loss)
    _assert_same_gradients(model, ref)


# ------------------------------------------------------------------------------------------- config

def test_weight_cast_values_and_resolution():
    assert resolve({}).train.weight_cast == "auto"
    with pytest.raises(UserError, match=r"train.weight_cast = 'always' is invalid: use one of 'auto', 'per_step', "
                                         r"'per_use'"):
        resolve(apply_overrides({}, ['train.weight_cast="always"']))
    for precision in ("fp8", "fp32"):
        with pytest.raises(UserError, match=rf"'per_step' needs train.precision = 'bf16', not '{precision}'.*"
                                            r"set train.weight_cast = 'auto' or 'per_use'"):
            resolve(apply_overrides({}, [f'train.precision="{precision}"', 'train.weight_cast="per_step"']))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_weight_cast("auto", "bf16", cuda) == "per_step"
    assert resolve_weight_cast("auto", "bf16", cpu) == "per_use"
    assert resolve_weight_cast("auto", "fp8", cuda) == resolve_weight_cast("auto", "fp32", cuda) == "per_use"
    assert resolve_weight_cast("per_step", "bf16", cpu) == "per_step"
    assert resolve_weight_cast("per_use", "bf16", cuda) == "per_use"
    # a run saved before the key existed trained with autocast's casts, and resumes with them
    d = resolve({}).to_dict()
    assert RunConfig.from_saved(d).train.weight_cast == "auto"
    del d["train"]["weight_cast"]
    assert RunConfig.from_saved(d).train.weight_cast == "per_use"


# ------------------------------------------------------------------------------------------ trainer

BASE = ["model.vocab_size=512", "model.num_hidden_layers=2", "train.seq_len=32", "train.batch_size=4",
        "train.micro_batch_size=2", "train.tensorboard=false", "train.peak_tflops=1.0", "train.warmup_steps=1",
        "train.eval_batches=1", "train.precision=\"bf16\"", "train.weight_cast=\"per_step\"", "train.device=\"cpu\"",
        "train.sample_tokens=0", "train.lr=1e-2", "train.steps=4", "train.expert_load_every=0"]


def _cfg(extra=()):
    return resolve(apply_overrides({}, BASE + list(extra)))


def _losses(run_dir: Path) -> list:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run(cfg, run_dir: Path, data, until=None, resume=None, record=None) -> dict:
    """Train; returns the final state dict (and fills ``record`` with what the checks below need)."""
    run_dir.mkdir(exist_ok=True)
    tr = Trainer(cfg, run_dir, data, resume=resume, quiet=True)
    try:
        if record is not None:
            record["init"] = {k: v.clone() for k, v in tr.model.state_dict().items()}
            record["autocast"] = tr.autocast
            batches = record["batches"] = []
            next_batch = tr.loader.next_batch
            tr.loader.next_batch = lambda: batches.append(next_batch()) or batches[-1]
        assert tr.train(until=until) == 0
        if record is not None:
            record["refreshed"] = tr.compute.refreshed
            record["n_copies"] = len(tr.compute.copies)
            record["final_eval"] = tr.final_eval
            assert all(p.dtype == torch.float32 for p in tr.model.parameters())
        return {k: v.clone() for k, v in tr.model.state_dict().items()}
    finally:
        tr.close()


def _reference_steps(cfg, init: dict, batches: list) -> tuple[list, dict]:
    """The trainer's steps written out with per_use: the fp32 model under CPU bf16 autocast, micro-batch losses
    weighted by their share of target tokens, autograd summing the fp32 gradients, clipping and AdamW."""
    from dsv3.data.loader import IGNORE_INDEX
    from dsv3.train import schedules
    from dsv3.train.optim import build_optimizer

    t = cfg.train
    model = DeepseekV3(cfg.model)
    model.load_state_dict(init)
    model.train()
    opt = build_optimizer(model, t)
    losses = []
    for step, batch in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = schedules.lr_at(step, t)
        n_target = int((batch["labels"] != IGNORE_INDEX).sum())
        total = torch.zeros(())
        for i in range(0, batch["input_ids"].shape[0], t.micro_batch_size):
            ids, labels = batch["input_ids"][i:i + 2], batch["labels"][i:i + 2]
            weight = 1 * int((labels != IGNORE_INDEX).sum()) / n_target
            with _autocast():
                out = model(ids, labels, mtp_lambda=schedules.mtp_lambda_at(step, t), balance_alpha=t.balance_alpha,
                            return_logits=False)
            (out.loss * (weight * 1.0)).backward()
            total = total + out.loss.detach().float() * weight
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(total))
    return losses, model.state_dict()


@pytest.fixture(scope="module")
def straight(train_data, tmp_path_factory):
    """4 per_step steps in one go (bias_gamma 0: the biases stay zero, so the reference needs no bias update)."""
    run = tmp_path_factory.mktemp("per_step") / "run"
    rec: dict = {}
    state = _run(_cfg(["train.bias_gamma=0"]), run, train_data, record=rec)
    return run, state, rec


def test_trainer_per_step_matches_per_use_under_autocast_bit_for_bit(straight):
    run, state, rec = straight
    assert rec["autocast"] == torch.bfloat16        # per_step runs under autocast on the CPU too
    cfg = _cfg(["train.bias_gamma=0"])
    prev = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)    # as the trainer runs on the CPU
    try:
        losses, ref_state = _reference_steps(cfg, rec["init"], rec["batches"])
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
    assert _losses(run) == losses                                  # bit for bit
    for k, v in ref_state.items():
        assert torch.equal(state[k], v), k
    # one cast at the start, one after each of the 4 optimizer steps (the last one for the final evaluation)
    assert rec["refreshed"] == rec["n_copies"] * 5
    assert rec["final_eval"]["tokens"] > 0 and rec["final_eval"]["loss"] > 0


def test_per_step_resume_is_exact(train_data, tmp_path):
    """2 + 2 steps with a checkpoint in between: the 4-step run's losses, weights and balance biases, bit for bit."""
    cfg = _cfg(["train.bias_gamma=0.01", "train.eval_batches=0"])
    full = _run(cfg, tmp_path / "a", train_data)
    _run(cfg, tmp_path / "b", train_data, until=2)
    from dsv3.train import checkpoint
    ckpt = checkpoint.list_checkpoints(tmp_path / "b")[-1]
    assert ckpt.name == "step_000002"
    assert all(v.dtype != torch.bfloat16 for v in checkpoint.load_checkpoint(ckpt)["model"].values())
    resumed = _run(cfg, tmp_path / "b", train_data, resume=ckpt)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b") and len(_losses(tmp_path / "b")) == 4
    assert any(float(v.abs().sum()) > 0 for k, v in full.items() if k.endswith("e_score_correction_bias"))
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


# --------------------------------------------------------------------------------- several processes

def trainer_worker(rank: int, world: int, cfg, data: str, run_dir: str) -> dict:
    """A Trainer under gloo (the layout from cfg.parallel); its logged losses, final eval, final weights."""
    tr = Trainer(cfg, Path(run_dir), Path(data), quiet=True)
    launched = []
    if tr.layout.par is not None and tr.layout.par.reducer is not None and tr.layout.pp == 1:
        reducer, finish = tr.layout.par.reducer, tr.layout.finish_gradients

        def finish_and_count():   # buckets launched by the backward's hooks, before finish() launches the rest
            launched.append((reducer._next, len(reducer.buckets)))
            finish()
        tr.layout.finish_gradients = finish_and_count
    try:
        assert tr.train() == 0
        return {"eval": tr.final_eval, "state": tr.layout.model_state(tr.model),
                "deferred": tr._refresh_in_forward, "launched": launched}
    finally:
        tr.close()


@pytest.fixture(scope="module")
def unclipped(train_data, tmp_path_factory):
    """The single-process per_step run the two-process layouts are compared with. No clipping: its global norm
    sums squares in another order on several ranks, and the last-ulp difference then grows through bf16 routing."""
    run = tmp_path_factory.mktemp("unclipped") / "run"
    rec: dict = {}
    cfg = _cfg(["train.grad_clip=0", "train.bias_gamma=0.01"])
    return cfg, run, _run(cfg, run, train_data, record=rec), rec


def _two_processes(cfg, layout, train_data, out: Path) -> list:
    cfg = copy.deepcopy(cfg)
    cfg.parallel = {**cfg.parallel, **layout}
    out.mkdir()
    return unwrap(run_ranks(trainer_worker, 2, cfg, str(train_data), str(out), timeout=120))


def test_data_parallel_zero1_matches_one_process_bit_for_bit(unclipped, train_data, tmp_path):
    """DP=2 with ZeRO-1's defaults: the copies refresh as the overlapped parameter sync lands the updated
    masters in the next forward, and the reducer's bucket hooks fire from the copies' hooks, so every bucket is
    launched during the backward. Each rank runs one of the single process's two micro-batches and the fp32 sum
    of two gradients is the same on one rank or over two: the same weights, bit for bit."""
    cfg, run, state, rec = unclipped
    ranks = _two_processes(cfg, {"dp": 2}, train_data, tmp_path / "run")
    a, b = _losses(run), _losses(tmp_path / "run")
    assert len(b) == 4 and all(abs(x - y) <= 1e-6 * abs(x) for x, y in zip(a, b)), (a, b)   # mean of rank means
    assert abs(rec["final_eval"]["loss"] - ranks[0]["eval"]["loss"]) <= 1e-6 * rec["final_eval"]["loss"]
    for k, v in state.items():
        assert torch.equal(ranks[0]["state"][k], v), k
    for r in ranks:
        assert r["deferred"] and r["launched"] and all(n == total > 1 for n, total in r["launched"])


def test_pipeline_1f1b_matches_one_process(unclipped, train_data, tmp_path):
    """PP=2 1F1B: the MTP embedding's gradient is summed over the two ranks after the step (sync_tied_grads),
    where the single process adds the main and MTP embedding gradients micro-batch by micro-batch: another
    association of the same fp32 sums, so close but not bit for bit."""
    cfg, run, state, rec = unclipped
    ranks = _two_processes(cfg, {"pp": 2, "schedule": "1f1b"}, train_data, tmp_path / "run")
    a, b = _losses(run), _losses(tmp_path / "run")
    assert len(b) == 4 and all(abs(x - y) <= 3e-4 * abs(x) for x, y in zip(a, b)), (a, b)
    ev_a, ev_b = rec["final_eval"]["loss"], ranks[0]["eval"]["loss"]
    assert abs(ev_a - ev_b) <= 1e-3 * ev_a, (ev_a, ev_b)
    assert rel_err(ranks[0]["state"]["embed_tokens.weight"], state["embed_tokens.weight"]) <= 0.05
