"""EP dispatch + combine bandwidth against plain NCCL all_to_all_single at the same message sizes (#9).

    PYTHONPATH=src python3 benchmarks/ep_exchange.py --out DIR [--ranks 2] [--tokens 8192] [--preset small]

Runs itself under torchrun. Each EP exchange is timed as the MoE layer issues it, through dsv3's own
autograd Functions and transport (forward and backward, the balanced routing of a settled run), beside a plain
``all_to_all_single`` that sends the same bytes to each peer:

- ``allgather`` (the default at ep = 2): x [T, D] and the routing meta [T, 2K] fp32 packed into one
  all-gather, the partials [ep*T, D] returned by an equal all-to-all and summed in fp32; backward: the
  all-to-all + sum of the gather's gradients and the all-gather of the output gradient
  (``dsv3.parallel.ep_allgather``), compiled as the trainer compiles them.
- ``alltoall``: the counts exchange, the host read of the splits, the copies' all-to-all there and back
  (``dsv3.parallel.transport.all_to_all``), forward and backward.

Bytes are those to the OTHER ranks (what crosses the link), per rank. The fraction is plain time / dsv3 time
over the same list of sizes (1.0: no loss against raw NCCL). Writes DIR/ep_exchange.json and prints a table.
Expert compute is left out on purpose: this measures the transport path, and the step-level cost of EP
(waiting for the busier rank included) is ``benchmarks/distributed.py``'s ep_scaling.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _timeit(fn, reps: int) -> float:
    import torch
    import torch.distributed as dist
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    dist.barrier()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t) / reps


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from dsv3.config import preset
    from dsv3.parallel.ep_allgather import _ReduceTokens, gather_packed, packed_width, return_packed
    from dsv3.parallel.transport import CollectiveTransport, all_to_all

    cuda = torch.cuda.is_available()            # the CPU (gloo) only to try the script out
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, ep = dist.get_rank(), dist.get_world_size()
    dev = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
    cfg = preset(args.preset)
    T, D, K, E = args.tokens, cfg.hidden_size, cfg.num_experts_per_tok, cfg.n_routed_experts
    t = CollectiveTransport(dist.group.WORLD, dist.new_group(list(range(ep))))
    bf = torch.bfloat16
    peers = ep - 1

    def plain(peer_bytes: int, elem: int = 2) -> float:
        # an even all_to_all_single whose blocks to the other ranks total peer_bytes
        n = max(peer_bytes // elem // peers, 1) * ep
        x = torch.randn(n, device=dev).to(bf if elem == 2 else torch.float32)
        y = torch.empty_like(x)
        return _timeit(lambda: dist.all_to_all_single(y, x), args.reps)

    rows = {}
    # allgather, as the layer issues it: forward = one all-gather of x and the routing meta packed
    # (gather_packed), the partials' all-to-all + fp32 sum (_ReduceTokens); backward = the output gradient's
    # all-gather, and the all-to-all + fp32 sums of the packed gradients (return_packed). Compiled, as the
    # trainer runs them inside the block (eager functional collectives cost ~0.5 ms of host time a call)
    meta = torch.randn(T, 2 * K, device=dev)
    x = torch.randn(T, D, device=dev, dtype=bf, requires_grad=True)
    part = torch.randn(ep * T, D, device=dev, dtype=bf, requires_grad=True)
    g_out = torch.randn(T, D, device=dev, dtype=bf)
    parts = [(torch.float32, 2 * K), (bf, D)]
    width = packed_width(parts)

    @torch.library.custom_op("dsv3bench::fresh_rows", mutates_args=(),
                             schema="(Tensor src, int n, int cols) -> Tensor")
    def fresh_rows(src, n, cols):
        """A new [n, cols] buffer in src's dtype, unwritten but for row 0's first columns (copied from src's):
        what the stand-in experts hand on. Opaque to Inductor, so that no pass over the buffer is made (a
        slice assignment in the graph became a slice_scatter that wrote every row)."""
        out = src.new_empty(n, cols)
        k = min(cols, src.shape[1])
        out[:1, :k].copy_(src[:1, :k])
        return out

    @fresh_rows.register_fake
    def _(src, n, cols):
        return src.new_empty(n, cols)

    class StandInExperts(torch.autograd.Function):
        """The dispatch with free "experts": the partials [ep*T, D] are a fresh buffer, and so is the packed
        gradient buffer [ep*T, width] the backward sends. The layer's experts write both anyway (the expert
        combine writes the partials; the gate/up gather-sum writes the x gradient straight into the packed
        rows, ``gather_sum_local_packed``), so neither is the exchange's cost. One row of each is copied so
        that the collectives before them have a consumer (and are neither reordered nor dropped)."""

        @staticmethod
        def forward(ctx, m, h):
            _, x_all = gather_packed(t, [m, h])
            return fresh_rows(x_all, ep * T, D)

        @staticmethod
        def backward(ctx, g):
            buf = fresh_rows(g.contiguous().view(torch.uint8), ep * T, width)
            return tuple(return_packed(t, buf, parts))

    dispatch = torch.compile(lambda m, h: StandInExperts.apply(m, h), fullgraph=True)
    combine = torch.compile(lambda p: _ReduceTokens.apply(p, t), fullgraph=True)
    L = args.layers

    def stacked(m, h):
        # L layers' exchanges in one graph, as a step issues them between blocks, so that the host's per-graph
        # cost is not what gets timed
        for _ in range(L):
            h = _ReduceTokens.apply(StandInExperts.apply(m, h), t)
        return h

    stacked_c = torch.compile(stacked, fullgraph=True)
    sizes_layer = [T * width] * 2 + [T * D * 2] * 2
    ops = {
        f"allgather: dispatch + combine fwd+bwd, {L} layers in one graph (per layer)": (
            lambda: stacked_c(meta, x).backward(g_out), sizes_layer, L),
    }
    if cuda:
        # the same graph replayed as CUDA graphs (train.compile_mode = "reduce-overhead"): the GPU's time for the
        # exchange. Eager, the host's cost per functional collective (~150 us) exceeds the GPU's per-layer work
        # on the H200 hosts, so the row above times the host
        stacked_g = torch.compile(stacked, fullgraph=True, mode="reduce-overhead")
        ops[f"allgather: dispatch + combine fwd+bwd, {L} layers, CUDA graphs (per layer)"] = (
            lambda: stacked_g(meta, x).backward(g_out), sizes_layer, L)
    ops.update({
        "allgather: dispatch (x + meta) fwd+bwd": (
            lambda: dispatch(meta, x).backward(part.detach()), [T * width] * 2, 1),
        "allgather: combine fwd+bwd": (lambda: combine(part).backward(g_out), [T * D * 2] * 2, 1),
    })
    # alltoall: balanced routing, T*K/ep copies to each rank; the counts exchange and the host read per call
    per = T * K // ep
    splits = [per] * ep
    copies = torch.randn(ep * per, D, device=dev, dtype=bf, requires_grad=True)
    g_copies = torch.randn(ep * per, D, device=dev, dtype=bf)
    counts = torch.full((ep * (E // ep),), T * K // E, device=dev, dtype=torch.int64)

    def a2a_layer():
        got = t.all_to_all(counts, [E // ep] * ep, [E // ep] * ep)
        got.view(ep, -1).sum(1).tolist()                 # the host read the layer makes
        recv = all_to_all(copies, t, splits, splits)
        back = all_to_all(recv, t, splits, splits)        # combine: the expert outputs return
        back.backward(g_copies)

    ops["alltoall: counts + dispatch + combine fwd+bwd"] = (a2a_layer, [per * D * 2] * 4, 1)
    for name, (fn, sizes, layers) in ops.items():
        try:
            ours = _timeit(fn, args.reps) / layers
        except Exception as e:        # a row that fails (CUDA graph capture) is reported; the others still run
            print(f"rank {rank}: {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        # the plain reference: the same collectives' sizes (bytes to each peer), one by one
        sizes = [b * peers for b in sizes]
        ref = sum(plain(b) for b in sizes)
        peer_bytes = sum(sizes)
        rows[name] = {"ours_s": ours, "plain_s": ref, "peer_bytes": peer_bytes,
                      "ours_gbps": peer_bytes / ours / 1e9, "plain_gbps": peer_bytes / ref / 1e9,
                      "fraction": ref / ours}
    if rank == 0:
        res = {"device": f"{ep} x {torch.cuda.get_device_name(dev) if cuda else 'CPU (gloo)'}", "torch": torch.__version__,
               "config": f"{args.preset}: T={T} tokens per rank per micro-batch, D={D}, top-{K}, {E} experts, "
                         f"ep={ep}, bf16 payload, balanced routing, {args.reps} reps",
               "ops": rows}
        # the headline: the stacked layers (what a step issues); the single-op rows pay a graph call each
        # (replayed as CUDA graphs where there is a GPU: the exchange's GPU time, not the host's)
        eager_key = next(k for k in rows if "in one graph" in k)
        head = rows[next((k for k in rows if "CUDA graphs" in k), eager_key)]
        res["allgather_fraction_of_nccl_eager"] = rows[eager_key]["fraction"]
        res["allgather_fraction_of_nccl"] = head["fraction"]
        res["allgather_layer_s"] = head["ours_s"]
        res["alltoall_fraction_of_nccl"] = rows["alltoall: counts + dispatch + combine fwd+bwd"]["fraction"]
        res["alltoall_layer_s"] = rows["alltoall: counts + dispatch + combine fwd+bwd"]["ours_s"]
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "ep_exchange.json").write_text(json.dumps(res, indent=2) + "\n")
        print(f"{'exchange (per layer, per micro-batch)':48s} {'dsv3 us':>9s} {'plain us':>9s} {'GB/s':>7s} "
              f"{'plain GB/s':>10s} {'fraction':>8s}")
        for k, v in rows.items():
            print(f"{k:48s} {v['ours_s'] * 1e6:9.1f} {v['plain_s'] * 1e6:9.1f} {v['ours_gbps']:7.1f} "
                  f"{v['plain_gbps']:10.1f} {v['fraction']:8.3f}")
        print(f"allgather dispatch+combine: {res['allgather_fraction_of_nccl']:.3f} of plain all_to_all_single, "
              f"layer {res['allgather_layer_s'] * 1e6:.0f} us vs alltoall {res['alltoall_layer_s'] * 1e6:.0f} us")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ranks", type=int, default=2, help="processes (GPUs)")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per rank per micro-batch (2 x 4096)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--layers", type=int, default=16, help="MoE layers per step (small: 15 + 1 MTP)")
    args = ap.parse_args()
    if "LOCAL_RANK" in os.environ:
        return worker(args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks), "--master_port",
           "29491", __file__, *sys.argv[1:]]
    raise SystemExit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
