"""Expert parallelism with fixed-size exchanges (``parallel.ep_dispatch = "allgather"``): no host sync.

The other dispatch ("alltoall", ``dsv3.parallel.expert_parallel``) sends each token copy to the rank holding
its expert. That moves the fewest rows when ep is large, but the splits are uneven: the host reads them once
per MoE layer, the CPU can no longer run ahead of the GPU, and the exchange runs outside the compiled block.

Here every rank of the EP group receives every token of the group once:

1. dispatch: all-gather x [T, D] and the routing (indices and weights as [T, 2K] fp32), packed side by side
   as bytes into one buffer (one collective) -> [ep*T, ...];
2. each rank runs its local experts on the copies that chose them: the ep*T*K slots sorted by local expert
   (slots of other ranks' experts sort last and are never computed: the grouped GEMMs stop at the last
   group's end), and sums each token's local copies, weighted, in fp32 -> one partial [ep*T, D];
3. combine: an equal-split all-to-all returns partial block p to rank p, which adds its ep partials in fp32,
   in rank order (deterministic; no reduce-scatter summing in BF16 on the wire).

Every size follows from T, so nothing waits on the host, and the whole layer, collectives included (torch's
functional collectives), traces into the compiled block's graph.

Cost against "alltoall", per rank, layer and direction (balanced routing): it sends T rows to each peer,
where "alltoall" sends about T*K/ep copies to each: ep/K of the bytes (a third at ep = 2 with K = 6; more bytes
once ep > K, so large EP groups should keep "alltoall"). The local sort runs over ep*T*K slots where about
T*K are local (the grouped GEMMs, and the slot kernels' bytes, are those of the local copies only), and the
slot buffers
the backward keeps (the gathered rows, the SwiGLU pre-activations, the expert outputs: [ep*T*K, D or F]) are ep
times the single-device ones: at `small`'s 2 x 4096-token micro-batches about 7 GB more per micro-batch in
flight at ep = 2. So "auto" picks this mode at ep = 2 only (``expert_parallel.resolve_dispatch``).

Rows past the last group (the other ranks' copies) are never written by the grouped GEMMs, nor read. The four
passes over the slots skip them (``dsv3.kernels.local_slots``, Triton on CUDA): the gather writes only the
local rows, and the combine, its backward and the gather's backward load only the local copies' rows. Those
rows hold whatever the allocator left there, possibly NaN, so the CPU references drop them with ``where`` (not
a multiply by zero) inside their gather-reduce.

Gradients: the backward of the all-gather is an equal all-to-all of each rank's gradients for the other
ranks' tokens, summed in fp32 in rank order (every token slot's weight gradient is non-zero on one rank
only). Its send buffer is written by the gate/up backward's gather-sum itself, x's gradient rows behind the
routing weights' gradient (``_DispatchGateUp``: the dispatch and the gate/up GEMMs are one Function for this),
so the exchange adds no pass over the gradients before the all-to-all. The backward of the combine is the all-gather of the output gradient. In fp32, results match one
process to summation order (tested with 2 gloo processes against the single-process run). In BF16 each rank's
partial is rounded before the cross-rank sum, one rounding more than one process (as DeepEP's BF16 combine).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.kernels.casting import cast_result
from dsv3.kernels.local_slots import (combine_backward_local, combine_backward_local_reference, combine_local,
                                      combine_local_reference, gather_rows_upto, gather_sum_local,
                                      gather_sum_local_packed, gather_sum_local_packed_reference,
                                      gather_sum_local_reference, pack_bytes)
from dsv3.model.moe import Routing, compute_dtype, count_selections, gathered_gate_up_backward, grouped_linear
from dsv3.parallel.transport import Transport, backward_transport


# The slot passes as Triton kernels that skip the other ranks' copies (on CUDA; their torch references on the
# CPU) when True; False: the torch expressions everywhere (Inductor's kernels, which move every slot's row),
# for A/B timing. Read at trace time: reset dynamo after flipping it.
SLOT_KERNELS = True


def packed_width(parts: list[tuple[torch.dtype, int]]) -> int:
    """Bytes per token of ``parts`` ((dtype, columns) each) packed side by side, rounded up to 16."""
    return -(-sum(dt.itemsize * cols for dt, cols in parts) // 16) * 16


def _unpack(buf: torch.Tensor, parts: list[tuple[torch.dtype, int]]) -> list[torch.Tensor]:
    """The views of ``pack_bytes``'s parts in a [R, width] uint8 buffer (strided: no copies)."""
    out, start = [], 0
    for dt, cols in parts:
        out.append(buf[:, start:start + dt.itemsize * cols].view(dt))
        start += dt.itemsize * cols
    return out


