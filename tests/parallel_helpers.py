"""Helpers for the data/expert-parallel tests: a gloo process launcher with a hang timeout, a small MoE
config, and one training step written twice, for one process (the reference) and for a mesh of ranks.

Workers live here (not in the test files) so that spawned processes import them by a stable module name.
"""
from __future__ import annotations

import io
import os
import queue
import socket
import traceback

import torch
import torch.multiprocessing as mp

from dsv3.config import ModelConfig, preset


def small_config(**changes) -> ModelConfig:
    """2 layers (1 dense + 1 MoE) + 1 MTP layer (MoE), 8 experts top-2 in 4 groups of 2; CPU-fast."""
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2,
                n_group=4, topk_group=2, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                qk_nope_head_dim=16, v_head_dim=16, num_attention_heads=2, num_key_value_heads=2,
                max_position_embeddings=64, num_nextn_predict_layers=1, initializer_range=0.05)
    base.update(changes)
    return preset("tiny").replace(**base)


def pipeline_config(layers: int = 8, **changes) -> ModelConfig:
    """``layers`` layers (first dense, rest MoE) + 1 MTP layer; 8 experts top-2; fast on CPU (pipeline tests)."""
    base = dict(vocab_size=256, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                num_hidden_layers=layers, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2,
                n_group=4, topk_group=2, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                qk_nope_head_dim=8, v_head_dim=8, num_attention_heads=2, num_key_value_heads=2,
                max_position_embeddings=64, num_nextn_predict_layers=1, initializer_range=0.05)
    base.update(changes)
    return preset("tiny").replace(**base)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _to_bytes(obj) -> bytes:
    # Plain bytes through the queue: torch's queue would share tensor storage by file descriptor, which
    # breaks once the sending process has exited.
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def _entry(rank, world_size, port, fn, args, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        q.put((rank, "ok", _to_bytes(fn(rank, world_size, *args))))
    except BaseException as e:  # report every failure kind to the parent, including UserError
        q.put((rank, "err", (type(e).__name__, str(e), traceback.format_exc())))
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 120.0) -> list:
    """Run fn(rank, world_size, *args) in world_size spawned processes (torchrun-style env); returns the
    results by rank. Raises TimeoutError if any rank does not report within ``timeout`` (a hang), killing the
    processes; results of failed ranks are ("err", (type name, message, traceback))."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, q), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, tuple] = {}
    try:
        import time
        deadline = time.monotonic() + timeout
        while len(results) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(results))} did not finish in "
                                   f"{timeout:.0f}s (hang?)")
            try:
                rank, status, value = q.get(timeout=left)
            except queue.Empty:
                continue
            results[rank] = (status, _from_bytes(value) if status == "ok" else value)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world_size)]


def unwrap(results: list) -> list:
    """The values of all ranks, or an AssertionError carrying the first failing rank's traceback."""
    for r, (status, value) in enumerate(results):
        if status != "ok":
            raise AssertionError(f"rank {r} failed: {value[0]}: {value[1]}\n{value[2]}")
    return [v for _, v in results]


# ---------------------------------------------------------------------------------- training steps

STEP = dict(lr=2e-3, clip=0.05, gamma=0.01, mtp_lambda=0.3, balance_alpha=1e-3)


