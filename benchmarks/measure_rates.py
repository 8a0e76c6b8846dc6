"""Measure the step simulator's rates (``dsv3.plan.rates.Rates``) on this machine, at the shapes of a preset.

`dsv3 plan step` prices a training step from per-kernel rates. The catalogue (``--device h100``) holds rates
measured at other shapes (GEMMs at 8192^3, grouped GEMMs at another model's experts); this script measures
every rate it can where the model runs, and writes a JSON that ``load_rates("h100", path=...)`` /
``dsv3 plan step --rates FILE`` / ``benchmarks/distributed.py --rates FILE`` read:

* dense BF16 GEMM: every Linear of the preset (MLA projections, dense FFN, shared experts, MTP eh_proj, head)
  at M = micro-batch x seq tokens, forward + input-gradient + weight-gradient GEMM, combined as the model
  uses them (total FLOPs / total time, each shape weighted by how often a step runs it);
* fp32 GEMM at the router's shape (the trainer keeps the router in fp32, TF32 off);
* grouped BF16 GEMM (``torch._grouped_mm``) at the routed experts' shapes: T x K token copies over E experts
  with random top-K routing counts, gate/up/down, forward + both backward GEMMs;
* attention forward and backward (``dsv3.kernels.attention.fast_causal_attention``, causal, the preset's
  q/k and v head dims), in model FLOPs (the causal half);
* HBM bandwidth (device copy, read + write), the fused AdamW's bytes/s (28 bytes per fp32 parameter),
  the routing kernels per token (``dsv3.model.moe.route`` + the dispatch argsort and counts), the GPU idle
  of one host synchronisation;
* FP8 blockwise GEMM (``dsv3.fp8.gemm.fp8_gemm_nt``, 1x128 activations x 128x128 weights) at the dense
  shapes, when torch's blockwise ``_scaled_mm`` works here; otherwise the catalogue value stays;
* with 2+ GPUs (one process per GPU, NCCL): ``all_to_all_single`` at the EP message size (one MoE layer's
  dispatch of one micro-batch, split evenly over the ranks) -> ``nvlink_gbps`` (bytes to other ranks / s),
  a counts-sized all-to-all -> ``nvlink_latency_us``, the all-reduce bus bandwidth at the trainer's 25 MiB
  gradient buckets -> ``nvlink_allreduce_gbps``, and the project's EP layer (``ep_experts_forward`` forward
  + backward) under the profiler: its GPU idle time per layer, divided by ``--ep-host-syncs``, is
  ``host_sync_us`` (the GPU waits while the host reads the split sizes back and relaunches).

Timing: CUDA events around each call, warm-up first, median of ``--reps``. Fields it cannot measure are left
out of the JSON (the base profile's value applies) and ``sources`` says so.

    PYTHONPATH=src python3 benchmarks/measure_rates.py --out rates.json                 # all GPUs (max 2), small
    PYTHONPATH=src python3 benchmarks/measure_rates.py --out r.json --device cpu --preset tiny   # smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

OPTIMIZER_BYTES = 28       # fused AdamW, fp32 p, g, m, v: read 16 + write 12 bytes per parameter
BUCKET_BYTES = 25 * 2**20  # dsv3.parallel.mesh.ParallelConfig.bucket_mb


# ------------------------------------------------------------------------------------------------ timing
class Clock:
    """Median seconds of ``reps`` calls after ``warmup``; CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device, reps: int, warmup: int):
        self.device, self.reps, self.warmup = device, reps, warmup
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        self.sync()
        times = []
        if self.cuda:
            evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                   for _ in range(self.reps)]
            for s, e in evs:
                s.record()
                fn()
                e.record()
            torch.cuda.synchronize(self.device)
            times = [s.elapsed_time(e) / 1e3 for s, e in evs]
        else:
            for _ in range(self.reps):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return statistics.median(times)


