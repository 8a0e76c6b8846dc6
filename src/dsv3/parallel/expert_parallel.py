"""Expert parallelism: routed experts sharded over the ranks of an EP group, tokens moved by all-to-all.

Rank r of an EP group of size ep holds experts [r*E/ep, (r+1)*E/ep). Two ways to move the tokens
(``parallel.ep_dispatch``): "alltoall", this module, below; and "allgather" (``dsv3.parallel.ep_allgather``):
every token to every EP rank with fixed-size exchanges, no host sync, the layer compiled whole; fewer bytes
while ep < top-k, ep-fold routed activations; "auto" (the default) picks it at ep = 2 (not under DualPipeV). One MoE layer's routed part with "alltoall":

1. dispatch: sort the T*K token copies by destination expert (experts are numbered rank-major, so this also
   sorts by destination rank), exchange the per-rank-per-expert counts (an all-to-all of E/ep counts to each
   peer), then all-to-all the rows with those uneven splits;
2. received rows arrive grouped by source rank, then expert: regroup them by local expert (a permutation
   computed from the counts alone: no sort, no host sync) and run the grouped GEMMs
   (``dsv3.model.moe.grouped_linear``, the single-device kernel);
3. combine: undo the regrouping, all-to-all the outputs back (splits reversed), un-sort, and take the
   weighted sum over each token's K copies in fp32, weights applied after the expert, exactly as
   ``experts_forward_sorted`` does. Same arithmetic per row, so fp32 results match one process to rounding.

Every permutation's backward is a gather by the inverse permutation (``_GatherCopies``, ``_PermuteRows``):
no scatter-add (index_put with accumulate sorts its indices on CUDA, and its atomics are non-deterministic).
The weighted sum saves the combine output in the compute dtype, not the fp32 copy the product is taken in.

One host sync per layer (forward only): uneven all-to-alls need their splits on the host, so the counts are
read back once (``.tolist()`` of the send and receive splits together). The backward reuses them.

Overlap (``parallel.ep_chunks = C > 1``, ``_ChunkedRouted``). With C = 1 every transfer is synchronous on
the compute stream and nothing hides it. With C > 1 the T tokens are split into C contiguous slices of
ceil/floor(T/C) tokens, each with its own routing rows; one argsort by (chunk, expert) lays the copies out
chunk after chunk, each chunk sorted by destination, and ONE counts all-to-all ([C, E/ep] per peer) plus
ONE host read gives every chunk's splits. The chunks are independent all the way through (a token's K
copies stay in its chunk, the experts are row-wise), so the pipeline only reorders work:

    forward:  send D0, D1 | wait D0, experts(0), send C0, send D2 | wait D1, experts(1), send C1, send D3 | ...
    backward: send RC0, RC1 | wait RC0, expert-bwd(0), send RD0, send RC2 | wait RC1, expert-bwd(1), ...

(D dispatch, C combine, RC/RD their reverses carrying gradients). Each transfer is an
``all_to_all_async``: on NCCL it runs on the communicator's stream, so while the experts of chunk i run,
chunk i-1's combine and chunk i+1's dispatch move. The local gathers and the fp32 weighted sums run per
chunk (after the last transfers are issued, so they too hide the tail). Results are those of C = 1 up to
fp32 summation order: the weight gradients are sums of C per-chunk GEMMs (accumulated in fp32).

Chunking fixes one autograd node per layer holding the expert weights. DualPipeV's split backward
differentiates weights that join at such an opaque node in B, with the stage input
(``dsv3.parallel.pipeline.backward``), so the node's backward and its transfers run once. Until 2026-11-26
(session 11) W ran it a second time, and ``validate_layout`` rejected ep_chunks > 1 with DualPipeV.
Inside compiled blocks, only what depends on the host splits runs eagerly (``torch.compiler.disable``): they
change every step, and dynamo would guard on them and recompile. With C = 1 that is ``_exchange`` (counts,
splits, transfers, local experts); the sort and gather before it and the un-sort and fp32 weighted sum after
it have fixed shapes and compile with the block (until 2026-11-26 they ran eagerly too: unfused passes over
the T*K*D copies). The chunked path runs eagerly as a whole.

What chunking cannot hide:
* the first dispatch and the last combine of each layer (and the first reverse combine and last reverse
  dispatch in the backward): about 1/C of the transfer time stays exposed, plus per-chunk launch overhead;
* the host sync per layer: ``.tolist()`` waits until the GPU has run everything queued up to this layer's
  counts, so any CPU run-ahead ends there and the GPU idles until the CPU has launched the next kernels;
  chunking keeps it at one per layer (not one per chunk) but cannot remove it (that needs device-side splits,
  e.g. padded fixed-capacity transfers);
* bandwidth: if a chunk's transfers take longer than its experts, the link sets the pace;
* uneven loads: the rank with the most rows in a chunk sets that chunk's pace.
Chunks of fewer than a few thousand rows make the GEMMs less efficient; pick C so a chunk still fills the GPU.
Saved for the backward: per chunk the received rows (in expert order) and the two pre-activations (silu and
the product are recomputed, elementwise), the combine output in the compute dtype, the weight casts; less
than the C = 1 path, whose autograd also keeps silu(a) and h.

FP8 dispatch (``fp8_dispatch=True``, V3's recipe): rows are quantized to E4M3 with one fp32 scale per 1x128
tile (``quantize_tiles``: Triton on CUDA, bit-identical to ``quantize_activation_tiles``), payload and scales
are sent, and the receiver dequantizes to the compute dtype. The combine is sent in BF16. Gradient path: the
backward of the FP8 dispatch treats quantize->dequantize as the identity (straight-through) and sends the
activation gradient back with a BF16 all-to-all, the combine-style transfer; the backward of the BF16 combine
is the reverse BF16 all-to-all.
Tiles are per row, so chunking does not change what is sent: FP8 dispatch works with any ``ep_chunks``.

FP8 experts (``train.precision = "fp8"``: ``convert_to_fp8`` set ``fp8_recipe`` on the ``Experts`` module
before the EP wrap, and ``ExpertParallelExperts`` keeps it): the local GEMMs run the single-device FP8 recipe
(``dsv3.fp8.grouped.fp8_grouped_mm`` with ``aligned=True``, ``_fp8_local_swiglu``). The received rows are
scattered into a buffer where each local expert's rows start at a multiple of ``GROUP_ALIGN`` = 128 (zero rows
between groups), built from host ints: with a recipe the layer's one host read also returns the per-(source,
local expert) counts, so no extra sync. Gate and up run as one GEMM when F % 128 == 0; the fp32 master weights
are quantized directly (no BF16 copy). Under EP a group's rows are ordered by source rank, then by token
within the source, so the wgrad's token tiles (1x128 along tokens inside each group) can cover other tokens
than on one process: gradients agree to FP8 rounding, not bit for bit. ``ep_chunks > 1`` with FP8 experts is
not implemented (``UserError`` at construction). The BF16 path is unchanged when the recipe is None.

Only the experts' execution changes: ``apply_expert_parallel`` swaps each MoE's ``experts`` module for an
``ExpertParallelExperts`` with the same parameter names (``...mlp.experts.gate_proj``) but [E/ep, ...]
shapes. Router, shared experts, counts and balance stay in the untouched single-device MoE.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dsv3.errors import UserError
from dsv3.fp8.blocks import dequantize_activation_tiles
from dsv3.fp8.triton_quant import quantize_tiles
from dsv3.model.moe import (Experts, Routing, _GatherCopies, combine_copies, compute_dtype,
                            fp8_expert_gemm, fusable_gate_up, gather_rows_or_zero, grouped_linear, grouped_swiglu,
                            grouped_wgrad, sort_copies)
from dsv3.parallel.transport import CollectiveTransport, LocalTransport, Transport, all_to_all, backward_transport

EXPERT_PARAMS = ("gate_proj", "up_proj", "down_proj")
FP8_CHUNKS_ERROR = ("parallel.ep_chunks > 1 does not support train.precision = 'fp8' yet; "
                    "set parallel.ep_chunks = 1")
DISPATCHES = ("alltoall", "allgather")
DISPATCH_CHOICES = ("auto", *DISPATCHES)


def resolve_dispatch(dispatch: str, ep: int, top_k: int, fp8_dispatch: bool, chunks: int, fp8_experts: bool,
                     split_backward: bool = False) -> str:
    """``parallel.ep_dispatch`` -> "alltoall" or "allgather". "auto" picks "allgather" at ep = 2 when it sends
    fewer bytes (top_k > 2: T rows to the peer against ~T*top_k/2 copies) and the settings allow it: measured on
    two H100s (2026-11-26, session 11), EP=2 `small` steps ran 667 ms against 791 with "alltoall". Larger groups
    keep "alltoall" unless asked: "allgather" would still send fewer bytes while ep < top_k, but its routed
    activations (ep*T*K slots) grow ep-fold and it is unmeasured there. ``split_backward`` (DualPipeV's B/W
    split) keeps "alltoall" too: unmeasured on GPUs. (Until the fix of 2026-11-26, session 11, in
    ``pipeline.backward``, the deferred W replayed a compiled region's whole backward, which with "allgather"
    would have included the layer's collectives.)"""
    if dispatch != "auto":
        return dispatch
    if ep == 2 < top_k and not split_backward and allgather_unsupported(fp8_dispatch, chunks, fp8_experts) is None:
        return "allgather"
    return "alltoall"


def allgather_unsupported(fp8_dispatch: bool, chunks: int, fp8_experts: bool) -> str | None:
    """Why ``parallel.ep_dispatch = "allgather"`` cannot run with these settings (None when it can)."""
    what = [n for n, on in (("parallel.fp8_dispatch = true", fp8_dispatch), ("parallel.ep_chunks > 1", chunks > 1),
                            ("train.precision = 'fp8'", fp8_experts)) if on]
    if not what:
        return None
    return (f"parallel.ep_dispatch = 'allgather' does not support {' or '.join(what)} yet; "
            f"set parallel.ep_dispatch = 'alltoall'")


class TrafficMeter:
    """Bytes this rank sent to each EP peer, and rows its experts received, since the last reset (host ints:
    the splits are on the host anyway). Forward transfers only; the backward moves the same rows back."""

    def __init__(self, size: int):
        self.size = size
        self.reset()

    def reset(self) -> None:
        self.sent_bytes = [0] * self.size
        self.recv_rows = 0

    def add(self, splits: list[int], bytes_per_row: int) -> None:
        for i, n in enumerate(splits):
            self.sent_bytes[i] += n * bytes_per_row

    def add_layer(self, send_splits: list[int], recv_splits: list[int], D: int, elem: int, fp8: bool) -> None:
        """One forward dispatch (send_splits rows out) and combine (recv_splits rows back) of D-wide rows."""
        if fp8:  # 1 byte per value + one fp32 scale per 128 values; the combine in BF16
            self.add(send_splits, D + 4 * -(-D // 128))
            self.add(recv_splits, D * 2)
        else:
            self.add(send_splits, D * elem)
            self.add(recv_splits, D * elem)
        self.recv_rows += sum(recv_splits)


class _FP8Dispatch(torch.autograd.Function):
    """E4M3 + 1x128 scales on the wire, dequantized on arrival; backward = BF16 reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, transport, in_splits, out_splits, out_dtype):
        ctx.transport, ctx.in_splits, ctx.out_splits, ctx.x_dtype = transport, in_splits, out_splits, x.dtype
        q, s = quantize_tiles(x)  # one Triton pass on CUDA, the torch reference elsewhere (same bits)
        q = transport.all_to_all(q, in_splits, out_splits)
        s = transport.all_to_all(s, in_splits, out_splits)
        return dequantize_activation_tiles(q, s, dtype=out_dtype)

    @staticmethod
    def backward(ctx, grad):
        g = backward_transport(ctx.transport).all_to_all(grad.to(torch.bfloat16), ctx.out_splits, ctx.in_splits)
        return g.to(ctx.x_dtype), None, None, None, None


class _PermuteRows(torch.autograd.Function):
    """y = x[idx] for a permutation idx; the gradient is the gather by its inverse (no scatter-add)."""

    @staticmethod
    def forward(ctx, x, idx, inverse):
        ctx.save_for_backward(inverse)
        return x[idx]

    @staticmethod
    def backward(ctx, g):
        (inverse,) = ctx.saved_tensors
        return g[inverse], None, None


def block_permutation(counts_CAB: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows stored in blocks ordered (c, a, b), block (c, a, b) holding counts[c, a, b] rows -> the indices that
    reorder them to blocks ordered (c, b, a) and back: ``x_cba = x_cab[to_cba]``, ``x_cab = x_cba[to_cab]``.
    Rows keep their order inside a block (what a stable argsort by (c, b) gives), computed from the counts
    alone: no sort, no host sync (``total`` = counts.sum(), which the caller has on the host)."""
    C, A, B = counts_CAB.shape
    dev = counts_CAB.device
    n_cab = counts_CAB.reshape(-1)
    n_cba = counts_CAB.transpose(1, 2).reshape(-1)
    end_cab, end_cba = torch.cumsum(n_cab, 0), torch.cumsum(n_cba, 0)
    start_cab, start_cba = end_cab - n_cab, end_cba - n_cba
    src_block = torch.arange(C * A * B, device=dev).view(C, A, B).transpose(1, 2).reshape(-1)  # (c,b,a) -> (c,a,b)
    pos = torch.arange(total, device=dev)
    blk = torch.searchsorted(end_cba, pos, right=True)        # the (c, b, a) block holding target row pos
    to_cba = start_cab[src_block[blk]] + (pos - start_cba[blk])
    to_cab = torch.empty_like(to_cba).scatter_(0, to_cba, pos)
    return to_cba, to_cab


def _local_swiglu(x_MD, w_gate, w_up, w_down, counts_E: torch.Tensor) -> torch.Tensor:
    """Grouped SwiGLU over rows sorted by local expert. An empty input still touches the weights (so every
    rank produces a gradient for them, zero here) and avoids _grouped_mm's empty-input backward."""
    if x_MD.shape[0] == 0:
        return F.linear(F.linear(x_MD, w_gate[0]) * F.linear(x_MD, w_up[0]), w_down[0])
    ends = torch.cumsum(counts_E, 0).to(torch.int32)
    return grouped_swiglu(x_MD, w_gate, w_up, w_down, grouped_linear, ends, counts_E)


class _PadRows(torch.autograd.Function):
    """out [rows, D] with out[row_of[i]] = x[i] (distinct rows) and zeros elsewhere, as one gather from x with a
    zero row appended (``src_of`` [rows]: the x row of each out row, or len(x) for the zero row); the gradient
    is the gather g[row_of]. (A zero-filled buffer and an ``index_copy_`` into it cost two passes and the
    slower kernel: 0.482 against 0.170 ms for a gather of [98,304, 1536] bf16 on an H200.)"""

    @staticmethod
    def forward(ctx, x, row_of, src_of):
        ctx.save_for_backward(row_of)
        return gather_rows_or_zero(x, src_of)

    @staticmethod
    def backward(ctx, g):
        (row_of,) = ctx.saved_tensors
        return g[row_of], None, None


class _UnpadRows(torch.autograd.Function):
    """y[row_of] for distinct rows; the gradient is the same gather as ``_PadRows``'s forward (zeros in the
    rows no received row maps to), no scatter."""

    @staticmethod
    def forward(ctx, y, row_of, src_of):
        ctx.save_for_backward(src_of)
        return y[row_of]

    @staticmethod
    def backward(ctx, g):
        (src_of,) = ctx.saved_tensors
        return gather_rows_or_zero(g, src_of), None, None


def _fp8_local_swiglu(x_recv, to_source, counts_dev, counts_host: list[int], w_gate, w_up, w_down, recipe
                      ) -> torch.Tensor:
    """The FP8 grouped SwiGLU of ``Experts.forward`` on the received rows (source-major): rows scattered so
    local expert e's rows start at a multiple of GROUP_ALIGN (zero rows between groups), ``fp8_grouped_mm``
    with ``aligned=True`` on the fp32 master weights, outputs gathered back to the received order.
    ``to_source`` maps expert-sorted rows to received rows; ``counts_dev`` / ``counts_host`` are the rows per
    local expert on the device and on the host (the padded layout is planned from the host ints)."""
    from dsv3.fp8.triton_grouped import GROUP_ALIGN
    M, dev = x_recv.shape[0], x_recv.device
    shifts, padded_ends, start, pstart = [], [], 0, 0
    for n in counts_host:
        shifts.append(pstart - start)
        start += n
        pstart += -(-n // GROUP_ALIGN) * GROUP_ALIGN
        padded_ends.append(pstart)
    rows = max(pstart, GROUP_ALIGN)          # never empty: every rank still produces (zero) weight gradients
    shift = torch.tensor(shifts, dtype=torch.int64, device=dev)
    dest = torch.arange(M, device=dev) + torch.repeat_interleave(shift, counts_dev, output_size=M)
    row_of = dest[to_source]                 # received row -> its row in the padded, expert-sorted buffer
    ends = torch.tensor(padded_ends, dtype=torch.int32, device=dev)
    # padded row -> its received row, or M (the appended zero row) for padding
    src_of = torch.full((rows,), M, dtype=torch.int64, device=dev).index_copy_(0, row_of, torch.arange(M, device=dev))
    x_pad = _PadRows.apply(x_recv, row_of, src_of)
    y_pad = grouped_swiglu(x_pad, w_gate, w_up, w_down, fp8_expert_gemm(recipe), ends, None,
                           fusable_gate_up(w_gate))   # as Experts.forward
    return _UnpadRows.apply(y_pad, row_of, src_of)


def _read_splits(send_counts: torch.Tensor, recv_counts: torch.Tensor) -> tuple[list, list]:
    """THE host sync of a layer: per-peer row counts [..., ep] to send and to receive, read back together
    (as lists of ep-long rows; the two may have different leading shapes)."""
    n = send_counts.numel()
    host = torch.cat([send_counts.reshape(-1), recv_counts.reshape(-1)]).tolist()
    ep = send_counts.shape[-1]
    send, recv = host[:n], host[n:]
    return [send[i:i + ep] for i in range(0, n, ep)], [recv[i:i + ep] for i in range(0, len(recv), ep)]


def ep_experts_forward(x_TD: torch.Tensor, routing: Routing, w_gate, w_up, w_down, transport: Transport,
                       fp8_dispatch: bool = False, meter: TrafficMeter | None = None, chunks: int = 1,
                       fp8_recipe=None) -> torch.Tensor:
    """Routed-expert output [T, D] with this rank's experts (w_* hold E/ep experts) and the peers' via all-to-all.

    ``chunks`` > 1: the dispatch/combine pipelined over that many token chunks (``_ChunkedRouted``); every
    rank of the EP group must pass the same value (the transfers are collectives issued per chunk).
    ``fp8_recipe`` (``dsv3.fp8.recipe.FP8Recipe``): the local expert GEMMs in FP8 (``_fp8_local_swiglu``).

    Three stages, so that a compiled block keeps what it can (C = 1). Before the dispatch and after the
    combine every tensor has a fixed shape ([T*K, D]: every copy is sent somewhere, this rank included), so
    the sort, the gather of the copies, the un-sort and the fp32 weighted sum trace into the block's graph
    and fuse there. Only the middle (``_exchange``: counts, the host read of the splits, the transfers and the
    local experts, whose row counts change every step) runs eagerly."""
    if chunks > 1:
        if fp8_recipe is not None:
            raise UserError(FP8_CHUNKS_ERROR)
        return _chunked_forward_eager(x_TD, routing, w_gate, w_up, w_down, transport, fp8_dispatch, meter, chunks)
    K = routing.idx_TK.shape[1]
    E = transport.size * w_gate.shape[0]
    x_TD = x_TD.to(compute_dtype(x_TD))
    # Dispatch order: by global expert = by destination rank, then expert.
    order, inverse, counts_E = sort_copies(routing.idx_TK, E)
    x_sorted = _GatherCopies.apply(x_TD, order, inverse, K)   # backward: gather + sum over K (no scatter-add)
    y_sorted = _exchange(x_sorted, counts_E, w_gate, w_up, w_down, transport, fp8_dispatch, meter, fp8_recipe)
    return combine_copies(y_sorted, inverse, routing.weight_TK)   # un-sort + fp32 weighted sum


# Eager even inside a compiled block: the host-side splits and the received row counts change every step
# (dynamo would guard on them and recompile until its cache limit), and tracing the collectives buys nothing.
@torch.compiler.disable
def _exchange(x_sorted: torch.Tensor, counts_E: torch.Tensor, w_gate, w_up, w_down, transport: Transport,
              fp8_dispatch: bool, meter: TrafficMeter | None, fp8_recipe) -> torch.Tensor:
    """Copies sorted by global expert [T*K, D] -> the experts' outputs in the same order [T*K, D]: counts
    exchange, THE host read of the splits, dispatch, regroup by local expert, local grouped SwiGLU, combine."""
    D = x_sorted.shape[1]
    ep, E_local = transport.size, w_gate.shape[0]
    dtype = x_sorted.dtype
    if fp8_recipe is None:
        w_gate, w_up, w_down = (t.to(dtype) for t in (w_gate, w_up, w_down))
    # (FP8 quantizes the fp32 master weights directly)
    recv_counts = transport.all_to_all(counts_E, [E_local] * ep, [E_local] * ep).view(ep, E_local)
    if fp8_recipe is None:
        (send_splits,), (recv_splits,) = _read_splits(counts_E.view(ep, E_local).sum(1), recv_counts.sum(1))
    else:   # the same one host read, with the [local expert, source] counts the padded layout is planned from
        (send_splits,), recv_es = _read_splits(counts_E.view(ep, E_local).sum(1), recv_counts.t())
        recv_splits = [sum(col) for col in zip(*recv_es)]
        local_host = [sum(row) for row in recv_es]
    if fp8_dispatch:
        x_recv = _FP8Dispatch.apply(x_sorted, transport, send_splits, recv_splits, dtype)
    else:
        x_recv = all_to_all(x_sorted, transport, send_splits, recv_splits)

    # Received rows: grouped by source rank, then local expert -> regroup by local expert for the GEMMs.
    to_expert, to_source = block_permutation(recv_counts.view(1, ep, E_local), sum(recv_splits))
    if fp8_recipe is not None:
        y_recv = _fp8_local_swiglu(x_recv, to_source, recv_counts.sum(0), local_host, w_gate, w_up, w_down,
                                   fp8_recipe)
    else:
        y_local = _local_swiglu(_PermuteRows.apply(x_recv, to_expert, to_source), w_gate, w_up, w_down,
                                recv_counts.sum(0))
        y_recv = _PermuteRows.apply(y_local, to_source, to_expert)

    if fp8_dispatch:  # V3 combines in BF16
        y_sorted = all_to_all(y_recv.to(torch.bfloat16), transport, recv_splits, send_splits).to(dtype)
    else:
        y_sorted = all_to_all(y_recv, transport, recv_splits, send_splits)
    if meter is not None:
        meter.add_layer(send_splits, recv_splits, D, dtype.itemsize, fp8_dispatch)
    return y_sorted


# ------------------------------------------------------------------ chunked, overlapped dispatch/combine

def _swiglu_forward(x_MD, wg, wu, wd, ends, counts):
    """-> (y, a, b): the grouped SwiGLU of ``_local_swiglu`` and the two pre-activations its backward needs."""
    a = grouped_linear(x_MD, wg, ends, counts)
    b = grouped_linear(x_MD, wu, ends, counts)
    return grouped_linear(F.silu(a) * b, wd, ends, counts), a, b


def _swiglu_backward(gy_MD, x_MD, a, b, wg, wu, wd, ends, counts):
    """-> (dx, dWg, dWu, dWd) of ``_swiglu_forward`` (silu(a) and h recomputed: elementwise, cheap)."""
    s = F.silu(a)
    h = s * b
    gh = grouped_linear(gy_MD, wd.transpose(1, 2), ends, counts)        # gy @ Wd[e]
    dwd = grouped_wgrad(gy_MD, h, ends, counts)
    ga = torch.ops.aten.silu_backward(gh * b, a)
    gb = gh * s
    dx = grouped_linear(ga, wg.transpose(1, 2), ends, counts) + grouped_linear(gb, wu.transpose(1, 2), ends, counts)
    return dx, grouped_wgrad(ga, x_MD, ends, counts), grouped_wgrad(gb, x_MD, ends, counts), dwd


class _ChunkPlan:
    """A layer's chunked routing, fixed in the forward and reused by the backward: host splits per chunk and
    the index tensors (sort order, its inverse, the source<->expert regrouping of each chunk's received rows)."""

    def __init__(self, transport, C, T, K, D, dtype, fp8, bounds, order, inverse, send_splits, recv_splits,
                 to_expert, to_source, counts_local, ends_local):
        self.transport, self.C, self.T, self.K, self.D, self.dtype, self.fp8 = transport, C, T, K, D, dtype, fp8
        self.bounds = bounds                     # token bounds: chunk c = tokens [bounds[c], bounds[c+1])
        self.src_token = order // K              # sorted copy -> its token (the forward's one gather)
        # per chunk, chunk-local: sorted position -> token-major copy (order) and back (inverse); a chunk's
        # copies occupy the same range [K*bounds[c], K*bounds[c+1]) in both layouts
        self.order = [order[self.copies(c)] - K * bounds[c] for c in range(C)]
        self.inverse = [inverse[self.copies(c)] - K * bounds[c] for c in range(C)]
        self.send_splits, self.recv_splits = send_splits, recv_splits   # [C][ep] host ints
        self.to_expert, self.to_source = to_expert, to_source           # [C] chunk-local permutations
        self.counts_local, self.ends_local = counts_local, ends_local   # [C] x [E/ep] rows per local expert
        self.wire = torch.bfloat16 if fp8 else dtype                     # combine and gradient transfers

    def copies(self, c: int) -> slice:
        """Chunk c's rows of the sorted copies (and of [T*K] token-major copies)."""
        return slice(self.K * self.bounds[c], self.K * self.bounds[c + 1])


class _ChunkedRouted(torch.autograd.Function):
    """The routed part of one MoE layer with the transfers of chunk i+1 (and i-1) hidden behind chunk i's
    experts, forward and backward. Inputs x [T, D] (compute dtype), routing weights [T, K] fp32, the three
    local expert weights; output [T, D]. Gradients are those of the C = 1 path (see the module docstring)."""

    @staticmethod
    def forward(ctx, x_TD, weight_TK, w_gate, w_up, w_down, plan: _ChunkPlan):
        from dsv3.train.compute_weights import cast_for_use
        p, t = plan, plan.transport
        C, K, D, dtype = p.C, p.K, p.D, p.dtype
        # the weights' gradients are summed over the chunks in fp32 and returned in the weights' dtype, so
        # train.weight_cast = "per_step" leaves the fp32 masters here and hands over their bf16 copies
        wg, wu, wd = (cast_for_use(w, dtype) for w in (w_gate, w_up, w_down))
        x_sorted = x_TD[p.src_token]                  # all chunks' send buffers, chunk after chunk
        p.src_token = None                            # the backward needs only the chunk-local indices
        if p.fp8:
            q_sorted, s_sorted = quantize_tiles(x_sorted)

        def dispatch(c):
            sl, a, b = p.copies(c), p.send_splits[c], p.recv_splits[c]
            if p.fp8:
                q, hq = t.all_to_all_async(q_sorted[sl], a, b)
                s, hs = t.all_to_all_async(s_sorted[sl], a, b)
                return (q, s), (hq, hs)
            x, h = t.all_to_all_async(x_sorted[sl], a, b)
            return x, (h,)

        pending = {c: dispatch(c) for c in range(min(2, C))}
        combines, saved_x, saved_a, saved_b = [], [], [], []
        for c in range(C):
            recv, handles = pending.pop(c)
            for h in handles:
                h.wait()
            x_recv = dequantize_activation_tiles(*recv, dtype=dtype) if p.fp8 else recv
            x_local = x_recv[p.to_expert[c]]
            if x_local.shape[0]:
                y_local, a, b = _swiglu_forward(x_local, wg, wu, wd, p.ends_local[c], p.counts_local[c])
            else:
                y_local, a, b = x_local, x_local.new_empty(0, wg.shape[1]), x_local.new_empty(0, wg.shape[1])
            saved_x.append(x_local)
            saved_a.append(a)
            saved_b.append(b)
            combines.append(t.all_to_all_async(y_local[p.to_source[c]].to(p.wire), p.recv_splits[c],
                                               p.send_splits[c]))
            if c + 2 < C:
                pending[c + 2] = dispatch(c + 2)
        x_sorted = None                               # the send buffers are no longer needed
        out = x_TD.new_empty(p.T, D)
        y_sorted = []
        for c, (y, h) in enumerate(combines):          # chunk c's sum overlaps the later combines
            h.wait()
            y = y.to(dtype)
            y_sorted.append(y)
            t0, t1 = p.bounds[c], p.bounds[c + 1]
            y_TKD = y[p.inverse[c]].view(t1 - t0, K, D)
            out[t0:t1] = (y_TKD.float() * weight_TK[t0:t1, :, None]).sum(dim=1)
        ctx.plan, ctx.w_dtypes = p, [w.dtype for w in (w_gate, w_up, w_down)]
        ctx.save_for_backward(weight_TK, wg, wu, wd, *saved_x, *saved_a, *saved_b, *y_sorted)
        return out

    @staticmethod
    def backward(ctx, g_out):
        p, t = ctx.plan, backward_transport(ctx.plan.transport)
        C, K, D, dtype = p.C, p.K, p.D, p.dtype
        weight_TK, wg, wu, wd, *rest = ctx.saved_tensors
        xs, as_, bs, ys = rest[:C], rest[C:2 * C], rest[2 * C:3 * C], rest[3 * C:]
        g_weight = torch.empty_like(weight_TK)

        def reverse_combine(c):   # d(out) of chunk c -> d(y) per copy, sent back to the experts that made it
            t0, t1 = p.bounds[c], p.bounds[c + 1]
            g = g_out[t0:t1].float()[:, None, :]
            y_TKD = ys[c][p.inverse[c]].view(t1 - t0, K, D)
            g_weight[t0:t1] = (g * y_TKD.float()).sum(dim=-1)
            g_y = (g * weight_TK[t0:t1, :, None]).to(dtype).view(-1, D)[p.order[c]]
            return t.all_to_all_async(g_y.to(p.wire), p.send_splits[c], p.recv_splits[c])

        pending = {c: reverse_combine(c) for c in range(min(2, C))}
        dw = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in (wg, wu, wd)]  # sum of chunks
        dispatches = []
        for c in range(C):
            g_recv, h = pending.pop(c)
            h.wait()
            g_local = g_recv.to(dtype)[p.to_expert[c]]
            if g_local.shape[0]:
                g_x, *g_ws = _swiglu_backward(g_local, xs[c], as_[c], bs[c], wg, wu, wd, p.ends_local[c],
                                              p.counts_local[c])
                for acc, g in zip(dw, g_ws):
                    acc += g
            else:
                g_x = g_local
            dispatches.append(t.all_to_all_async(g_x[p.to_source[c]].to(p.wire), p.recv_splits[c],
                                                 p.send_splits[c]))
            if c + 2 < C:
                pending[c + 2] = reverse_combine(c + 2)
        g_in = torch.empty(p.T, D, dtype=dtype, device=g_out.device)
        for c, (g, h) in enumerate(dispatches):
            h.wait()
            t0, t1 = p.bounds[c], p.bounds[c + 1]
            g_in[t0:t1] = g.to(dtype)[p.inverse[c]].view(t1 - t0, K, D).sum(dim=1)
        return (g_in, g_weight, *(g.to(wt) for g, wt in zip(dw, ctx.w_dtypes)), None)


def _chunked_forward(x_TD, routing: Routing, w_gate, w_up, w_down, transport: Transport, fp8_dispatch: bool,
                     meter: TrafficMeter | None, C: int) -> torch.Tensor:
    """Plan the chunks (one counts all-to-all, one host read) and run ``_ChunkedRouted``."""
    T, D = x_TD.shape
    K = routing.idx_TK.shape[1]
    ep, E_local = transport.size, w_gate.shape[0]
    E = ep * E_local
    dtype = compute_dtype(x_TD)
    dev = x_TD.device
    bounds = [-(-c * T // C) for c in range(C + 1)]       # ceil(c*T/C): sizes differ by at most one
    # chunk of token t = floor(t*C/T) (the same bounds); sort the copies by (chunk, expert)
    chunk_of_copy = torch.arange(T * K, device=dev) // K * C // max(T, 1)
    key = chunk_of_copy * E + routing.idx_TK.reshape(-1)
    order = torch.argsort(key, stable=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=dev))
    counts_CE = torch.zeros(C * E, dtype=torch.int64, device=dev).scatter_add_(0, key, torch.ones_like(key))
    send_counts = counts_CE.view(C, ep, E_local).transpose(0, 1).contiguous()       # [peer, chunk, expert]
    recv_counts = transport.all_to_all(send_counts.view(-1), [C * E_local] * ep, [C * E_local] * ep)
    recv_counts = recv_counts.view(ep, C, E_local).transpose(0, 1)                  # [chunk, source, expert]
    send_splits, recv_splits = _read_splits(send_counts.sum(-1).t(), recv_counts.sum(-1))
    rows = [sum(r) for r in recv_splits]
    to_expert_all, to_source_all = block_permutation(recv_counts, sum(rows))   # chunk c stays in its range
    to_expert, to_source, start = [], [], 0
    for n in rows:
        to_expert.append(to_expert_all[start:start + n] - start)
        to_source.append(to_source_all[start:start + n] - start)
        start += n
    counts_local = recv_counts.sum(1)                                               # [chunk, local expert]
    ends_local = torch.cumsum(counts_local, 1).to(torch.int32)
    plan = _ChunkPlan(transport, C, T, K, D, dtype, fp8_dispatch, bounds, order, inverse, send_splits,
                      recv_splits, to_expert, to_source, list(counts_local), list(ends_local))
    if meter is not None:
        for c in range(C):
            meter.add_layer(send_splits[c], recv_splits[c], D, dtype.itemsize, fp8_dispatch)
    return _ChunkedRouted.apply(x_TD.to(dtype), routing.weight_TK, w_gate, w_up, w_down, plan)


# The chunked path stays eager as a whole: its chunk bounds, splits and per-chunk rows are host values.
_chunked_forward_eager = torch.compiler.disable(_chunked_forward)


class ExpertParallelExperts(nn.Module):
    """Drop-in for ``Experts`` holding experts [first, first + E/ep) under the same parameter names."""

    def __init__(self, experts: Experts, transport: Transport, fp8_dispatch: bool = False, chunks: int = 1,
                 dispatch: str = "alltoall"):
        super().__init__()
        self.chunks = chunks     # parallel.ep_chunks: dispatch/combine pipelined over this many token chunks
        if dispatch not in DISPATCHES:
            raise UserError(f"parallel.ep_dispatch = {dispatch!r} is invalid: use 'alltoall' or 'allgather'")
        self.dispatch = dispatch  # parallel.ep_dispatch ("allgather": dsv3.parallel.ep_allgather)
        ep, r = transport.size, transport.rank
        E = experts.num_experts
        self.num_experts = E
        self.num_local = E // ep
        self.first = r * self.num_local
        self.transport = transport
        self.fp8_dispatch = fp8_dispatch
        self.use_loop_reference = False
        # train.precision = "fp8": convert_to_fp8 marked the Experts before the wrap; the local GEMMs follow it
        self.fp8_recipe = getattr(experts, "fp8_recipe", None)
        if self.fp8_recipe is not None and chunks > 1:
            raise UserError(FP8_CHUNKS_ERROR)
        if dispatch == "allgather":
            why = allgather_unsupported(fp8_dispatch, chunks, self.fp8_recipe is not None)
            if why:
                raise UserError(why)
        self.meter = TrafficMeter(ep)
        # "allgather": (local copies computed, bytes sent to each peer), counted on the device (no host values
        # inside the compiled block); read with the host meter by traffic_stats
        self.register_buffer("allgather_stats", torch.zeros(2, dtype=torch.int64, device=experts.gate_proj.device),
                             persistent=False)
        sl = slice(self.first, self.first + self.num_local)
        for name in EXPERT_PARAMS:
            full = getattr(experts, name)
            setattr(self, name, nn.Parameter(full.detach()[sl].clone(), requires_grad=full.requires_grad))

    # Traced by a compiled block up to the dispatch and from the combine on; the middle runs eagerly
    # (``ep_experts_forward``: one graph break before it, one after).
    def forward(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        if self.dispatch == "allgather":
            from dsv3.parallel.ep_allgather import allgather_experts_forward
            return allgather_experts_forward(x_TD, routing, self.gate_proj, self.up_proj, self.down_proj,
                                             self.transport, self.first, self.allgather_stats)
        return ep_experts_forward(x_TD, routing, self.gate_proj, self.up_proj, self.down_proj, self.transport,
                                  self.fp8_dispatch, self.meter, self.chunks, self.fp8_recipe)


def _moe_layers(model: nn.Module):
    from dsv3.model.moe import MoE
    return [m for m in model.modules() if isinstance(m, MoE)]


def apply_expert_parallel(model: nn.Module, ep_group, *, fp8_dispatch: bool = False,
                          transport: Transport | None = None, chunks: int = 1, backward_group=None,
                          dispatch: str = "alltoall", split_backward: bool = False) -> nn.Module:
    """Shard every MoE's routed experts over ``ep_group`` (in place; returns the model).

    Call after the weights are initialized or loaded (full [E, ...] tensors, identical on every rank) and
    BEFORE building the optimizer (the expert parameters are replaced by their [E/ep, ...] slices).
    ``ep_group`` None (or of size 1) with no transport leaves the model unchanged. ``chunks``
    (``parallel.ep_chunks``) > 1 overlaps the all-to-alls with the experts (module docstring).
    ``backward_group``: the same ranks as ``ep_group`` as a second communicator for the gradients' transfers
    (``parallel.fb_overlap``: a forward and a backward in flight at once must not share NCCL's queue).
    ``dispatch`` (``parallel.ep_dispatch``): "alltoall" (token copies to their experts' ranks, uneven splits read
    by the host), "allgather" (fixed-size exchanges, no host sync: ``dsv3.parallel.ep_allgather``) or "auto"
    (``resolve_dispatch``: "allgather" at ep = 2 < top-k when nothing it lacks is asked for).
    """
    if chunks < 1:
        from dsv3.errors import UserError
        raise UserError(f"parallel.ep_chunks = {chunks} is invalid: it must be >= 1 (1 = no chunking)")
    if transport is None:
        if ep_group is None or dist.get_world_size(ep_group) == 1:
            if not fp8_dispatch:
                return model
            transport = LocalTransport()
        else:
            transport = CollectiveTransport(ep_group, backward_group)
    for moe in _moe_layers(model):
        if moe.config.n_routed_experts % transport.size:
            from dsv3.errors import UserError
            raise UserError(f"model.n_routed_experts = {moe.config.n_routed_experts} is not divisible by ep = "
                            f"{transport.size}")
        mode = resolve_dispatch(dispatch, transport.size, moe.config.num_experts_per_tok, fp8_dispatch, chunks,
                                getattr(moe.experts, "fp8_recipe", None) is not None, split_backward)
        moe.experts = ExpertParallelExperts(moe.experts, transport, fp8_dispatch, chunks, mode)
    return model


def expert_parameter_names(model: nn.Module) -> set[str]:
    """Names (as in model.named_parameters / state_dict) of the EP-sharded expert parameters."""
    names = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, ExpertParallelExperts):
            names.update(f"{mod_name}.{p}" for p in EXPERT_PARAMS)
    return names


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, ExpertParallelExperts)
            for p in (m.gate_proj, m.up_proj, m.down_proj)]


# ------------------------------------------------------------------ checkpoints (layout-independent)

def _ep_modules(model: nn.Module) -> dict[str, ExpertParallelExperts]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ExpertParallelExperts)}