def make_batches(cfg: ModelConfig, steps: int, batch: int, seq: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
        out.append((ids[:, :-1].contiguous(), ids[:, 1:].contiguous()))
    return out


def _train_cfg():
    from dsv3.train.config import TrainConfig
    return TrainConfig(lr=STEP["lr"], weight_decay=0.1, grad_clip=STEP["clip"])


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _biases(model) -> list:
    return [m.gate.e_score_correction_bias.clone() for m in model.moe_layers()]


def reference_run(cfg: ModelConfig, batches, seed: int = 0) -> dict:
    """One process, whole global batch per step: losses, grad norms, clipped grads, biases, final weights."""
    from dsv3.model import DeepseekV3
    from dsv3.train.balance import update_balance_biases
    from dsv3.train.optim import build_optimizer

    torch.manual_seed(seed)
    model = DeepseekV3(cfg)
    model.train()
    opt = build_optimizer(model, _train_cfg())
    rec = {"loss": [], "norm": [], "grads": [], "biases": [], "maxvio": []}
    for ids, labels in batches:
        out = model(ids, labels, mtp_lambda=STEP["mtp_lambda"], balance_alpha=STEP["balance_alpha"],
                    return_logits=False)
        out.loss.backward()
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], STEP["clip"])
        rec["loss"].append(float(out.loss.detach()))
        rec["norm"].append(float(norm))
        rec["grads"].append(_grads(model))
        opt.step()
        rec["maxvio"].append(update_balance_biases(model, STEP["gamma"]))
        rec["biases"].append(_biases(model))
        opt.zero_grad(set_to_none=True)
    rec["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    from dsv3.parallel.data_parallel import named_optimizer_state
    rec["opt_state"] = named_optimizer_state(opt, model)
    return rec


def parallel_worker(rank: int, world_size: int, cfg: ModelConfig, batches, parallel: dict, micro: int,
                    seed: int = 0) -> dict:
    """The same steps on a mesh: this rank's slice of each global batch in micro-batches, EP-sharded experts,
    bucketed gradient averaging, ZeRO-1 optimizer, global clipping, all-reduced balance counts."""
    from dsv3.model import DeepseekV3
    from dsv3.parallel import data_parallel as dp
    from dsv3.parallel import expert_parallel as ep
    from dsv3.parallel.mesh import init_distributed, model_config_for
    from dsv3.parallel.runtime import DataExpertParallel
    from dsv3.train.balance import update_balance_biases

    parallel = {"bucket_mb": 0.05, **parallel}       # small buckets: several in flight during backward
    mesh = init_distributed(parallel, cfg, device="cpu")
    cfg = model_config_for(cfg, mesh.config)
    torch.manual_seed(seed)
    model = DeepseekV3(cfg)                          # the same full initialization on every rank
    model.train()
    par = DataExpertParallel(model, mesh)
    experts = par.expert_params
    opt = par.build_optimizer(_train_cfg())
    rec = {"loss": [], "norm": [], "grads": [], "biases": [], "maxvio": [], "traffic": []}
    for ids, labels in batches:
        local = ids.shape[0] // mesh.dp
        sl = slice(mesh.dp_rank * local, (mesh.dp_rank + 1) * local)
        ids, labels = ids[sl], labels[sl]
        n_micro = local // micro
        total = 0.0
        pending = getattr(opt, "_pending", None)   # ZeRO-1 parameter broadcasts still in flight
        for i in range(n_micro):
            mb = slice(i * micro, (i + 1) * micro)
            last = i == n_micro - 1
            ctx = par.no_sync() if not last else _null()
            with ctx:
                if i == 0 and pending is not None:
                    rec.setdefault("pending_before_forward", []).append(len(pending))
                out = model(ids[mb], labels[mb], mtp_lambda=STEP["mtp_lambda"],
                            balance_alpha=STEP["balance_alpha"], return_logits=False)
                if i == 0 and pending is not None:
                    rec.setdefault("pending_after_forward", []).append(len(pending))
                (out.loss / n_micro).backward()
            total += float(out.loss.detach()) / n_micro
        overlapped = par.reducer._next if par.reducer is not None else 0   # buckets launched by backward hooks
        par.finish_gradients()
        rec.setdefault("overlapped", []).append((overlapped, len(par.reducer.buckets) if par.reducer else 0))
        if par.reducer is not None:   # gradients that live in their reduction bucket (grad_as_bucket_view)
            spans = [(b.buffer.data_ptr(), b.buffer.data_ptr() + b.buffer.numel() * b.buffer.element_size())
                     for b in par.reducer.buckets if b.buffer is not None]
            rec.setdefault("grads_in_buckets", []).append(sum(
                1 for p in model.parameters()
                if p.grad is not None and any(a <= p.grad.data_ptr() < e for a, e in spans)))
        norm = par.clip_grad_norm_(STEP["clip"])
        rec["loss"].append(par.global_mean(total))
        rec["norm"].append(float(norm))
        rec["grads"].append(_grads(model))
        opt.step()
        rec["maxvio"].append(update_balance_biases(model, STEP["gamma"], par.count_all_reduce))
        rec["biases"].append(_biases(model))
        rec["traffic"].append(par.traffic_stats())
        opt.zero_grad(set_to_none=True)
    rec["state"] = par.full_state_dict()
    rec["opt_state"] = opt.state_dict() if hasattr(opt, "parts") else dp.named_optimizer_state(opt, model)
    if hasattr(opt, "parts"):   # round trip: a fresh sharded optimizer loads it and saves the same thing
        fresh = dp.build_zero_optimizer(model, mesh, _train_cfg(), experts)
        fresh.load_state_dict(rec["opt_state"])
        again = fresh.state_dict()
        rec["opt_roundtrip"] = all(torch.equal(again["state"][n][k], v) for n, st in rec["opt_state"]["state"].items()
                                   for k, v in st.items()) and again["state"].keys() == rec["opt_state"]["state"].keys()
    rec["ep_rank"], rec["ep"] = mesh.ep_rank, mesh.ep
    rec["expert_names"] = sorted(ep.expert_parameter_names(model))
    rec["n_params"] = sum(1 for p in model.parameters() if p.requires_grad)
    rec["n_owned"] = sum(len(z.optim.state) for z in opt.parts) if hasattr(opt, "parts") else len(opt.state)
    return rec


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def layout_error_worker(rank: int, world_size: int, cfg: ModelConfig, parallel: dict):
    """Initialize with a bad layout; must raise UserError on every rank, before any rendezvous."""
    from dsv3.parallel.mesh import init_distributed
    init_distributed(parallel, cfg, device="cpu")
    return "no error"


# ------------------------------------------------------------------------------------- comparison

def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over the whole tensor (fp64)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_matches_reference(ref: dict, ranks: list[dict], tol: float = 1e-5) -> None:
    """Every rank reproduces the single-process run: losses, grad norms, clipped gradients (dense ones on
    every rank, expert ones reassembled from the shards of the first EP group), biases (exactly: they come
    from integer counts), and the final full state dict."""
    for r, rec in enumerate(ranks):
        for s, (lr_, lp) in enumerate(zip(ref["loss"], rec["loss"])):
            assert abs(lp - lr_) <= tol * abs(lr_), f"rank {r} step {s}: loss {lp} vs {lr_}"
        for s, (nr, np_) in enumerate(zip(ref["norm"], rec["norm"])):
            assert abs(np_ - nr) <= tol * abs(nr), f"rank {r} step {s}: grad norm {np_} vs {nr}"
        for s, (br, bp) in enumerate(zip(ref["biases"], rec["biases"])):
            for layer, (a, b) in enumerate(zip(bp, br)):
                assert torch.equal(a, b), f"rank {r} step {s} layer {layer}: bias {a} vs {b}"
        assert rec["maxvio"] == ref["maxvio"], f"rank {r}: MaxVio {rec['maxvio']} vs {ref['maxvio']}"
        for k, v in ref["state"].items():
            assert rel_err(rec["state"][k], v) <= tol, f"rank {r}: final {k} off by {rel_err(rec['state'][k], v)}"
        opt_ref, opt_got = ref["opt_state"]["state"], rec["opt_state"]["state"]
        assert opt_got.keys() == opt_ref.keys(), f"rank {r}: optimizer state names differ"
        for n, st in opt_ref.items():
            for k, v in st.items():
                assert rel_err(opt_got[n][k], v) <= tol, f"rank {r}: optimizer {n}.{k} off"
        assert rec.get("opt_roundtrip", True), f"rank {r}: optimizer state round trip failed"
    expert = set(ranks[0]["expert_names"])
    ep = ranks[0]["ep"]
    for s, g_ref in enumerate(ref["grads"]):
        for name, g in g_ref.items():
            # the ranks that hold this gradient after the reduction: all of them (all-reduce), or only the
            # rank that steps the parameter (reduce to owner); whoever holds it holds the same tensor
            if name in expert:   # one shard per EP rank, concatenated in EP order
                shards = []
                for e in range(ep):
                    held = [rk["grads"][s][name] for rk in ranks if rk["ep_rank"] == e and name in rk["grads"][s]]
                    assert held, f"step {s} {name}: no rank of EP shard {e} holds its gradient"
                    assert all(torch.equal(h, held[0]) for h in held), f"step {s} {name}: expert replicas differ"
                    shards.append(held[0])
                got = torch.cat(shards)
            else:
                held = [rk["grads"][s][name] for rk in ranks if name in rk["grads"][s]]
                assert held, f"step {s} {name}: no rank holds its gradient"
                got = held[0]
                assert all(torch.equal(h, got) for h in held), f"step {s} {name}: ranks differ"
            assert rel_err(got, g) <= tol, f"step {s} {name}: grad off by {rel_err(got, g)}"


# ------------------------------------------------------------------------------------ EP workers

def layout_errors_worker(rank: int, world_size: int, cases: list) -> list:
    """init_distributed with each bad (parallel, model changes) case; returns (error type, message) per case."""
    from dsv3.errors import UserError
    from dsv3.parallel.mesh import init_distributed
    out = []
    for parallel, changes in cases:
        try:
            init_distributed(parallel, small_config(**changes), device="cpu")
            out.append(("none", ""))
        except UserError as e:
            out.append(("UserError", str(e)))
    return out


def transport_worker(rank: int, world_size: int) -> dict:
    """Uneven all-to-all (with an empty split), FP8 bytes, and the autograd rule, on gloo."""
    import torch.distributed as dist
    from dsv3.parallel.transport import CollectiveTransport, all_to_all
    dist.init_process_group("gloo")
    t = CollectiveTransport(dist.group.WORLD)
    # rank r sends (r + 1) * (i + 1) rows to peer i, except nothing to itself when r == 0
    in_splits = [0 if (rank == 0 and i == 0) else (rank + 1) * (i + 1) for i in range(world_size)]
    out_splits = [0 if (rank == 0 and j == 0) else (j + 1) * (rank + 1) for j in range(world_size)]
    x = torch.cat([torch.full((n, 3), 100.0 * rank + i) for i, n in enumerate(in_splits)]).requires_grad_()
    y = all_to_all(x, t, in_splits, out_splits)
    w = torch.arange(y.numel(), dtype=torch.float32).view_as(y) + 1000 * rank
    (y * w).sum().backward()
    x8 = (torch.arange(sum(in_splits) * 3, dtype=torch.float32).view(-1, 3) / 7).to(torch.float8_e4m3fn)
    y8 = t.all_to_all(x8, in_splits, out_splits)
    return {"y": y.detach(), "w": w, "x_grad": x.grad, "in": in_splits, "out": out_splits, "x8": x8, "y8": y8}


def fp8_layer_worker(rank: int, world_size: int, cfg: ModelConfig, seed: int = 0) -> dict:
    """One MoE layer, EP over all ranks, FP8 dispatch vs full-precision dispatch on the same input: relative
    errors of the routed output, the input gradient and the expert weight gradients."""
    import copy
    from dsv3.model.moe import MoE
    from dsv3.parallel import expert_parallel as ep
    from dsv3.parallel.mesh import init_distributed
    mesh = init_distributed({"ep": world_size}, cfg, device="cpu")
    torch.manual_seed(seed)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.1)
    moe.shared_experts = None             # compare the routed part only
    x = torch.randn(4, 16, cfg.hidden_size, generator=torch.Generator().manual_seed(100 + rank))
    res = {}
    for mode in (False, True):
        m = ep.apply_expert_parallel(copy.deepcopy(moe), mesh.ep_group, fp8_dispatch=mode)
        xi = x.clone().requires_grad_()
        y, _ = m(xi)
        y.backward(torch.ones_like(y))
        res[mode] = (y.detach(), xi.grad, [p.grad for p in ep.expert_parameters(m)])
    (y0, gx0, gw0), (y1, gx1, gw1) = res[False], res[True]
    return {"out": rel_err(y1, y0), "x_grad": rel_err(gx1, gx0), "w_grad": max(rel_err(a, b) for a, b in zip(gw1, gw0))}


def state_roundtrip_worker(rank: int, world_size: int, cfg: ModelConfig) -> bool:
    """full_state_dict -> (perturb) -> load_full_state_dict restores the shards; full tensors equal the
    unsharded model's."""
    from dsv3.model import DeepseekV3
    from dsv3.parallel import expert_parallel as ep
    from dsv3.parallel.mesh import init_distributed
    mesh = init_distributed({"ep": world_size}, cfg, device="cpu")
    torch.manual_seed(0)
    model = DeepseekV3(cfg)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    ep.apply_expert_parallel(model, mesh.ep_group)
    full = ep.full_state_dict(model)
    same = all(torch.equal(full[k], v) for k, v in reference.items()) and full.keys() == reference.keys()
    with torch.no_grad():
        for p in ep.expert_parameters(model):
            p.zero_()
    ep.load_full_state_dict(model, reference)
    again = ep.full_state_dict(model)
    return same and all(torch.equal(again[k], v) for k, v in reference.items())
