"""run_pipeline_step: one optimizer step's forwards and backwards over the pipeline group.

Every pp rank calls it with its own stages (build_stages) and the SAME micro-batches; it runs this rank's
op list (schedules.py), moves activations and gradients (comm.py), and leaves in ``.grad`` of the stage
parameters exactly what a single-process backward of sum_m weight_m * loss_m would leave (weights default
to 1/M: the mean over micro-batches). Loss values and expert counts are summed over the pp group so every
rank returns the same numbers (a NaN-skip decision therefore agrees on all ranks).
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from dsv3.parallel.pipeline import backward as bw
from dsv3.parallel.pipeline.comm import Comm, Mailbox
from dsv3.parallel.pipeline.partition import check_schedule, chunk_owner
from dsv3.parallel.pipeline.schedules import build_schedule, check_micro_batches
from dsv3.parallel.pipeline.stage import PipelineStage, StageOutput
from dsv3.parallel.pipeline.trace import Tracer


def _group_info(group) -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def run_pipeline_step(schedule: str, stages: Sequence[PipelineStage], micro_batches: Sequence[dict],
                      loss_fn, *, group=None, weights: Sequence[float] | None = None,
                      split_backward: bool = True, forward_context: Callable[[], contextlib.AbstractContextManager] | None = None,
                      trace: str | Path | None = None, act_dtype: torch.dtype | None = None,
                      lookahead: int = 2, cuda_overlap: bool = False,
                      p2p_groups: dict | None = None) -> tuple[torch.Tensor, dict]:
    """Run one step; returns (loss, aux).

    schedule: "1f1b" or "dualpipev". stages: this rank's stages from build_stages (same schedule and pp).
    micro_batches: dicts with ``input_ids`` [b,S], ``labels`` [b,S], optional ``doc_ids``; identical on
    every pp rank. loss_fn: a PipelineLoss (linear in the parts; ``want_balance`` turns on the balance
    loss). group: the pipeline process group (None = the default group). weights: per micro-batch loss
    weight (default 1/M; the trainer's token weighting n_tokens_m / n_tokens also works).
    split_backward: DualPipeV's B/W split (ignored by 1F1B, which always runs full backwards).
    forward_context: e.g. ``lambda: torch.autocast("cuda", torch.bfloat16)`` around each forward.
    p2p_groups: {(src pp rank, dst pp rank): group}, one communicator per direction (Mesh.p2p_groups);
    needed on NCCL, where both directions on one communicator can deadlock (see build_p2p_groups).
    trace: a directory; writes ``pp_rank{r}.json`` (Chrome trace) there.
    cuda_overlap: on CUDA, run the forward half of each F&B pair on a second stream so its kernels can
    overlap the backward half's (EXPERIMENTAL, not yet run on a GPU; see _PairStreams). Off: one stream,
    P2P still overlaps compute because NCCL transfers run on NCCL's own streams.

    aux: ``loss_parts`` {main, mtp_k, balance} (weighted over micro-batches, summed over stages),
    ``expert_counts`` [n_moe_layers, E] int64 summed over micro-batches and pp ranks (order of
    model.moe_layers()), ``timings`` {step_s, compute_s, recv_wait_s, bubble_fraction, per-kind seconds},
    ``trace_path``. The MoE layers' own ``tokens_per_expert`` buffers also accumulate on the rank that
    runs them, so train.balance.update_balance_biases on the full model works unchanged.
    """
    s = check_schedule(schedule)
    rank, pp = _group_info(group)
    M = len(micro_batches)
    check_micro_batches(s, pp, M)           # UserError on every rank, before any communication
    want = sorted(st.chunk for st in stages)
    from dsv3.parallel.pipeline.partition import rank_chunks
    if want != rank_chunks(rank, s, pp):
        raise ValueError(f"pp rank {rank} got chunks {want}, {s} on pp = {pp} expects {rank_chunks(rank, s, pp)}")
    weights = [1.0 / M] * M if weights is None else list(weights)
    by_chunk = {st.chunk: st for st in stages}
    C = stages[0].num_chunks
    all_ops = build_schedule(s, pp, M)
    ops = all_ops[rank]
    params = {g: [p for p in st.parameters() if p.requires_grad] for g, st in by_chunk.items()}
    ref_param = next(iter(stages[0].parameters()))
    device = ref_param.device
    dtype = act_dtype or ref_param.dtype
    hidden = stages[0].config.hidden_size
    tracer = Tracer(enabled=trace is not None, rank=rank)
    comm = Comm(rank, all_ops, s, pp, group, lambda mb: (*micro_batches[mb]["input_ids"].shape, hidden),
                dtype, device, tracer, M, lookahead, p2p_groups) if pp > 1 else None
    local = Mailbox()
    fwd_ctx = forward_context or contextlib.nullcontext

    inputs: dict[tuple, torch.Tensor | None] = {}
    outputs: dict[tuple, StageOutput] = {}
    wjobs: dict[tuple, bw.WeightGrad] = {}
    parts_sum: dict[str, torch.Tensor] = {}
    n_moe = stages[0].num_moe_layers
    E = stages[0].config.n_routed_experts
    counts = torch.zeros(max(n_moe, 1), E, dtype=torch.int64, device=device)
    compute = collections_counter()
    t_start = time.perf_counter()

    def get(kind: str, g_src: int, mb: int) -> torch.Tensor:
        """A message from chunk g_src: in memory if that chunk is ours, else from the network."""
        if g_src in by_chunk:
            return local.take(kind, g_src, mb)
        return comm.recv(kind, g_src, mb)

    def put(kind: str, g: int, mb: int, t: torch.Tensor) -> None:
        dst_chunk = g + 1 if kind == "act" else g - 1
        if dst_chunk in by_chunk:
            local.put(kind, g, mb, t.detach())
        else:
            comm.send(kind, g, mb, t)

    streams = _PairStreams(device) if cuda_overlap and device.type == "cuda" else None
    for i, op in enumerate(ops):
        g, mb = op.chunk, op.mb
        if comm is not None:
            comm.prefetch()
        if op.kind == "F":
            paired = i + 1 < len(ops) and ops[i + 1].pair
            x = None
            if g > 0:
                x = get("act", g - 1, mb).detach().to(dtype).requires_grad_()
            stream_ctx = streams.forward() if (streams is not None and paired) else contextlib.nullcontext()
            with stream_ctx:     # everything touching the F's results stays on the F's stream until joined
                with tracer.span(f"F{g}.{mb}", "F"), fwd_ctx():
                    t0 = time.perf_counter()
                    out = by_chunk[g](x, micro_batches[mb], loss_fn, weights[mb])
                    compute["F"] += time.perf_counter() - t0
                inputs[(g, mb)], outputs[(g, mb)] = x, out
                for k, v in out.parts.items():
                    parts_sum[k] = parts_sum.get(k, 0) + v.float() * weights[mb]
                for layer_idx, c in out.counts.items():
                    counts[layer_idx] += c
                if g < C - 1:
                    put("act", g, mb, out.out)
        elif op.kind == "B":
            out, x = outputs.pop((g, mb)), inputs.pop((g, mb))
            if g == C - 1:
                outs, gouts = [out.out], [None]
            else:
                outs, gouts = [out.out, out.aux], [get("grad", g + 1, mb).to(out.out.dtype), None]
            name = f"B{'i' if op.split and split_backward and s == 'dualpipev' else ''}{g}.{mb}"
            with tracer.span(name, "B"):
                t0 = time.perf_counter()
                if op.split and split_backward:
                    d_in, wjobs[(g, mb)] = bw.backward_input(outs, gouts, x, params[g])
                else:
                    d_in = bw.backward_full(outs, gouts, x)
                compute["B"] += time.perf_counter() - t0
            del out, outs, gouts
            if op.pair and streams is not None:
                streams.join(inputs.get((ops[i - 1].chunk, ops[i - 1].mb)),
                             outputs[(ops[i - 1].chunk, ops[i - 1].mb)].out)
            if g > 0:
                put("grad", g, mb, d_in)
        else:  # W
            job = wjobs.pop((g, mb), None)
            if job is not None:          # None when split_backward=False ran a full B instead
                with tracer.span(f"W{g}.{mb}", "W"):
                    t0 = time.perf_counter()
                    job.run()
                    compute["W"] += time.perf_counter() - t0
    if comm is not None:
        comm.finish()
    assert not wjobs and not outputs, "pipeline step left work behind"
    sync_tied_grads(stages, s, pp, group)
    step_s = time.perf_counter() - t_start

    # Sum the report over the pp group: each stage saw only its layers' counts and loss parts.
    names = _part_names(stages[0], loss_fn)
    vec = torch.stack([torch.as_tensor(parts_sum.get(n, 0.0), dtype=torch.float64, device=device).reshape(())
                       for n in names]) if names else torch.zeros(0, dtype=torch.float64, device=device)
    if pp > 1:
        dist.all_reduce(vec, group=group)
        dist.all_reduce(counts, group=group)
    loss_parts = {n: vec[i].float() for i, n in enumerate(names)}
    loss = loss_fn(loss_parts) if loss_parts else torch.zeros((), device=device)
    busy = sum(compute.values())
    timings = {"step_s": step_s, "compute_s": busy, "recv_wait_s": comm.wait_s if comm else 0.0,
               "bubble_fraction": max(0.0, 1.0 - busy / step_s) if step_s > 0 else 0.0,
               **{f"{k}_s": v for k, v in compute.items()}}
    aux = {"loss_parts": loss_parts, "expert_counts": counts[:n_moe], "timings": timings, "trace_path": None}
    if trace is not None:
        aux["trace_path"] = str(tracer.write(Path(trace) / f"pp_rank{rank}.json"))
    return loss.detach(), aux


class _PairStreams:
    """CUDA streams for an F&B pair: the F runs on ``side`` while the B runs on the current stream.

    Ordering: the side stream first waits for everything queued on the current stream (the F's input
    arrived there); after the pair, the current stream waits for the side stream, so later ops see the
    F's results. Tensors made on the side stream and used on the current one are ``record_stream``-ed so
    the caching allocator does not hand their memory back to the side stream early. Autograd runs each
    backward op on its forward op's stream and synchronizes across streams itself.
    """

    def __init__(self, device: torch.device):
        self.side = torch.cuda.Stream(device=device)

    @contextlib.contextmanager
    def forward(self):
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            yield

    def join(self, *tensors) -> None:
        cur = torch.cuda.current_stream()
        cur.wait_stream(self.side)
        for t in tensors:
            if t is not None:
                t.record_stream(cur)


def collections_counter() -> dict[str, float]:
    return {"F": 0.0, "B": 0.0, "W": 0.0}


def _part_names(stage: PipelineStage, loss_fn) -> list[str]:
    """The loss parts every rank reports, in a fixed order (all ranks must all-reduce the same vector)."""
    names = ["main"] + [f"mtp_{k}" for k in range(1, stage.config.num_nextn_predict_layers + 1)]
    if getattr(loss_fn, "want_balance", False) and stage.num_moe_layers > 0:
        names.append("balance")
    return names


def sync_tied_grads(stages: Sequence[PipelineStage], schedule: str, pp: int, group=None) -> None:
    """Sum the gradient of a parameter held by two ranks (1F1B with MTP: the embedding on rank 0 and on the
    last rank) so both copies get the full gradient and stay equal after identical optimizer steps."""
    if check_schedule(schedule) != "1f1b" or pp == 1:
        return
    rank, _ = _group_info(group)
    last = chunk_owner(pp - 1, schedule, pp)
    has_mtp = len(stages[0]._model_ref[0].mtp) > 0
    if not has_mtp or rank not in (0, last):
        return
    st = stages[0]
    # the FP32 parameter, also if the stage held a bf16 compute copy of it (train.weight_cast = "per_step", whose
    # hooks move every gradient into the master; it copies no embedding today, so this is the parameter itself)
    from dsv3.train.compute_weights import master_of
    p = master_of(st.get_parameter("embed_tokens.weight"))
    g = p.grad if p.grad is not None else torch.zeros_like(p)
    peer = last if rank == 0 else 0
    gp = lambda r: dist.get_global_rank(group, r) if group is not None else r  # noqa: E731
    other = torch.empty_like(g)
    reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, g.contiguous(), gp(peer), group),
                                   dist.P2POp(dist.irecv, other, gp(peer), group)])
    for r in reqs:
        r.wait()
    # rank 0 adds (own + last's), the last rank (own + rank 0's): the same two numbers, so equal sums
    p.grad = g + other if rank == 0 else other + g