# ------------------------------------------------------------------------------------------------ shapes
def linear_shapes(cfg) -> list[tuple[str, int, int, int]]:
    """(name, in, out, uses per step's forward) of every BF16 Linear of the model, MTP included."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    D = cfg.num_nextn_predict_layers
    L = cfg.num_hidden_layers + D                 # every decoder block has MLA (MTP blocks too)
    n_dense = cfg.first_k_dense_replace if cfg.n_routed_experts else cfg.num_hidden_layers
    n_moe = cfg.num_hidden_layers - n_dense + (D if cfg.n_routed_experts else 0)
    n_dense += 0 if cfg.n_routed_experts else D
    out = []
    if cfg.q_lora_rank:
        out += [("q_a_proj", d, cfg.q_lora_rank, L), ("q_b_proj", cfg.q_lora_rank, h * qk, L)]
    else:
        out += [("q_proj", d, h * qk, L)]
    out += [("kv_a_proj_with_mqa", d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, L),
            ("kv_b_proj", cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), L),
            ("o_proj", h * cfg.v_head_dim, d, L)]
    if n_dense:
        out += [("mlp.gate_proj/up_proj", d, cfg.intermediate_size, 2 * n_dense),
                ("mlp.down_proj", cfg.intermediate_size, d, n_dense)]
    if n_moe and cfg.n_shared_experts:
        w = cfg.n_shared_experts * cfg.moe_intermediate_size
        out += [("shared_experts.gate_proj/up_proj", d, w, 2 * n_moe), ("shared_experts.down_proj", w, d, n_moe)]
    if D:
        out += [("eh_proj", 2 * d, d, D)]
    out += [("lm_head", d, cfg.vocab_size, 1 + D)]
    return out


def _randn(shape, device, dtype, scale=1.0, requires_grad=False):
    t = (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


# ------------------------------------------------------------------------------------------ measurements
def gemm_rate(clock: Clock, shapes, M: int, dtype, backward: bool = True) -> tuple[float, dict]:
    """TFLOP/s over ``shapes`` as the model runs them: sum of FLOPs / sum of times, each shape x its uses."""
    dev = clock.device
    flops = secs = 0.0
    detail = {}
    for name, k, n, uses in shapes:
        x, w = _randn((M, k), dev, dtype), _randn((n, k), dev, dtype, 0.02)
        t = clock.time(lambda: F.linear(x, w))
        if backward:
            dy = _randn((M, n), dev, dtype)
            t += clock.time(lambda: dy @ w)          # input gradient [M, k]
            t += clock.time(lambda: dy.t() @ x)      # weight gradient [n, k]
        f = 2.0 * M * k * n * (3 if backward else 1)
        detail[name] = round(f / t / 1e12, 1)
        flops += uses * f
        secs += uses * t
    return flops / secs / 1e12, detail


def fp8_rate(clock: Clock, shapes, M: int) -> tuple[float, dict]:
    """Forward FP8 GEMMs (1x128 activation tiles x 128x128 weight blocks) through dsv3.fp8.gemm.fp8_gemm_nt."""
    from dsv3.fp8.blocks import quantize_activation_tiles, quantize_weight_blocks
    from dsv3.fp8.gemm import fp8_gemm_nt

    dev = clock.device
    flops = secs = 0.0
    detail = {}
    for name, k, n, uses in shapes:
        a, sa = quantize_activation_tiles(_randn((M, k), dev, torch.bfloat16))
        b, sb = quantize_weight_blocks(_randn((n, k), dev, torch.bfloat16, 0.02))
        t = clock.time(lambda: fp8_gemm_nt(a, sa, "tile", b, sb, "block", torch.bfloat16, backend="scaled_mm"))
        f = 2.0 * M * k * n
        detail[name] = round(f / t / 1e12, 1)
        flops += uses * f
        secs += uses * t
    return flops / secs / 1e12, detail


def routing_counts(cfg, T: int, seed: int = 0) -> torch.Tensor:
    """Token copies per expert [E] of a random top-K routing of T tokens (each token K distinct experts)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(T, cfg.n_routed_experts, generator=g).topk(cfg.num_experts_per_tok, dim=-1).indices
    return torch.bincount(idx.reshape(-1), minlength=cfg.n_routed_experts)