def gather_packed(transport: Transport, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Tensors [T, c_i] on every rank -> each [ep*T, c_i], rank-major, in ONE all-gather: their bytes packed
    side by side (the routing meta rides with x: one collective per layer and direction fewer, whose host
    cost, ~150 us a call, paced the host-bound EP step). The results are strided views of the gathered
    buffer. Put the widest dtypes first: each part's byte offset must be a multiple of its item size."""
    parts = [(t.dtype, t.shape[1]) for t in tensors]
    return _unpack(transport.all_gather(pack_bytes(tensors, packed_width(parts))), parts)


def return_packed(transport: Transport, buf: torch.Tensor, parts: list[tuple[torch.dtype, int]]
                  ) -> list[torch.Tensor]:
    """The backward of ``gather_packed``: ``buf`` [ep*T, width] holds, packed the same way, this rank's
    gradients for every rank's tokens; block p goes to rank p in one equal all-to-all, and each rank sums the
    ep blocks it receives in fp32, in rank order -> each part's gradient [T, c_i]."""
    t = backward_transport(transport)
    recv = t.all_to_all_equal(buf)
    return [g.view(t.size, -1, cols).float().sum(dim=0).to(dt) for (dt, cols), g in zip(parts, _unpack(recv, parts))]


class _ReduceTokens(torch.autograd.Function):
    """Partials [ep*T, D] (block p: this rank's partial outputs for rank p's tokens) -> [T, D], the ep partials
    of this rank's tokens summed in fp32, in rank order. Backward: the all-gather of the gradient."""

    @staticmethod
    def forward(ctx, partial, transport: Transport):
        ctx.transport = transport
        parts = transport.all_to_all_equal(partial).view(transport.size, -1, *partial.shape[1:])
        return cast_result(parts.float().sum(dim=0), partial.dtype)

    @staticmethod
    def backward(ctx, g):
        return backward_transport(ctx.transport).all_gather(g.contiguous()), None


def slot_gemm(x_MI: torch.Tensor, w_EOI: torch.Tensor, ends_E: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """y = x w[e]^T over the rows of each local group; rows past the last group are left unwritten (the tests
    swap this for a version that makes them NaN)."""
    return grouped_linear(x_MI, w_EOI, ends_E, counts_E)


def local_slot_order(idx_NK: torch.Tensor, first: int, E_local: int):
    """The N tokens' N*K slots sorted by local expert [first, first + E_local), the other ranks' copies last
    -> (order, inverse [N*K], mine_NK, counts [E_local], ends int32 [E_local], local copies: a device scalar)."""
    local_NK = idx_NK - first
    mine_NK = (local_NK >= 0) & (local_NK < E_local)
    key = torch.where(mine_NK, local_NK, E_local).reshape(-1)       # other ranks' copies sort last
    order = torch.argsort(key, stable=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    counts = count_selections(key, E_local + 1)[:E_local]
    ends = torch.cumsum(counts, 0)
    return order, inverse, mine_NK, counts, ends.to(torch.int32), ends[-1]


def _gate_up_forward(x_ND, w_gate, w_up, order, K, ends_E, counts_E):
    """The local slots' rows x[order // K] (rows from the last group's end on never written on CUDA) and
    their (gate, up) GEMMs -> (x_MD, gate, up)."""
    src = order // K
    x_MD = gather_rows_upto(x_ND, src, ends_E[-1]) if SLOT_KERNELS else x_ND[src]
    return x_MD, slot_gemm(x_MD, w_gate, ends_E, counts_E), slot_gemm(x_MD, w_up, ends_E, counts_E)


class _SlotsGateUp(torch.autograd.Function):
    """(gate, up) = (x_s w_gate[e]^T, x_s w_up[e]^T) for the local slots x_s = x[order // K] (rows from
    ``n_local`` on, the other ranks' copies, are never computed: the gather leaves them unwritten on CUDA).

    One Function for the gather and both GEMMs so that the backward sums the two input gradients inside the
    gather-sum over each token's local copies (``gather_sum_local(g_gate, rows, mine, g_up)``). Left to
    autograd, the two [ep*T*K, D] input gradients were first added over every slot, garbage rows included (296
    us per `small` EP=2 layer on an H100, more than the gather-sum itself). The layer itself runs
    ``_DispatchGateUp`` (this plus the dispatch all-gather); this one is its local half, for the tests and
    ``benchmarks/ep_local_probe.py``."""

    @staticmethod
    def forward(ctx, x_ND, w_gate, w_up, order, copy_rows, mine_NK, ends_E, counts_E):
        x_MD, gate, up = _gate_up_forward(x_ND, w_gate, w_up, order, mine_NK.shape[1], ends_E, counts_E)
        ctx.save_for_backward(x_MD, w_gate, w_up, copy_rows, mine_NK, ends_E, counts_E)
        return gate, up

    @staticmethod
    def backward(ctx, g_gate, g_up):
        x_MD, w_gate, w_up, copy_rows, mine_NK, ends_E, counts_E = ctx.saved_tensors
        gather_sum = gather_sum_local if SLOT_KERNELS else gather_sum_local_reference
        dx, dwg, dwu = gathered_gate_up_backward(
            ctx.needs_input_grad, g_gate, g_up, x_MD, w_gate, w_up, ends_E, counts_E, slot_gemm,
            lambda dx_gate, dx_up: gather_sum(dx_gate, copy_rows, mine_NK, dx_up))
        return dx, dwg, dwu, None, None, None, None, None


class _DispatchGateUp(torch.autograd.Function):
    """The dispatch and the local experts' gate/up GEMMs as one Function:

    forward: x [T, D] and meta [T, 2K] (routing weights, then indices, fp32) all-gathered in one packed
    collective; this rank's slots sorted (``local_slot_order``); (gate, up) of the local copies
    (``_SlotsGateUp``'s forward). Returns gate, up, the gathered routing weights [ep*T, K] (a view of the
    gathered buffer) and the slot order the combine needs (not differentiable).

    backward: the gate/up input gradients are summed per token straight into the rows of the packed buffer
    the return all-to-all sends, behind the routing weights' gradient (``gather_sum_local_packed``). Built
    from separate Functions, autograd handed the x gradient [ep*T, D] to the gather's backward, which copied it
    and the weights' gradient into that buffer: a pass over 2 x 25 MB per `small` layer and micro-batch at
    ep = 2, on the exchange's critical path."""

    @staticmethod
    def forward(ctx, transport, meta_TK2, x_TD, w_gate, w_up, first):
        K = meta_TK2.shape[1] // 2
        meta_all, x_all = gather_packed(transport, [meta_TK2, x_TD])
        order, inverse, mine_NK, counts, ends32, n_local = local_slot_order(meta_all[:, K:].long(), first,
                                                                            w_gate.shape[0])
        x_MD, gate, up = _gate_up_forward(x_all, w_gate, w_up, order, K, ends32, counts)
        ctx.save_for_backward(x_MD, w_gate, w_up, inverse, mine_NK, ends32, counts)
        ctx.transport = transport
        ctx.parts = [(meta_TK2.dtype, 2 * K), (x_TD.dtype, x_TD.shape[1])]
        ctx.mark_non_differentiable(inverse, mine_NK, ends32, counts, n_local)
        return gate, up, meta_all[:, :K], inverse, mine_NK, ends32, counts, n_local

    @staticmethod
    def backward(ctx, g_gate, g_up, g_weight, *_):
        x_MD, w_gate, w_up, inverse, mine_NK, ends32, counts = ctx.saved_tensors
        needs_meta, needs_x = ctx.needs_input_grad[1:3]
        if not (needs_meta or needs_x):      # the experts' weights alone: no exchange
            _, dwg, dwu = gathered_gate_up_backward((False, *ctx.needs_input_grad[3:5]), g_gate, g_up, x_MD,
                                                    w_gate, w_up, ends32, counts, slot_gemm, None)
            return None, None, None, dwg, dwu, None
        width = packed_width(ctx.parts)
        # the indices' half of the meta has no gradient: zeros ride in its columns
        head = torch.cat([g_weight.float(), torch.zeros_like(g_weight, dtype=torch.float32)], dim=1)
        pack = gather_sum_local_packed if SLOT_KERNELS else gather_sum_local_packed_reference
        buf, dwg, dwu = gathered_gate_up_backward(
            (True, ctx.needs_input_grad[3], ctx.needs_input_grad[4]), g_gate, g_up, x_MD, w_gate, w_up, ends32,
            counts, slot_gemm, lambda dx_gate, dx_up: pack(dx_gate, dx_up, inverse, mine_NK, head, width))
        g_meta, g_x = return_packed(ctx.transport, buf, ctx.parts)
        return None, g_meta if needs_meta else None, g_x if needs_x else None, dwg, dwu, None


class _CombineLocal(torch.autograd.Function):
    """partial[n] = sum over token n's local copies k of w[n, k] * y[rows[n*K + k]], in fp32, returned in y's
    dtype; the other copies' rows (garbage, possibly NaN) are never read. Backward, token by token: dy[rows[n*K
    + k]] = w[n, k] g[n] and dw[n, k] = <g[n], y[row]> for local copies, dw = 0 for the rest."""

    @staticmethod
    def forward(ctx, y_MD, rows, w_NK, mine_NK):
        ctx.save_for_backward(y_MD, rows, w_NK, mine_NK)
        if SLOT_KERNELS:
            return combine_local(y_MD, rows, w_NK, mine_NK)
        return combine_local_reference(y_MD, rows, w_NK, mine_NK)

    @staticmethod
    def backward(ctx, g_ND):
        y_MD, rows, w_NK, mine_NK = ctx.saved_tensors
        if SLOT_KERNELS:
            dy, dw = combine_backward_local(g_ND, y_MD, rows, w_NK, mine_NK)
        else:
            dy, dw = combine_backward_local_reference(g_ND, y_MD, rows, w_NK, mine_NK)
        return dy, None, dw, None


def local_experts_partial(x_ND: torch.Tensor, idx_NK: torch.Tensor, weight_NK: torch.Tensor, first: int,
                          w_gate, w_up, w_down) -> tuple[torch.Tensor, torch.Tensor]:
    """The local experts [first, first + E_local) applied to the N tokens' copies that chose them:
    -> (partial [N, D] = sum over token n's local copies of weight * expert(x_n), in fp32, returned in x's dtype;
    the number of local copies, a device scalar). Fixed shapes throughout: no host read. (The layer's own
    composition, dispatch included, is ``allgather_experts_forward``; this is its local work alone.)"""
    order, inverse, mine_NK, counts, ends32, n_local = local_slot_order(idx_NK, first, w_gate.shape[0])
    gate, up = _SlotsGateUp.apply(x_ND, w_gate, w_up, order, inverse, mine_NK, ends32, counts)
    return _down_combine(gate, up, w_down, inverse, weight_NK, mine_NK, ends32, counts), n_local


def _down_combine(gate, up, w_down, inverse, weight_NK, mine_NK, ends32, counts):
    y_sorted = slot_gemm(F.silu(gate) * up, w_down, ends32, counts)
    return _CombineLocal.apply(y_sorted, inverse, weight_NK, mine_NK)


def allgather_experts_forward(x_TD: torch.Tensor, routing: Routing, w_gate, w_up, w_down, transport: Transport,
                              first: int, stats: torch.Tensor | None = None) -> torch.Tensor:
    """Routed-expert output [T, D]: every token to every EP rank, local experts, partial sums back (module
    docstring). ``stats`` (int64 [2], in place): += (local copies computed, bytes sent to each peer); counted at
    every forward, evaluation and activation-recompute replays included, as the "alltoall" meter counts."""
    T, D = x_TD.shape
    K = routing.idx_TK.shape[1]
    dtype = compute_dtype(x_TD)
    wg, wu, wd = (w.to(dtype) for w in (w_gate, w_up, w_down))
    # indices travel as fp32 beside the weights (exact below 2^24 experts), and both beside x: one all-gather
    meta_TK2 = torch.cat([routing.weight_TK.float(), routing.idx_TK.float()], dim=1)
    gate, up, weight_all, inverse, mine_NK, ends32, counts, rows = _DispatchGateUp.apply(
        transport, meta_TK2, x_TD.to(dtype), wg, wu, first)
    partial = _down_combine(gate, up, wd, inverse, weight_all, mine_NK, ends32, counts)
    if stats is not None:
        # dispatch (x and the meta, packed) + combine, to each peer
        per_peer = T * (packed_width([(torch.float32, 2 * K), (dtype, D)]) + D * dtype.itemsize)
        stats[0].add_(rows)
        stats[1].add_(per_peer)   # a Python int: no host-to-device copy (which would wait for the GPU)
    return _ReduceTokens.apply(partial, transport)
