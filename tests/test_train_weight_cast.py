"""train.weight_cast = "per_step": bf16 compute copies of the fp32 masters (dsv3.train.compute_weights).

References are written here by hand: a bf16 copy of the model (``_bf16_params``) run on the same micro-batches,
its bf16 gradients converted to fp32 and summed in fp32 after each micro-batch, the optimizer on fp32 weights.
On the CPU the trainer runs no autocast, so per_step runs the model in bf16 there.
Workers of the gloo tests live in this module (spawned children import it by name, as in test_parallel_pp.py).
"""
from __future__ import annotations

import collections
import copy
import json
from pathlib import Path

import pytest
import torch

from dsv3.config import preset
from dsv3.errors import UserError
from dsv3.model import DeepseekV3
from dsv3.train.compute_weights import ComputeWeights, resolve_weight_cast
from dsv3.train.config import RunConfig, apply_overrides, resolve
from dsv3.train.trainer import Trainer
from parallel_helpers import pipeline_config, rel_err, run_ranks, unwrap


def _bf16_params(model: DeepseekV3) -> DeepseekV3:
    """A copy whose parameters (not buffers: the balance biases stay fp32, as per_step leaves them) are bf16."""
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.data = p.data.to(torch.bfloat16)
    return ref


def _accumulate_fp32(model, acc: dict) -> None:
    """Move the bf16 gradients of ``model`` into fp32 sums (the reference of the per-step hook)."""
    for n, p in model.named_parameters():
        if p.grad is not None:
            acc[n] = p.grad.float() if n not in acc else acc[n] + p.grad.float()
            p.grad = None


# ------------------------------------------------------------------------------------------ mechanism

def test_two_micro_batches_accumulate_bf16_gradients_into_fp32_masters():
    cfg = preset("tiny").replace(num_hidden_layers=2, vocab_size=256)
    torch.manual_seed(0)
    m = DeepseekV3(cfg)
    m.train()
    ref = _bf16_params(m)
    names = [n for n, _ in m.named_parameters()]
    masters = [p for p in m.parameters()]
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    fired = collections.Counter()
    for n, p in m.named_parameters():   # as the data-parallel GradReducer registers its bucket hooks
        p.register_post_accumulate_grad_hook(lambda p, n=n: fired.update([n]))
    g = torch.Generator().manual_seed(1)
    mbs = [torch.randint(0, cfg.vocab_size, (2, 16), generator=g) for _ in range(2)]

    cw = ComputeWeights(m)
    assert cw.refresh() == len(names) and cw.refresh() == 0            # no needless second copy
    with cw.swapped_in():
        assert all(p.dtype == torch.bfloat16 for p in m.parameters())
        assert m.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32   # buffers untouched
        for i, ids in enumerate(mbs):
            m(ids, ids, return_logits=False).loss.backward()
            assert all(c.grad is None for c in cw.copies)               # moved out by the hook
            assert set(fired.values()) == {i + 1} and len(fired) == len(names)
    assert [p for p in m.parameters()] == masters                       # the masters are back, the same objects

    acc: dict = {}
    for ids in mbs:
        ref(ids, ids, return_logits=False).loss.backward()
        _accumulate_fp32(ref, acc)
    for n, p in m.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, n
        assert torch.equal(p.detach(), before[n]), n                    # forward/backward leave masters alone
        assert torch.equal(p.grad, acc[n]), n                           # bit for bit the fp32 sum of bf16 grads

    # refresh only after the masters changed, and then with the new values
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01)
    assert cw.refresh() == 0 and cw.refreshed == len(names)
    cw.mark_stale()
    assert cw.refresh() == len(names)
    assert all(torch.equal(c, p.detach().to(torch.bfloat16)) for c, p in zip(cw.copies, masters))
    with pytest.raises(RuntimeError, match="inside"):                   # an error inside still swaps back
        with cw.swapped_in():
            raise RuntimeError("inside")
    assert [p for p in m.parameters()] == masters and not cw.active


