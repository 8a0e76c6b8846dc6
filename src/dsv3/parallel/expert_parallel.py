"""Expert parallelism: routed experts sharded over the ranks of an EP group, tokens moved by all-to-all.

Rank r of an EP group of size ep holds experts [r*E/ep, (r+1)*E/ep). One MoE layer's routed part:

1. dispatch: sort the T*K token copies by destination expert (experts are numbered rank-major, so this also
   sorts by destination rank), exchange the per-rank-per-expert counts (an all-to-all of E/ep counts to each
   peer), then all-to-all the rows with those uneven splits;
2. received rows arrive grouped by source rank, then expert: regroup them by local expert and run the
   grouped GEMMs (``dsv3.model.moe.grouped_linear``, the single-device kernel);
3. combine: undo the regrouping, all-to-all the outputs back (splits reversed), un-sort, and take the
   weighted sum over each token's K copies in fp32, weights applied after the expert, exactly as
   ``experts_forward_sorted`` does. Same arithmetic per row, so fp32 results match one process to rounding.

FP8 dispatch (``fp8_dispatch=True``, V3's recipe): rows are quantized to E4M3 with one fp32 scale per 1x128
tile (``quantize_activation_tiles``), payload and scales are sent, and the receiver dequantizes to the
compute dtype. The combine is sent in BF16. Gradient path: the backward of the FP8 dispatch treats
quantize->dequantize as the identity (straight-through) and sends the activation gradient back with a BF16
all-to-all, the combine-style transfer; the backward of the BF16 combine is the reverse BF16 all-to-all.

Only the experts' execution changes: ``apply_expert_parallel`` swaps each MoE's ``experts`` module for an
``ExpertParallelExperts`` with the same parameter names (``...mlp.experts.gate_proj``) but [E/ep, ...]
shapes. Router, shared experts, counts and balance stay in the untouched single-device MoE.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dsv3.fp8.blocks import dequantize_activation_tiles, quantize_activation_tiles
from dsv3.model.moe import Experts, Routing, compute_dtype, count_selections, grouped_linear
from dsv3.parallel.transport import CollectiveTransport, LocalTransport, Transport, all_to_all

EXPERT_PARAMS = ("gate_proj", "up_proj", "down_proj")


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


class _FP8Dispatch(torch.autograd.Function):
    """E4M3 + 1x128 scales on the wire, dequantized on arrival; backward = BF16 reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, transport, in_splits, out_splits, out_dtype):
        ctx.transport, ctx.in_splits, ctx.out_splits, ctx.x_dtype = transport, in_splits, out_splits, x.dtype
        q, s = quantize_activation_tiles(x)
        q = transport.all_to_all(q, in_splits, out_splits)
        s = transport.all_to_all(s, in_splits, out_splits)
        return dequantize_activation_tiles(q, s, dtype=out_dtype)

    @staticmethod
    def backward(ctx, grad):
        g = ctx.transport.all_to_all(grad.to(torch.bfloat16), ctx.out_splits, ctx.in_splits)
        return g.to(ctx.x_dtype), None, None, None, None


def _local_swiglu(x_MD, w_gate, w_up, w_down, counts_E: torch.Tensor) -> torch.Tensor:
    """Grouped SwiGLU over rows sorted by local expert. An empty input still touches the weights (so every
    rank produces a gradient for them, zero here) and avoids _grouped_mm's empty-input backward."""
    if x_MD.shape[0] == 0:
        return F.linear(F.linear(x_MD, w_gate[0]) * F.linear(x_MD, w_up[0]), w_down[0])
    ends = torch.cumsum(counts_E, 0).to(torch.int32)
    h = F.silu(grouped_linear(x_MD, w_gate, ends, counts_E)) * grouped_linear(x_MD, w_up, ends, counts_E)
    return grouped_linear(h, w_down, ends, counts_E)