def grouped_rate(clock: Clock, cfg, T: int, dtype) -> tuple[float, dict]:
    """torch._grouped_mm at the routed experts' shapes: gate, up [E, f, d] and down [E, d, f] over T*K rows,
    forward and backward (input and weight gradients)."""
    dev = clock.device
    E, K, f, d = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.hidden_size
    counts = routing_counts(cfg, T)
    ends = torch.cumsum(counts, 0).to(torch.int32).to(dev)
    M = T * K
    flops = secs = 0.0
    detail = {"rows": M, "experts": E, "max_rows_per_expert": int(counts.max()), "mean": M / E}
    for name, k, n in (("gate", d, f), ("up", d, f), ("down", f, d)):
        x = _randn((M, k), dev, dtype, requires_grad=True)
        w = _randn((E, n, k), dev, dtype, 0.02, requires_grad=True)
        fwd = lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=ends)  # noqa: E731
        tf = clock.time(fwd)
        y = fwd()
        gy = torch.randn_like(y)
        tb = clock.time(lambda: torch.autograd.grad(y, (x, w), gy, retain_graph=True))
        fl = 2.0 * M * k * n
        detail[name] = {"fwd_tflops": round(fl / tf / 1e12, 1), "bwd_tflops": round(2 * fl / tb / 1e12, 1)}
        flops += 3 * fl
        secs += tf + tb
    return flops / secs / 1e12, detail


def attention_rates(clock: Clock, cfg, B: int, S: int, dtype) -> tuple[float, float]:
    """(forward, backward) TFLOP/s of the project's causal attention at the preset's head dims; model FLOPs
    2*B*H*(qk+v)*S^2/2 forward and twice that backward, as the simulator counts them."""
    from dsv3.kernels.attention import fast_causal_attention

    dev = clock.device
    H, qk, v = cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    q = _randn((B, H, S, qk), dev, dtype, requires_grad=True)
    k = _randn((B, H, S, qk), dev, dtype, requires_grad=True)
    vv = _randn((B, H, S, v), dev, dtype, requires_grad=True)
    scale = qk ** -0.5
    tf = clock.time(lambda: fast_causal_attention(q, k, vv, scale))
    o = fast_causal_attention(q, k, vv, scale)
    go = torch.randn_like(o)
    tb = clock.time(lambda: torch.autograd.grad(o, (q, k, vv), go, retain_graph=True))
    flops = 2.0 * B * H * (qk + v) * S * S / 2
    return flops / tf / 1e12, 2 * flops / tb / 1e12


def hbm_rate(clock: Clock, nbytes: int) -> float:
    """Device copy: bytes read + written per second (GB/s)."""
    n = nbytes // 2
    src = torch.empty(n, device=clock.device, dtype=torch.bfloat16).fill_(1.0)
    dst = torch.empty_like(src)
    t = clock.time(lambda: dst.copy_(src))
    return 2 * n * 2 / t / 1e9


def optimizer_rate(clock: Clock, nparams: int) -> float:
    """The trainer's AdamW (fused on CUDA, as dsv3.train.optim.build_optimizer builds it) over fp32 tensors:
    OPTIMIZER_BYTES per parameter / step time (GB/s)."""
    cuda = clock.cuda
    params = [torch.nn.Parameter(torch.randn(nparams // 8, device=clock.device)) for _ in range(8)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda or None,
                            foreach=False if not cuda else None)
    t = clock.time(opt.step)
    n = sum(p.numel() for p in params)
    return OPTIMIZER_BYTES * n / t / 1e9


def routing_ns(clock: Clock, cfg, T: int) -> float:
    """The project's routing of T tokens (sigmoid/softmax, group limit, top-K, weights) plus the dispatch
    argsort and counts, forward, in ns per token."""
    from dsv3.model.moe import count_selections, route

    dev = clock.device
    E = cfg.n_routed_experts
    logits = torch.randn(T, E, device=dev)
    bias = torch.zeros(E, device=dev)

    def fn():
        r = route(logits, bias, cfg)
        order = torch.argsort(r.idx_TK.reshape(-1), stable=True)
        torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=dev))
        count_selections(r.idx_TK, E)
    return clock.time(fn) / T * 1e9


