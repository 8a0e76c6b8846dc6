"""Distributed training measured end to end through `dsv3 train` itself, in one session on one machine.

Runs, on the same data and per-GPU batch: one process (the baseline), DP=2, EP=2 (dp=2), and DualPipeV PP=2
with >= 8 micro-batches and its Chrome trace; then NCCL/gloo `all_to_all_single` alone at the message sizes EP
dispatch+combine sent, and the step-time simulator's prediction for the measured layouts. Prints the ratios
and writes `<out>/distributed.json` with the issue's headline names.

    PYTHONPATH=src python3 benchmarks/distributed.py --out $OUT                       # 2 GPUs, small preset
    PYTHONPATH=src python3 benchmarks/distributed.py --out /tmp/d --device cpu --preset tiny --steps 6   # smoke test
    PYTHONPATH=src python3 benchmarks/distributed.py --out $OUT --rates rates.json    # simulator on measured rates

The simulator's predictions (``dsv3.plan.step`` with ``trainer_options``: what ``dsv3 train`` runs, same
precision, recompute, micro-batch, accumulation and MTP as the measured runs) use the ``h100`` catalogue, or
with ``--rates`` a JSON written by ``benchmarks/measure_rates.py`` on this machine on top of it:
``sim_rel_err_1gpu`` (one GPU), ``sim_rel_err_dp2`` and ``sim_rel_err_2gpu`` (EP=2).

Scaling = (2-process tokens/s) / (2 x 1-process tokens/s) at the same per-GPU batch. Tokens/s per step come from
metrics.jsonl (median after warm-up). Exposed communication of the pipeline run is the host-measured receive
wait over the step (an upper bound on GPU: host waits include kernel queueing), bubble is the schedule's idle
fraction as the runtime measures it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sh(cmd: list[str], env: dict | None = None, timeout: int = 1800) -> subprocess.CompletedProcess:
    print("$", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        print(r.stdout[-3000:], r.stderr[-5000:], sep="\n", flush=True)
        raise SystemExit(f"command failed ({r.returncode})")
    return r


def prepare(out: Path, vocab: int) -> Path:
    data = out / "data"
    if not (data / "meta.json").exists():
        src = Path(sysconfig.get_paths()["stdlib"])
        sh([sys.executable, "-m", "dsv3", "prepare", str(src / "json"), str(src / "email"), str(src / "asyncio"),
            str(src / "unittest"), "--ext", "py", "--vocab-size", str(vocab), "--out", str(data), "--no-progress"])
    return data


def train(name: str, out: Path, data: Path, nproc: int, common: list[str], extra: list[str]) -> dict:
    """Run `dsv3 train` as a user would, or reuse out/NAME/result.json from an earlier --runs call."""
    run = out / name
    saved = run / "result.json"
    if name not in RUNS and saved.exists():
        return json.loads(saved.read_text())
    steps, median_from = RUN_STEPS.get(name, (None, MEDIAN_FROM))
    profile_step = PROFILE_STEP
    if steps is not None:   # a run with its own length (--runs NAME:STEPS:FROM); the later --set wins
        profile_step = steps if PROFILE_STEP == STEPS else PROFILE_STEP      # the last step stays the last
        extra = [*extra, "--set", f"train.steps={steps}", "--set", f"train.profile_step={profile_step}"]
    args = ["-m", "dsv3", "train", "--data", str(data), "--out", str(run), "--force", "--quiet", *common, *extra]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29400 + nproc), *args]
    t = time.perf_counter()
    sh(cmd, env={"OMP_NUM_THREADS": "4"})
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = median_from - 1                    # steps 1..median_from-1 are warm-up (compile, allocator, router)
    if len(recs) <= first + 1:
        raise SystemExit(f"{name}: {len(recs)} steps logged, too few for medians from step {median_from}; "
                         "raise --steps or lower --median-from")
    timed = recs[first:]
    timed = [r for r in timed if r.get("step") != profile_step] or timed   # the profiled step is not a sample
    res = {"wall_s": time.perf_counter() - t, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
           "step_s": statistics.median(r["step_time_s"] for r in timed), "losses": [r["loss"] for r in recs],
           "steps": len(recs), "median_from": median_from}
    for key in ("ep_bytes_sent", "ep_recv_imbalance", "pp_bubble_fraction", "pp_recv_wait_s", "pp_step_s"):
        vals = [r[key] for r in timed if key in r]
        if vals:
            res[key] = statistics.median(vals)
    print(f"[{name}] {res['tokens_per_s']:,.0f} tokens/s, step {res['step_s'] * 1e3:.1f} ms", flush=True)
    saved.write_text(json.dumps(res) + "\n")
    return res


RUNS: set[str] = set()  # the runs this call makes; the others come from earlier calls' result.json
RUN_STEPS: dict[str, tuple[int, int]] = {}   # run -> (steps, first step of the medians), from --runs NAME:S:F
PROFILE_STEP = 0        # the step each run profiles (left out of the medians)
MEDIAN_FROM = 4         # the first step the medians take (--median-from)
STEPS = 20              # --steps


A2A = r'''
import os, sys, time, torch, torch.distributed as dist
nbytes = int(sys.argv[1]); reps = int(sys.argv[2])
cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
dev = torch.device(f"cuda:{rank}") if cuda else torch.device("cpu")
if cuda: torch.cuda.set_device(dev)
n = max(nbytes // 2 // world * world, world)
x = torch.randn(n, device=dev).to(torch.bfloat16); y = torch.empty_like(x)
for _ in range(3): dist.all_to_all_single(y, x)
if cuda: torch.cuda.synchronize()
dist.barrier(); t = time.perf_counter()
for _ in range(reps): dist.all_to_all_single(y, x)
if cuda: torch.cuda.synchronize()
dt = (time.perf_counter() - t) / reps
if rank == 0: print("A2A_SECONDS", dt)
dist.destroy_process_group()
'''


def plain_all_to_all(out: Path, peer_bytes: float, nproc: int) -> float:
    """Seconds for one even all_to_all_single that sends `peer_bytes` to the OTHER ranks (bf16 payload).

    EP's ``ep_bytes_sent`` counts bytes to other ranks only, so the plain buffer is peer_bytes * n/(n-1): with
    an even split 1/n of it stays on the rank. (Before 2026-11-26 session 5 the buffer was peer_bytes itself,
    so the plain transfer moved half the cross-rank bytes it was credited with on two ranks.)"""
    script = out / "a2a.py"
    script.write_text(A2A)
    nbytes = peer_bytes * nproc / (nproc - 1)
    r = sh([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", "29481",
            str(script), str(int(nbytes)), "20"])
    return float(next(line.split()[1] for line in r.stdout.splitlines() if line.startswith("A2A_SECONDS")))


def ep_exchange(out: Path, args, seq: int) -> dict | None:
    """benchmarks/ep_exchange.py on 2 processes at the EP=2 run's micro-batch (its JSON), or None if it failed."""
    d = out / "ep_exchange"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ep_exchange.py"), "--out", str(d), "--ranks", "2",
                        "--tokens", str(args.micro * seq), "--preset", args.preset],
                       capture_output=True, text=True, timeout=600)
    print(r.stdout[-3000:], flush=True)
    if r.returncode != 0 or not (d / "ep_exchange.json").exists():
        print(f"ep_exchange failed (rc {r.returncode}): {r.stderr[-1500:]}", flush=True)
        return None
    return json.loads((d / "ep_exchange.json").read_text())