@torch.no_grad()
def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every expert tensor gathered to its full [E, ...] shape (collective over
    each EP group: call on every rank). Identical to the single-process model's state dict."""
    sd = model.state_dict()
    for name, mod in _ep_modules(model).items():
        t = mod.transport
        for p in EXPERT_PARAMS:
            key = f"{name}.{p}"
            local = sd[key]
            if t.size == 1:
                continue
            parts = [torch.empty_like(local) for _ in range(t.size)]
            dist.all_gather(parts, local.contiguous(), group=t.group)
            sd[key] = torch.cat(parts, dim=0)
    return sd


def shard_state_dict(model: nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Slice the full [E, ...] expert tensors of a layout-independent state dict to this rank's experts."""
    sd = dict(full)
    for name, mod in _ep_modules(model).items():
        for p in EXPERT_PARAMS:
            key = f"{name}.{p}"
            if key in sd and sd[key].shape[0] == mod.num_experts:
                sd[key] = sd[key][mod.first:mod.first + mod.num_local]
    return sd


def load_full_state_dict(model: nn.Module, full: dict[str, torch.Tensor], strict: bool = True):
    """Load a layout-independent (full-expert) state dict into an EP-sharded model (no communication)."""
    return model.load_state_dict(shard_state_dict(model, full), strict=strict)


# ---------------------------------------------------------------------------------------- metrics

def traffic_stats(model: nn.Module, ep_group=None, reset: bool = True) -> dict[str, float]:
    """EP traffic since the last reset, for the metrics record (collective over ``ep_group``: call on every
    rank, e.g. once per optimizer step).

    ep_bytes_sent: bytes this rank sent to OTHER ranks (dispatch + combine, forward); *_max / *_mean over the
    EP group and ep_send_imbalance = max / mean; ep_recv_rows_*: token copies each rank's experts processed
    (compute load) and its imbalance.
    """
    mods = list(_ep_modules(model).values())
    if not mods:
        return {}
    me, size = mods[0].transport.rank, mods[0].transport.size
    sent = sum(b for m in mods for i, b in enumerate(m.meter.sent_bytes) if i != me)
    rows = sum(m.meter.recv_rows for m in mods)
    # on the parameters' device: NCCL reduces CUDA tensors only
    vals = torch.tensor([sent, rows], dtype=torch.float64, device=next(model.parameters()).device)
    for m in mods:                               # "allgather" layers count on the device
        if m.dispatch == "allgather":
            st = m.allgather_stats.to(vals.device, torch.float64)
            vals += torch.stack([st[1] * (size - 1), st[0]])
    mx, sm = vals.clone(), vals.clone()
    n = 1
    if ep_group is not None and dist.get_world_size(ep_group) > 1:
        dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=ep_group)
        dist.all_reduce(sm, group=ep_group)
        n = dist.get_world_size(ep_group)
    vals, mx, sm = vals.cpu(), mx.cpu(), sm.cpu()
    mean = sm / n
    if reset:
        for m in mods:
            m.meter.reset()
            m.allgather_stats.zero_()
    return {"ep_bytes_sent": float(vals[0]), "ep_bytes_sent_max": float(mx[0]), "ep_bytes_sent_mean": float(mean[0]),
            "ep_send_imbalance": float(mx[0] / mean[0]) if mean[0] > 0 else 1.0,
            "ep_recv_rows_max": float(mx[1]), "ep_recv_rows_mean": float(mean[1]),
            "ep_recv_imbalance": float(mx[1] / mean[1]) if mean[1] > 0 else 1.0}