def host_sync_us(clock: Clock, cfg, T: int, iters: int) -> float:
    """GPU idle per host sync: a GPU-bound loop (counts kernel, then GEMMs) run with and without reading the
    counts back (``.tolist()``, as the EP dispatch does); the extra wall time per iteration, in us."""
    dev = clock.device
    dtype = torch.bfloat16 if clock.cuda else torch.float32
    d, E = cfg.hidden_size, cfg.n_routed_experts
    x = _randn((T, d), dev, dtype)
    w = _randn((d, d), dev, dtype, d ** -0.5)
    idx = torch.randint(0, E, (T * cfg.num_experts_per_tok,), device=dev)
    ones = torch.ones_like(idx)

    def loop(sync: bool) -> float:
        clock.sync()
        t = time.perf_counter()
        for _ in range(iters):
            c = torch.zeros(E, dtype=torch.int64, device=dev).scatter_add_(0, idx, ones)
            if sync:
                c.tolist()
            for _ in range(4):
                x @ w
        clock.sync()
        return time.perf_counter() - t

    loop(True), loop(False)  # warm-up
    with_sync = min(loop(True) for _ in range(3))
    without = min(loop(False) for _ in range(3))
    return max(0.0, (with_sync - without) / iters * 1e6)


# ------------------------------------------------------------------------------ multi-GPU (one proc each)
def _gpu_idle_s(prof) -> tuple[float, float]:
    """(busy, span) seconds of the device timeline in a torch.profiler trace: union of kernel intervals."""
    iv = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                if getattr(e, "device_type", None) is not None and e.device_type.name == "CUDA"
                and e.time_range.end > e.time_range.start)
    if not iv:
        return 0.0, 0.0
    busy, cur_s, cur_e = 0.0, iv[0][0], iv[0][1]
    for s, e in iv[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    return busy * 1e-6, (iv[-1][1] - iv[0][0]) * 1e-6


def _worker(rank: int, world: int, init_file: str, out_file: str, preset_name: str, T: int, device_type: str,
            reps: int, warmup: int, ep_chunks: int = 1) -> None:
    import torch.distributed as dist

    from dsv3.config import preset

    cuda = device_type == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    import datetime

    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=90))
    clock = Clock(dev, reps, warmup)
    cfg = preset(preset_name)
    res: dict = {"world": world}
    dtype = torch.bfloat16 if cuda else torch.float32
    d, K, E = cfg.hidden_size, cfg.num_experts_per_tok, cfg.n_routed_experts

    def barrier_time(fn) -> float:
        dist.barrier()
        return clock.time(fn)

    # EP all-to-all: one MoE layer's dispatch of one micro-batch (T*K rows of d values), even splits
    rows = T * K // world * world
    x = _randn((rows, d), dev, dtype)
    y = torch.empty_like(x)
    splits = [rows // world] * world
    t = barrier_time(lambda: dist.all_to_all_single(y, x, splits, splits))
    peer_bytes = rows * (world - 1) / world * d * x.element_size()
    res["a2a"] = {"seconds": t, "bytes_to_peers": peer_bytes, "gbps": peer_bytes / t / 1e9,
                  "rows": rows, "row_bytes": d * x.element_size()}
    # the counts exchange: E/world int64 to each peer
    c = torch.zeros(E, dtype=torch.int64, device=dev)
    c2 = torch.empty_like(c)
    res["a2a_small_us"] = barrier_time(lambda: dist.all_to_all_single(c2, c)) * 1e6
    # DP gradient all-reduce at the trainer's bucket size (fp32): bus bandwidth = S * 2(n-1)/n / t
    g = torch.randn(BUCKET_BYTES // 4 if cuda else 2**16, device=dev)
    t = barrier_time(lambda: dist.all_reduce(g))
    S = g.numel() * 4
    res["allreduce"] = {"seconds": t, "bytes": S, "busbw_gbps": S * 2 * (world - 1) / world / t / 1e9}
    # the project's EP layer (routed experts over the ranks), forward + backward, eager
    try:
        res["ep_layer"] = _ep_layer(clock, cfg, T, dtype, world, rank, dist, ep_chunks)
    except Exception as e:  # noqa: BLE001 - a diagnostic: report, keep the rest
        res["ep_layer_error"] = repr(e)[:300]
    if rank == 0:
        Path(out_file).write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


def _ep_layer(clock: Clock, cfg, T: int, dtype, world: int, rank: int, dist, chunks: int = 1) -> dict:
    """Wall time of ``ep_experts_forward`` forward + backward per call, and (CUDA) its GPU idle time from the
    profiler's kernel timeline."""
    from dsv3.model.moe import route
    from dsv3.parallel.expert_parallel import ep_experts_forward
    from dsv3.parallel.transport import CollectiveTransport

    dev = clock.device
    d, f, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    El = E // world
    transport = CollectiveTransport(dist.group.WORLD)
    gen = torch.Generator(device=dev).manual_seed(rank)
    routing = route(torch.randn(T, E, device=dev, generator=gen), None, cfg)
    x = _randn((T, d), dev, dtype, requires_grad=True)
    ws = [_randn(s, dev, dtype, 0.02, requires_grad=True) for s in ((El, f, d), (El, f, d), (El, d, f))]
    gy = _randn((T, d), dev, dtype)

    kw = {"chunks": chunks} if chunks > 1 else {}

    def step():
        out = ep_experts_forward(x, routing, *ws, transport, **kw)
        out.backward(gy)

    for _ in range(clock.warmup):
        step()
    iters = clock.reps
    dist.barrier()
    clock.sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    clock.sync()
    wall = (time.perf_counter() - t0) / iters
    out = {"wall_ms": wall * 1e3, "tokens": T, "chunks": chunks}
    if clock.cuda:
        from torch.profiler import ProfilerActivity, profile

        dist.barrier()
        clock.sync()
        try:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(iters):
                    step()
                clock.sync()
            busy, span = _gpu_idle_s(prof)
            if span > 0:
                out.update({"gpu_busy_ms": busy / iters * 1e3, "gpu_idle_ms": max(0.0, span - busy) / iters * 1e3})
        except Exception as e:  # noqa: BLE001 - no CUPTI: keep the wall time
            out["profiler_error"] = repr(e)[:200]
    return out


def multi_gpu(preset_name: str, T: int, device_type: str, world: int, reps: int, warmup: int,
              ep_chunks: int = 1, timeout_s: float = 120.0) -> dict:
    """Spawn ``world`` processes (one per GPU) for the collectives; give up (killing them) after ``timeout_s``."""
    import torch.multiprocessing as mp

    if device_type == "cuda":
        torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as tmp:
        init, out = os.path.join(tmp, "init"), os.path.join(tmp, "out.json")
        ctx = mp.spawn(_worker, args=(world, init, out, preset_name, T, device_type, reps, warmup, ep_chunks),
                       nprocs=world, join=False)
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"the {world} collective processes did not finish in {timeout_s:.0f} s")
        return json.loads(Path(out).read_text())


# ------------------------------------------------------------------------------------------------- main
def measure(args) -> tuple[dict, dict]:
    """-> (rate fields, sources)."""
    from dsv3.config import preset
    from dsv3.plan.rates import Rates, load_rates

    cfg = preset(args.preset)
    dev = torch.device("cuda", 0) if args.device == "cuda" else torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.set_device(dev)
    clock = Clock(dev, args.reps, args.warmup)
    dtype = torch.bfloat16 if cuda else torch.float32
    T = args.micro * args.seq
    base = load_rates(args.base)
    at = f"{args.preset} preset, {args.micro} x {args.seq} tokens per micro-batch"
    where = torch.cuda.get_device_name(dev) if cuda else "CPU"
    fields: dict = {}
    src: dict = {}
    diag: dict = {}

    def attempt(name, fn):
        t = time.perf_counter()
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - one failed measurement keeps the catalogue value
            src[name] = f"not measured ({type(e).__name__}: {str(e)[:160]}): {args.base} catalogue value kept"
            print(f"  {name}: FAILED {e!r}"[:300], flush=True)
            return None
        finally:
            if args.verbose:
                print(f"  [{name}: {time.perf_counter() - t:.1f} s]", flush=True)

    shapes = linear_shapes(cfg)
    r = attempt("gemm_bf16_tflops", lambda: gemm_rate(clock, shapes, T, dtype))
    if r:
        fields["gemm_bf16_tflops"], diag["gemm_bf16_per_shape_tflops"] = r
        src["gemm_bf16_tflops"] = (f"{where}: F.linear forward + input/weight-gradient GEMMs at every Linear of the "
                                   f"{at} ({', '.join(s[0] for s in shapes)}), weighted by uses per step")
    if cfg.n_routed_experts:
        r = attempt("gemm_fp32_tflops", lambda: gemm_rate(
            clock, [("router", cfg.hidden_size, cfg.n_routed_experts, 1)], T, torch.float32))
        if r:
            fields["gemm_fp32_tflops"] = r[0]
            src["gemm_fp32_tflops"] = (f"{where}: fp32 router GEMM [{T} x {cfg.hidden_size}] x "
                                       f"[{cfg.n_routed_experts} x {cfg.hidden_size}], forward + 2 backward, TF32 "
                                       f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'} (as the trainer)")
        r = attempt("grouped_bf16_tflops", lambda: grouped_rate(clock, cfg, T, dtype))
        if r:
            fields["grouped_bf16_tflops"], diag["grouped"] = r
            src["grouped_bf16_tflops"] = (f"{where}: torch._grouped_mm gate/up/down forward + backward, "
                                          f"{T} x {cfg.num_experts_per_tok} copies over {cfg.n_routed_experts} "
                                          f"experts of {cfg.moe_intermediate_size} (random top-K counts), {at}")
    fp8 = None
    if cuda:
        fp8 = attempt("gemm_fp8_tflops", lambda: fp8_rate(clock, shapes, T))
        if fp8:
            fields["gemm_fp8_tflops"], diag["gemm_fp8_per_shape_tflops"] = fp8
            src["gemm_fp8_tflops"] = (f"{where}: dsv3.fp8.gemm.fp8_gemm_nt (scaled_mm, 1x128 x 128x128 scales) "
                                      f"forward at the dense shapes of the {at}")
    else:
        src["gemm_fp8_tflops"] = f"not measured (no FP8 GEMM on the CPU): {args.base} catalogue value kept"
    if "grouped_bf16_tflops" in fields:
        f8 = fields.get("gemm_fp8_tflops", base.gemm_fp8_tflops)
        bf = fields.get("gemm_bf16_tflops", base.gemm_bf16_tflops)
        fields["grouped_fp8_tflops"] = fields["grouped_bf16_tflops"] * f8 / bf
        src["grouped_fp8_tflops"] = (f"derived, not measured: grouped BF16 x dense FP8 / dense BF16 = "
                                     f"{fields['grouped_bf16_tflops']:.4g} x {f8:.4g} / {bf:.4g}"
                                     + ("" if "gemm_fp8_tflops" in fields else " (catalogue FP8)"))
    r = attempt("attention_fwd_tflops", lambda: attention_rates(clock, cfg, args.micro, args.seq, dtype))
    if r:
        fields["attention_fwd_tflops"], fields["attention_bwd_tflops"] = r
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        desc = (f"{where}: dsv3.kernels.attention.fast_causal_attention, causal, {args.micro} x "
                f"{cfg.num_attention_heads} heads x {args.seq}, q/k {qk}, v {cfg.v_head_dim}, "
                "model FLOPs (causal half)")
        src["attention_fwd_tflops"] = desc
        src["attention_bwd_tflops"] = desc + ", backward = autograd.grad of q, k, v (2 x forward FLOPs)"
    r = attempt("hbm_gbps", lambda: hbm_rate(clock, args.hbm_mb * 2**20))
    if r:
        fields["hbm_gbps"] = r
        src["hbm_gbps"] = f"{where}: device copy of {args.hbm_mb} MiB (read + write)"
    r = attempt("optimizer_gbps", lambda: optimizer_rate(clock, args.opt_params))
    if r:
        fields["optimizer_gbps"] = r
        src["optimizer_gbps"] = (f"{where}: torch AdamW ({'fused' if cuda else 'per-parameter'}) step over "
                                 f"{args.opt_params:,} fp32 parameters, {OPTIMIZER_BYTES} bytes each")
    if cfg.n_routed_experts:
        r = attempt("routing_ns_per_token", lambda: routing_ns(clock, cfg, T))
        if r:
            fields["routing_ns_per_token"] = r
            src["routing_ns_per_token"] = (f"{where}: dsv3.model.moe.route + dispatch argsort + counts, {T} tokens x "
                                           f"{cfg.n_routed_experts} experts, forward")
    r = attempt("host_sync_us", lambda: host_sync_us(clock, cfg, T, args.sync_iters))
    if r is not None:
        fields["host_sync_us"] = r
        src["host_sync_us"] = f"{where}: a GPU-bound loop with and without a .tolist() per iteration (1 GPU)"
        diag["host_sync_us_plain"] = r
    if cuda:
        fields["sms"] = torch.cuda.get_device_properties(dev).multi_processor_count
        src["sms"] = f"{where}: multi_processor_count"

    if args.gpus >= 2:
        mg = attempt("nvlink_gbps", lambda: multi_gpu(args.preset, T, dev.type, args.gpus, args.reps, args.warmup,
                                                      args.ep_chunks, args.collective_timeout))
        if mg:
            link = "NVLink" if cuda else "gloo (CPU)"
            a2a = mg["a2a"]
            fields["nvlink_gbps"] = a2a["gbps"]
            src["nvlink_gbps"] = (f"{where} x {mg['world']}, {link}: all_to_all_single of {a2a['rows']} rows x "
                                  f"{a2a['row_bytes']} bytes (one MoE layer's dispatch of one micro-batch), "
                                  f"bytes to other ranks / time")
            fields["nvlink_latency_us"] = mg["a2a_small_us"]
            src["nvlink_latency_us"] = (f"{where} x {mg['world']}: all_to_all_single of {cfg.n_routed_experts} "
                                        "int64 counts")
            fields["nvlink_allreduce_gbps"] = mg["allreduce"]["busbw_gbps"]
            src["nvlink_allreduce_gbps"] = (f"{where} x {mg['world']}: all_reduce of {mg['allreduce']['bytes']:,} "
                                            f"bytes fp32 (the trainer's gradient bucket), bus bandwidth")
            diag["multi_gpu"] = mg
            ep = mg.get("ep_layer")
            if ep and "gpu_idle_ms" in ep and args.ep_host_syncs > 0:
                fields["host_sync_us"] = ep["gpu_idle_ms"] * 1e3 / args.ep_host_syncs
                src["host_sync_us"] = (f"{where} x {mg['world']}: GPU idle time per call of the project's EP layer "
                                       f"(ep_experts_forward forward + backward, {T} tokens, eager, profiler kernel "
                                       f"timeline) / {args.ep_host_syncs} host sync(s) per layer; the plain "
                                       f"one-GPU sync loop gave {diag.get('host_sync_us_plain', float('nan')):.1f} us")
    else:
        for k in ("nvlink_gbps", "nvlink_latency_us", "nvlink_allreduce_gbps"):
            src[k] = f"not measured (one GPU): {args.base} catalogue value kept"
    for k in ("peak_bf16_tflops", "ib_gbps", "ib_latency_us", "gpus_per_node", "comm_sms"):
        src.setdefault(k, f"not measured: {args.base} catalogue value kept")
    fields = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in fields.items()}
    known = {f for f in Rates.__dataclass_fields__}
    assert set(fields) <= known, set(fields) - known
    src["diagnostics"] = diag
    src["measured"] = {"device": where, "gpus": args.gpus, "torch": torch.__version__, "preset": args.preset,
                       "micro_batch": args.micro, "seq_len": args.seq}
    return fields, src


def ep_layer_price(preset_name: str, rates, ep: int, T: int, host_syncs: int, chunks: int) -> dict:
    """What ``dsv3.plan.step`` charges for the routed part of one MoE layer of one micro-batch with EP (ms):
    all-to-alls (forward + backward), grouped GEMMs (x3: forward, input and weight gradients), the
    permutations (forward + backward), the host syncs. Compare with the EP layer measured above."""
    from dsv3.config import preset
    from dsv3.plan.step import Layout, layer_work, trainer_options

    cfg = preset(preset_name)
    opts = trainer_options("bf16", "none", ep=ep, dp=ep, ep_chunks=chunks, ep_host_syncs=host_syncs)
    w = layer_work(cfg, True, Layout(1, ep, ep), rates, opts, T, T)
    p = w.parts
    out = {"all_to_all_ms": (w.kf + w.kb) * 1e3, "experts_ms": 3 * p["routed experts"] * 1e3,
           "permutation_ms": (p.get("MoE permutation", 0.0) + w.b_parts.get("MoE permutation", 0.0)) * 1e3,
           "host_sync_ms": p.get("EP host syncs", 0.0) * 1e3}
    out["total_ms"] = sum(out.values())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file of Rates fields (+ sources) to write")
    ap.add_argument("--preset", default="small", help="model preset whose shapes are measured (default small)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 4096; CPU 64)")
    ap.add_argument("--micro", type=int, default=None, help="sequences per micro-batch (default 2; CPU 1)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--gpus", type=int, default=None,
                    help="processes for the collectives (default: min(2, GPUs) on CUDA, 1 on the CPU; "
                         "2 on the CPU runs them on gloo)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per measurement (default 10; CPU 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3; CPU 1)")
    ap.add_argument("--hbm-mb", type=int, default=None, help="copy size for the HBM rate (default 1024; CPU 8)")
    ap.add_argument("--opt-params", type=int, default=None, help="fp32 parameters of the AdamW measurement "
                    "(default 2^26; CPU 2^16)")
    ap.add_argument("--sync-iters", type=int, default=None, help="iterations of the host-sync loop (default 50)")
    ap.add_argument("--ep-host-syncs", type=int, default=1, help="host syncs per EP layer of the current "
                    "ep_experts_forward (host_sync_us = measured idle / this; default 1; must match the "
                    "simulator's Options.ep_host_syncs)")
    ap.add_argument("--ep-chunks", type=int, default=1, help="parallel.ep_chunks of the EP layer diagnostic "
                    "(default 1; > 1 needs an ep_experts_forward with chunks=)")
    ap.add_argument("--collective-timeout", type=float, default=50.0,
                    help="seconds the multi-GPU processes may take before they are killed (default 50)")
    ap.add_argument("--base", default="h100", help="catalogue profile the JSON sits on (for the table, default h100)")
    ap.add_argument("--verbose", action="store_true", help="print the time each measurement takes")
    args = ap.parse_args(argv)
    cpu = args.device == "cpu"
    if not cpu and not torch.cuda.is_available():
        ap.error("--device cuda needs a GPU (use --device cpu for the smoke test)")
    args.seq = args.seq or (64 if cpu else 4096)
    args.micro = args.micro or (1 if cpu else 2)
    args.reps = args.reps or (3 if cpu else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 3)
    args.hbm_mb = args.hbm_mb or (8 if cpu else 1024)
    args.opt_params = args.opt_params or (2**16 if cpu else 2**26)
    args.sync_iters = args.sync_iters or (5 if cpu else 50)
    if args.gpus is None:
        args.gpus = 1 if cpu else min(2, torch.cuda.device_count())
    t0 = time.perf_counter()
    fields, src = measure(args)

    from dsv3.plan.rates import load_rates
    base = load_rates(args.base)
    name = f"measured: {src['measured']['device']} x {args.gpus}, {args.preset} {args.micro}x{args.seq}"
    out = {"name": name, **fields, "sources": src}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    rates = load_rates(args.base, args.out)   # proves the file loads
    print(f"\n{name}  ({time.perf_counter() - t0:.1f} s)")
    print(f"{'field':<24}{'measured':>12}{args.base + ' catalogue':>18}  source")
    for k in sorted(fields):
        v, b = getattr(rates, k), getattr(base, k)
        s = src.get(k, "")
        print(f"{k:<24}{v:>12.4g}{b:>18.4g}  {s[:110]}")
    ep = src["diagnostics"].get("multi_gpu", {}).get("ep_layer")
    if ep:
        price = ep_layer_price(args.preset, rates, args.gpus, args.micro * args.seq, args.ep_host_syncs,
                               args.ep_chunks)
        print(f"EP layer (ep_experts_forward forward + backward, eager, {args.gpus} ranks): measured "
              + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in ep.items())
              + "; the simulator prices the same region at " + ", ".join(f"{k} {v:.3f}" for k, v in price.items()))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