def layer_rank_imbalance(path: Path, ep: int) -> float | None:
    """Mean over MoE layers of (busiest EP rank's routed copies / mean) from the last record of an
    expert_load.jsonl (rank 0's counts; experts are split rank-major, E/ep per rank): the per-layer wait for
    the slower rank that a whole-step aggregate like ep_recv_imbalance averages away."""
    if not path.exists():
        return None
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if not lines:
        return None
    counts = json.loads(lines[-1])["counts"]
    ratios = []
    for c in counts:
        per = len(c) // ep
        loads = [sum(c[r * per:(r + 1) * per]) for r in range(ep)]
        mean = sum(loads) / ep
        if mean > 0:
            ratios.append(max(loads) / mean)
    return sum(ratios) / len(ratios) if ratios else None


def simulate(res: dict, args, seq: int, one: dict, dp2: dict | None, ep2: dict | None, out: Path) -> None:
    """The step-time simulator for the measured layouts, with the trainer's own costs (trainer_options)."""
    import torch

    from dsv3.config import preset
    from dsv3.parallel.mesh import ParallelConfig
    from dsv3.plan.rates import load_rates
    from dsv3.plan.step import predict_step, trainer_options
    from dsv3.train.compute_weights import resolve_weight_cast
    from dsv3.train.config import TrainConfig

    t = TrainConfig()  # distributed.py leaves recompute, bf16_moments and precision at the trainer defaults
    pc = ParallelConfig()  # ... and fp8_dispatch, ep_chunks at the [parallel] defaults
    cfg = preset(args.preset)
    # The all-to-all rate measured in THIS call, on this machine, at the EP message size, overrides the rates
    # file's: the 2 x H200 machines lent on different days measured 270 GB/s (session 3) and 115 GB/s (session 5)
    # for the same 75 MB to the peer, and the EP run's own NCCL kernels agreed with the latter.
    rates = load_rates("h100", args.rates, nvlink_gbps=res.get("a2a_plain_gbps"))
    res["sim_rates"] = rates.name
    res["sim_nvlink_gbps"] = rates.nvlink_gbps
    # the weight casts the runs made: 'auto' resolved as the trainer resolves it (per_step on CUDA)
    weight_cast = resolve_weight_cast(t.weight_cast, t.precision, torch.device(args.device))
    res["sim_options"] = {"precision": t.precision, "recompute": t.recompute, "bf16_moments": t.bf16_moments,
                          "weight_cast": weight_cast,
                          "fp8_dispatch": pc.fp8_dispatch, "ep_chunks": pc.ep_chunks,
                          "micro_batch": args.micro, "microbatches": args.accum, "seq": seq,
                          "mtp_layers": cfg.num_nextn_predict_layers}

    def pred(layout, ep, dp, **kw):
        opts = trainer_options(t.precision, t.recompute, ep=ep, dp=dp, bf16_moments=t.bf16_moments,
                               fp8_dispatch=pc.fp8_dispatch, ep_chunks=pc.ep_chunks,
                               overlap_param_sync=pc.overlap_param_sync, reduce_to_owner=pc.reduce_to_owner,
                               grad_as_bucket_view=pc.grad_as_bucket_view, weight_cast=weight_cast, **kw)
        return predict_step(cfg, layout, rates, micro_batch=args.micro, seq_len=seq, microbatches=args.accum,
                            schedule="1f1b", options=opts)["step_s"]

    res["sim_step_s_1gpu"] = pred("pp=1,ep=1,dp=1", 1, 1)
    res["sim_rel_err_1gpu"] = (res["sim_step_s_1gpu"] - one["step_s"]) / one["step_s"]
    if dp2:
        res["sim_step_s_dp2"] = pred("pp=1,ep=1,dp=2", 1, 2)
        res["sim_rel_err_dp2"] = (res["sim_step_s_dp2"] - dp2["step_s"]) / dp2["step_s"]
    if ep2:
        # the routed experts wait for the busier EP rank in every layer: the per-layer imbalance from the
        # logged expert counts (step 10) when there is one, else the run's whole-step receive imbalance
        per_layer = layer_rank_imbalance(out / "ep2" / "expert_load.jsonl", 2) or \
            layer_rank_imbalance(out / "one" / "expert_load.jsonl", 2)
        imb = max(1.0, per_layer or ep2.get("ep_recv_imbalance", 1.0))
        res["sim_expert_imbalance"] = imb
        res["sim_expert_imbalance_source"] = "per-layer, expert_load.jsonl" if per_layer else "ep_recv_imbalance"
        from dsv3.parallel.expert_parallel import resolve_dispatch
        mode = resolve_dispatch(pc.ep_dispatch, 2, cfg.num_experts_per_tok, pc.fp8_dispatch, pc.ep_chunks,
                                t.precision == "fp8")
        res["sim_ep_dispatch"] = mode
        res["sim_step_s_ep2"] = pred("pp=1,ep=2,dp=2", 2, 2, expert_imbalance=imb, ep_dispatch=mode)
        res["sim_rel_err_2gpu"] = (res["sim_step_s_ep2"] - ep2["step_s"]) / ep2["step_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--steps", type=int, default=20,
                    help="steps per run; tokens/s are the median of steps 4 and later (8 steps left 5 samples, "
                         "and single slow steps moved DP=2 by 4%%)")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro", type=int, default=2, help="per-GPU micro-batch (sequences)")
    ap.add_argument("--accum", type=int, default=4, help="micro-batches per GPU per step (PP uses 2x this)")
    ap.add_argument("--data", default=None, help="a prepared data directory (default: prepare a stdlib corpus)")
    ap.add_argument("--rates", default=None, help="rates JSON from benchmarks/measure_rates.py (on top of the h100 "
                    "catalogue) for the simulator's predictions; default: the catalogue alone")
    ap.add_argument("--profile-step", type=int, default=-1,
                    help="the step each run profiles (kernel tables in OUT/NAME/profile/); -1 (default) = the last "
                         "step, 0 = none. The profiled step is left out of the medians. Until session 10 it was "
                         "step 6, and the steps after it ran slower in some EP runs (the profiler's garbage)")
    ap.add_argument("--runs", default="one,dp2,ep2,pp2_dualpipev",
                    help="which runs to make now (also dp2_sync: DP=2 with parallel.overlap_param_sync, "
                         "reduce_to_owner and grad_as_bucket_view off; dp2_allreduce: reduce_to_owner off; one_cg, "
                         "dp2_cg, ep2_cg: train.compile_mode = 'reduce-overhead'; ep2_fp8d, ep2_cg_fp8d: "
                         "parallel.fp8_dispatch on; one_fbo, dp2_fbo, ep2_fbo, ep2_fbo_fp8d: "
                         "parallel.fb_overlap on; one_gc50, ep2_gc50: train.gc_every = 50; ep2_ag, ep2_ag_cg: "
                         "parallel.ep_dispatch = 'allgather', the second with CUDA graphs (ep2 itself runs 'auto', = "
                         "'allgather' at ep 2); ep2_a2a, ep2_a2a_cg: 'alltoall'; one_pu, one_cg_pu, ep2_pu, ep2_cg_pu, "
                         "dp2_pu: train.weight_cast = 'per_use', one_ps, one_cg_ps: 'per_step'; one_bm, one_cg_bm: "
                         "train.bf16_moments on; one_fp8, one_cg_fp8: train.precision = 'fp8'); the others are read from "
                         "OUT/NAME/result.json of an earlier call (e.g. the one-GPU baseline on a free GPU while "
                         "another job runs). NAME:STEPS:FROM gives a run its own length and first median step, e.g. "
                         "one:110:80,ep2:110:80,dp2,pp2_dualpipev: EP=2 measured once the router has balanced, "
                         "the others at --steps")
    ap.add_argument("--median-from", type=int, default=4,
                    help="first step of the medians (default 4). EP=2's step depends on how balanced the router is, "
                         "and from initialization it takes the bias ~50 steps to balance it (the per-layer rank "
                         "imbalance was 1.41 at step 12 in session 11): e.g. --steps 60 --median-from 40")
    args = ap.parse_args()
    names = []
    for item in args.runs.split(","):
        name, *length = item.split(":")
        names.append(name)
        if length:
            if len(length) != 2 or not all(v.isdigit() for v in length) or int(length[1]) >= int(length[0]):
                raise SystemExit(f"--runs {item!r}: write NAME:STEPS:FROM with FROM < STEPS, e.g. ep2:110:80")
            RUN_STEPS[name] = (int(length[0]), max(2, int(length[1])))
    args.runs = ",".join(names)
    RUNS.update(names)
    global PROFILE_STEP, MEDIAN_FROM, STEPS
    STEPS = args.steps
    MEDIAN_FROM = max(2, args.median_from)
    PROFILE_STEP = args.steps if args.profile_step < 0 else args.profile_step
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = 32768 if args.preset == "small" else 512
    data = Path(args.data) if args.data else prepare(out, vocab)
    if args.data:
        vocab = json.loads((data / "meta.json").read_text())["tokenizer"]["vocab_size"]
    seq = args.seq if args.device == "cuda" else 64
    per_gpu = args.micro * args.accum
    common = ["--set", f'model.preset="{args.preset}"', "--set", f"model.vocab_size={vocab}",
              "--set", f"train.steps={args.steps}", "--set", f"train.seq_len={seq}",
              "--set", f"train.micro_batch_size={args.micro}", "--set", "train.eval_every=0",
              "--set", "train.eval_batches=1", "--set", "train.sample_tokens=0", "--set", "train.save_every=100000",
              # no end-of-run checkpoint: for `small` it is ~30 GB of writing after the timed steps, and it ran a
              # two-GPU call out of time twice (2026-11-25 and 11-26)
              "--set", "train.save_final=false",
              # one profiled step per run (RUN/profile/rank{r}.txt): where EP=2's extra time goes
              "--set", f"train.profile_step={PROFILE_STEP}",
              "--set", "train.batch_ramp_start=0", "--set", "train.warmup_steps=2",
              # configs/small.toml's peak LR: the trainer default (2e-3, sized for tiny) diverged on small
              "--set", f"train.lr={4.2e-4 if args.preset == 'small' else 2e-3}",
              "--set", f'train.device="{args.device}"', "--set", f"train.compile={str(args.device == 'cuda').lower()}"]
    res: dict = {"device": None, "torch": None, "preset": args.preset, "seq": seq, "micro": args.micro,
                 "per_gpu_batch": per_gpu}
    import torch
    res["device"] = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    res["torch"] = torch.__version__
    one = train("one", out, data, 1, common, ["--set", f"train.batch_size={per_gpu}"])
    # A/B runs against the one-GPU step: run -> (processes, its settings). _cg: the compiled blocks replayed as
    # CUDA graphs (train.compile_mode); _fp8d: EP's dispatch payload in E4M3 with 1x128 scales (V3's recipe).
    cg = ["--set", 'train.compile_mode="reduce-overhead"']
    ep = ["--set", "parallel.ep=2"]
    fp8d = ["--set", "parallel.fp8_dispatch=true"]
    fbo = ["--set", "parallel.fb_overlap=true"]   # micro-batch i+1's forward beside micro-batch i's backward
    gc50 = ["--set", "train.gc_every=50"]
    ag = ["--set", 'parallel.ep_dispatch="allgather"']   # fixed-size exchanges: no host read of splits
    a2a = ["--set", 'parallel.ep_dispatch="alltoall"']   # the default before session 11 ('auto' = allgather at ep 2)
    pu = ["--set", 'train.weight_cast="per_use"']   # autocast casting fp32 weights at every use (before 2026-12-07)
    ps = ["--set", 'train.weight_cast="per_step"']  # bf16 weight copies cast once per optimizer step
    bm = ["--set", "train.bf16_moments=true"]        # AdamW moments in bf16 (the Triton AdamW), as V3 trained
    fp8 = ["--set", 'train.precision="fp8"']          # the FP8 recipe (issue #6): the trainer's FP8 step
    variant_runs = {"one_cg": (1, cg), "dp2_cg": (2, cg), "ep2_cg": (2, ep + cg), "ep2_fp8d": (2, ep + fp8d),
                    "ep2_cg_fp8d": (2, ep + cg + fp8d), "one_fbo": (1, fbo), "dp2_fbo": (2, fbo),
                    "ep2_fbo": (2, ep + fbo), "ep2_fbo_fp8d": (2, ep + fbo + fp8d),
                    # collections every 50 steps with automatic garbage collection off (session 10 ran the
                    # default-50 code against 'ep2_autogc' = train.gc_every 0, now the default)
                    "one_gc50": (1, gc50), "ep2_gc50": (2, ep + gc50),
                    "ep2_ag": (2, ep + ag), "ep2_ag_cg": (2, ep + ag + cg), "ep2_a2a": (2, ep + a2a),
                    "ep2_a2a_cg": (2, ep + a2a + cg),
                    "one_pu": (1, pu), "one_ps": (1, ps), "one_cg_pu": (1, cg + pu), "one_cg_ps": (1, cg + ps),
                    "ep2_pu": (2, ep + pu), "ep2_cg_pu": (2, ep + cg + pu), "dp2_pu": (2, pu),
                    "one_bm": (1, bm), "one_cg_bm": (1, cg + bm), "one_fp8": (1, fp8), "one_cg_fp8": (1, cg + fp8)}
    if RUNS & variant_runs.keys() or RUNS == {"one", "ep2"}:
        if "ep2" in RUNS and not RUNS & {"dp2", "pp2_dualpipev"}:   # the EP A/B: default EP=2 on the same machine,
            r = train("ep2", out, data, 2, common, ["--set", f"train.batch_size={2 * per_gpu}", *ep])  # first
            res["ep2_step_s"] = r["step_s"]
            res["ep2_scaling"] = r["tokens_per_s"] / (2 * one["tokens_per_s"])
        for name in dict.fromkeys(args.runs.split(",")):      # in the order asked for
            if name in variant_runs:
                nproc, extra = variant_runs[name]
                try:  # an A/B variant that fails is recorded; the others still run
                    r = train(name, out, data, nproc, common, ["--set", f"train.batch_size={nproc * per_gpu}", *extra])
                except SystemExit as e:
                    res[f"{name}_error"] = str(e)
                    continue
                res[f"{name}_step_s"] = r["step_s"]
                res[f"{name}_scaling"] = r["tokens_per_s"] / (nproc * one["tokens_per_s"])
        if RUNS <= {"one", "ep2"} | variant_runs.keys():
            res["one_step_s"] = one["step_s"]
            exchange = ep_exchange(out, args, seq) if "ep2" in RUNS else None
            if exchange:
                res["ep_exchange"] = exchange
            (out / "distributed.json").write_text(json.dumps(res, indent=2) + "\n")
            print({k: round(v, 4) for k, v in res.items() if k.endswith(("_step_s", "_scaling"))}, flush=True)
            return
    if RUNS == {"one"}:
        if args.device == "cuda":
            simulate(res, args, seq, one, None, None, out)
            print({k: round(res[k], 4) for k in ("sim_step_s_1gpu", "sim_rel_err_1gpu")}, flush=True)
        return
    dp2 = train("dp2", out, data, 2, common, ["--set", f"train.batch_size={2 * per_gpu}"])
    # A/B runs of the ZeRO-1 switches: run -> (result key, the parallel.* switches it turns off). dp2_sync is
    # ZeRO-1 as before session 7 (all-reduce of flattened copies, broadcast waited inside the step).
    dp_variants = {"dp2_sync": ("dp_scaling_without_param_sync_overlap",
                                ("overlap_param_sync", "reduce_to_owner", "grad_as_bucket_view")),
                   "dp2_allreduce": ("dp_scaling_allreduce", ("reduce_to_owner",))}
    for name, (key, off) in dp_variants.items():
        if name in RUNS:
            r = train(name, out, data, 2, common, ["--set", f"train.batch_size={2 * per_gpu}",
                                                   *(a for k in off for a in ("--set", f"parallel.{k}=false"))])
            res[key] = r["tokens_per_s"] / (2 * one["tokens_per_s"])
    if RUNS <= {"one", "dp2", *dp_variants}:   # the DP A/B alone: no EP or pipeline runs
        res["dp_scaling"] = dp2["tokens_per_s"] / (2 * one["tokens_per_s"])
        res["runs"] = {"one": one, "dp2": dp2}
        (out / "distributed.json").write_text(json.dumps(res, indent=2) + "\n")
        print({k: v for k, v in res.items() if "scaling" in k}, flush=True)
        return
    ep2 = train("ep2", out, data, 2, common, ["--set", f"train.batch_size={2 * per_gpu}", "--set", "parallel.ep=2"])
    pp2 = train("pp2_dualpipev", out, data, 2, common,
                ["--set", f"train.batch_size={2 * per_gpu}", "--set", "parallel.pp=2",
                 "--set", 'parallel.schedule="dualpipev"', "--set", "parallel.trace=true"])
    res["runs"] = {"one": one, "dp2": dp2, "ep2": ep2, "pp2_dualpipev": pp2}
    res["dp_scaling"] = dp2["tokens_per_s"] / (2 * one["tokens_per_s"])
    res["ep_scaling"] = ep2["tokens_per_s"] / (2 * one["tokens_per_s"])
    # EP bytes per step per rank cover dispatch and combine of every MoE layer and micro-batch; compare their
    # time inside the step with plain all_to_all at the same per-call size.
    if "ep_bytes_sent" in ep2:
        from dsv3.config import preset
        cfg = preset(args.preset)
        calls = 2 * (cfg.num_moe_layers + cfg.num_nextn_predict_layers) * args.accum  # dispatch + combine
        per_call = ep2["ep_bytes_sent"] / calls
        t_plain = plain_all_to_all(out, per_call, 2)
        res["a2a_plain_s_per_call"] = t_plain
        res["a2a_bytes_per_call"] = per_call
        res["a2a_plain_gbps"] = per_call / t_plain / 1e9
        # the EP run's extra time over DP2 is attributed to dispatch/combine (both do the same math otherwise)
        extra = max(ep2["step_s"] - dp2["step_s"], 1e-9)
        # ep_bytes_sent counts forward transfers; the backward moves the same rows back inside the same step
        res["a2a_ep_gbps"] = 2 * ep2["ep_bytes_sent"] / extra / 1e9
        res["a2a_fraction_of_nccl"] = min(res["a2a_ep_gbps"] / res["a2a_plain_gbps"], 10.0)
        # the same from the profiled step's NCCL kernel time (rank 0; includes the counts exchanges and the DP
        # reduction, so it undercounts the rate): transport efficiency apart from what EP leaves exposed
        summary = out / "ep2" / "profile" / "rank0.summary.json"
        if summary.exists():
            comm_ms = json.loads(summary.read_text())["kernel_ms"]["communication"]
            if comm_ms > 0:
                res["a2a_ep_gbps_kernel_time"] = 2 * ep2["ep_bytes_sent"] / (comm_ms / 1e3) / 1e9
                res["a2a_fraction_of_nccl_kernel_time"] = res["a2a_ep_gbps_kernel_time"] / res["a2a_plain_gbps"]
    # the transport itself: dsv3's dispatch + combine against plain all_to_all_single at the same message sizes,
    # as the layer issues them, without the step around them (benchmarks/ep_exchange.py). The step-difference
    # figure above charges EP's other costs (waiting for the busier rank, the local slot passes) to the link too.
    exchange = ep_exchange(out, args, seq)
    if exchange:
        from dsv3.config import preset
        from dsv3.parallel.expert_parallel import resolve_dispatch
        dispatch = resolve_dispatch("auto", 2, preset(args.preset).num_experts_per_tok, False, 1, False)
        res["a2a_fraction_of_nccl_step_diff"] = res.get("a2a_fraction_of_nccl")
        res["a2a_fraction_of_nccl"] = exchange[f"{dispatch}_fraction_of_nccl"]
        res["a2a_fraction_dispatch"] = dispatch
        res["ep_exchange"] = exchange
    res["bubble_fraction"] = pp2.get("pp_bubble_fraction")
    if "pp_recv_wait_s" in pp2 and pp2.get("pp_step_s"):
        res["exposed_comm_fraction"] = pp2["pp_recv_wait_s"] / pp2["pp_step_s"]
    try:
        from dsv3.config import preset
        from dsv3.plan.rates import load_rates
        from dsv3.plan.step import predict_step
        if args.device == "cuda":
            simulate(res, args, seq, one, dp2, ep2, out)
        table4 = predict_step(preset("v3"), "pp=16,ep=64,dp=128", load_rates("h800"), micro_batch=1, seq_len=4096,
                              microbatches=120, schedule="dualpipe")
        res["sim_rel_err_table4"] = (table4["step_s"] - 19.926) / 19.926
    except Exception as e:  # the simulator is optional for the measurement itself
        res["sim_error"] = repr(e)[:300]
    (out / "distributed.json").write_text(json.dumps(res, indent=2) + "\n")
    keys = ["dp_scaling", "ep_scaling", "a2a_fraction_of_nccl", "exposed_comm_fraction", "bubble_fraction",
            "sim_rel_err_1gpu", "sim_rel_err_dp2", "sim_rel_err_2gpu", "sim_rel_err_table4"]
    print({k: (round(res[k], 4) if isinstance(res.get(k), float) else res.get(k)) for k in keys}, flush=True)


if __name__ == "__main__":
    main()