def test_pipeline_deferred_weight_gradients_reach_the_masters():
    """DualPipeV's split backward on one process (its W pass accumulates by hand, pipeline/backward.py): the
    master gradients are the token-weighted fp32 sums of the bf16 copy's gradients."""
    from dsv3.parallel.pipeline import PipelineLoss, build_stages, rank_module, run_pipeline_step
    cfg = pipeline_config(4)
    torch.manual_seed(0)
    model = DeepseekV3(cfg)
    model.train()
    ref = _bf16_params(model)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg.vocab_size, (3, 11), generator=g)
    mbs = [{"input_ids": ids[i:i + 1, :-1], "labels": ids[i:i + 1, 1:]} for i in range(3)]
    w = [0.5, 0.3, 0.2]
    stages = build_stages(model, "dualpipev", 0, 1)
    cw = ComputeWeights(rank_module(stages))
    cw.refresh()
    with cw.swapped_in():
        loss, _ = run_pipeline_step("dualpipev", stages, mbs, PipelineLoss(0.3, 1e-2, 1), weights=w,
                                    split_backward=True)
    acc: dict = {}
    total = 0.0
    for mb, wm in zip(mbs, w):
        out = ref(mb["input_ids"], mb["labels"], mtp_lambda=0.3, balance_alpha=1e-2, return_logits=False)
        (out.loss * wm).backward()
        total += float(out.loss.detach()) * wm
        _accumulate_fp32(ref, acc)
    assert abs(float(loss) - total) <= 1e-5 * abs(total)
    assert all(c.grad is None for c in cw.copies)
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, n
        # the pipeline's loss is the same sum in another association: bf16 gradients may round apart here and there
        assert rel_err(p.grad, acc[n]) <= 2e-2, (n, rel_err(p.grad, acc[n]))


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
    """The trainer's steps written out: a bf16 working copy refreshed from the fp32 masters each step, micro-batch
    losses weighted by their share of target tokens, bf16 gradients summed in fp32, clipping and AdamW on fp32."""
    from dsv3.data.loader import IGNORE_INDEX
    from dsv3.train import schedules
    from dsv3.train.optim import build_optimizer

    t = cfg.train
    master = DeepseekV3(cfg.model)
    master.load_state_dict(init)
    master.train()
    work = _bf16_params(master)
    opt = build_optimizer(master, t)
    params = dict(master.named_parameters())
    losses = []
    for step, batch in enumerate(batches):
        with torch.no_grad():
            for n, p in work.named_parameters():
                p.copy_(params[n])
        for group in opt.param_groups:
            group["lr"] = schedules.lr_at(step, t)
        n_target = int((batch["labels"] != IGNORE_INDEX).sum())
        total = torch.zeros(())
        acc: dict = {}
        for i in range(0, batch["input_ids"].shape[0], t.micro_batch_size):
            ids, labels = batch["input_ids"][i:i + 2], batch["labels"][i:i + 2]
            weight = 1 * int((labels != IGNORE_INDEX).sum()) / n_target
            out = work(ids, labels, mtp_lambda=schedules.mtp_lambda_at(step, t), balance_alpha=t.balance_alpha,
                       return_logits=False)
            (out.loss * (weight * 1.0)).backward()
            total = total + out.loss.detach().float() * weight
            _accumulate_fp32(work, acc)
        for n, p in params.items():
            p.grad = acc[n]
        torch.nn.utils.clip_grad_norm_(list(params.values()), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(total))
    return losses, master.state_dict()


@pytest.fixture(scope="module")
def straight(train_data, tmp_path_factory):
    """4 per_step steps in one go (bias_gamma 0: the biases stay zero, so the reference needs no bias update)."""
    run = tmp_path_factory.mktemp("per_step") / "run"
    rec: dict = {}
    state = _run(_cfg(["train.bias_gamma=0"]), run, train_data, record=rec)
    return run, state, rec


def test_trainer_per_step_matches_hand_written_reference(straight):
    run, state, rec = straight
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
    of two bf16 gradients is the same on one rank or over two: the same weights, bit for bit."""
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
    """PP=2 1F1B: the MTP embedding's gradient is summed over the two ranks from the fp32 masters (from the
    bf16 copies it would be zeros plus the peer's: losses off by ~2e-3, the embedding by 60%). The single process
    sums the main and MTP embedding gradients in bf16 inside autograd, the pipeline in fp32, so not bit for bit."""
    cfg, run, state, rec = unclipped
    ranks = _two_processes(cfg, {"pp": 2, "schedule": "1f1b"}, train_data, tmp_path / "run")
    a, b = _losses(run), _losses(tmp_path / "run")
    assert len(b) == 4 and all(abs(x - y) <= 3e-4 * abs(x) for x, y in zip(a, b)), (a, b)
    ev_a, ev_b = rec["final_eval"]["loss"], ranks[0]["eval"]["loss"]
    assert abs(ev_a - ev_b) <= 1e-3 * ev_a, (ev_a, ev_b)
    assert rel_err(ranks[0]["state"]["embed_tokens.weight"], state["embed_tokens.weight"]) <= 0.05