def ep_experts_forward(x_TD: torch.Tensor, routing: Routing, w_gate, w_up, w_down, transport: Transport,
                       fp8_dispatch: bool = False, meter: TrafficMeter | None = None) -> torch.Tensor:
    """Routed-expert output [T, D] with this rank's experts (w_* hold E/ep experts) and the peers' via all-to-all."""
    T, D = x_TD.shape
    K = routing.idx_TK.shape[1]
    ep, E_local = transport.size, w_gate.shape[0]
    E = ep * E_local
    dtype = compute_dtype(x_TD)
    x_TD, w_gate, w_up, w_down = (t.to(dtype) for t in (x_TD, w_gate, w_up, w_down))

    # Dispatch order: by global expert = by destination rank, then expert.
    order = torch.argsort(routing.idx_TK.reshape(-1), stable=True)
    counts_E = count_selections(routing.idx_TK, E)
    recv_counts = transport.all_to_all(counts_E, [E_local] * ep, [E_local] * ep).view(ep, E_local)
    # One host sync per layer: uneven all-to-alls need their sizes on the host.
    send_splits = counts_E.view(ep, E_local).sum(1).tolist()
    recv_splits = recv_counts.sum(1).tolist()
    x_sorted = x_TD[order // K]
    if fp8_dispatch:
        x_recv = _FP8Dispatch.apply(x_sorted, transport, send_splits, recv_splits, dtype)
    else:
        x_recv = all_to_all(x_sorted, transport, send_splits, recv_splits)

    # Received rows: grouped by source rank, then local expert -> regroup by local expert for the GEMMs.
    local_expert = torch.arange(E_local, device=x_recv.device).repeat(ep).repeat_interleave(recv_counts.reshape(-1))
    perm = torch.argsort(local_expert, stable=True)
    y_local = _local_swiglu(x_recv[perm], w_gate, w_up, w_down, recv_counts.sum(0))
    y_recv = torch.empty_like(y_local).index_copy_(0, perm, y_local)

    if fp8_dispatch:  # V3 combines in BF16
        y_sorted = all_to_all(y_recv.to(torch.bfloat16), transport, recv_splits, send_splits).to(dtype)
    else:
        y_sorted = all_to_all(y_recv, transport, recv_splits, send_splits)
    if meter is not None:
        row = D * x_TD.element_size()
        if fp8_dispatch:  # 1 byte per value + one fp32 scale per 128 values
            meter.add(send_splits, D + 4 * -(-D // 128))
            meter.add(recv_splits, D * 2)
        else:
            meter.add(send_splits, row)
            meter.add(recv_splits, row)
        meter.recv_rows += sum(recv_splits)

    y_TKD = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted).view(T, K, D)
    out = (y_TKD.float() * routing.weight_TK[..., None]).sum(dim=1)
    return out.to(dtype)


class ExpertParallelExperts(nn.Module):
    """Drop-in for ``Experts`` holding experts [first, first + E/ep) under the same parameter names."""

    def __init__(self, experts: Experts, transport: Transport, fp8_dispatch: bool = False):
        super().__init__()
        ep, r = transport.size, transport.rank
        E = experts.num_experts
        self.num_experts = E
        self.num_local = E // ep
        self.first = r * self.num_local
        self.transport = transport
        self.fp8_dispatch = fp8_dispatch
        self.use_loop_reference = False
        self.meter = TrafficMeter(ep)
        sl = slice(self.first, self.first + self.num_local)
        for name in EXPERT_PARAMS:
            full = getattr(experts, name)
            setattr(self, name, nn.Parameter(full.detach()[sl].clone(), requires_grad=full.requires_grad))

    def forward(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        return ep_experts_forward(x_TD, routing, self.gate_proj, self.up_proj, self.down_proj, self.transport,
                                  self.fp8_dispatch, self.meter)


def _moe_layers(model: nn.Module):
    from dsv3.model.moe import MoE
    return [m for m in model.modules() if isinstance(m, MoE)]


def apply_expert_parallel(model: nn.Module, ep_group, *, fp8_dispatch: bool = False,
                          transport: Transport | None = None) -> nn.Module:
    """Shard every MoE's routed experts over ``ep_group`` (in place; returns the model).

    Call after the weights are initialized or loaded (full [E, ...] tensors, identical on every rank) and
    BEFORE building the optimizer (the expert parameters are replaced by their [E/ep, ...] slices).
    ``ep_group`` None (or of size 1) with no transport leaves the model unchanged.
    """
    if transport is None:
        if ep_group is None or dist.get_world_size(ep_group) == 1:
            if not fp8_dispatch:
                return model
            transport = LocalTransport()
        else:
            transport = CollectiveTransport(ep_group)
    for moe in _moe_layers(model):
        if moe.config.n_routed_experts % transport.size:
            from dsv3.errors import UserError
            raise UserError(f"model.n_routed_experts = {moe.config.n_routed_experts} is not divisible by ep = "
                            f"{transport.size}")
        moe.experts = ExpertParallelExperts(moe.experts, transport, fp8_dispatch)
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
    me = mods[0].transport.rank
    sent = sum(b for m in mods for i, b in enumerate(m.meter.sent_bytes) if i != me)
    rows = sum(m.meter.recv_rows for m in mods)
    # on the parameters' device: NCCL reduces CUDA tensors only
    vals = torch.tensor([sent, rows], dtype=torch.float64, device=next(model.parameters()).device)
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
    return {"ep_bytes_sent": float(vals[0]), "ep_bytes_sent_max": float(mx[0]), "ep_bytes_sent_mean": float(mean[0]),
            "ep_send_imbalance": float(mx[0] / mean[0]) if mean[0] > 0 else 1.0,
            "ep_recv_rows_max": float(mx[1]), "ep_recv_rows_mean": float(mean[1]),
            "ep_recv_imbalance": float(mx[1] / mean[1]) if mean[1] > 0 else 1.0}
