"""DeepSeekMoE: sigmoid (or softmax) group-limited routing, bias-based balancing, shared + routed experts.

Shape suffixes: T tokens, D hidden, E routed experts, K experts per token, F expert width, G groups.
Routed expert weights are stacked (``gate_proj`` [E,F,D], ``up_proj`` [E,F,D], ``down_proj`` [E,D,F]) so one
grouped GEMM runs all experts; ``experts_forward_loop`` is the per-expert reference it is tested against.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.kernels.casting import cast_result
from dsv3.kernels.gather_gemm import gathered_grouped_mm, gathered_grouped_mm_nn, gathered_grouped_wgrad
from dsv3.kernels.moe_permute import combine_backward, combine_weight_grad, gather_sum
from dsv3.model.layers import MLP


@dataclass
class Routing:
    """The router's decision for T tokens."""

    idx_TK: torch.Tensor       # chosen experts (int64)
    weight_TK: torch.Tensor    # fp32 combine weights (renormalized, times routed_scaling_factor)
    scores_TE: torch.Tensor    # fp32 affinities s (sigmoid or softmax), unbiased
    counts_E: torch.Tensor | None = None   # selections per expert, once counted (``MoE.forward``), for reuse


def route(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, config: ModelConfig,
          by_rank: bool | None = None) -> Routing:
    """Pick K experts per token as DeepSeek-V3 does; the bias only steers the choice, never the weights.

    noaux_tc: groups scored by the sum of their top-2 biased scores, keep topk_group groups, the others get
    -inf (so a negative biased score can never lose to a dropped group), then top-K of the biased scores.
    group_limited_greedy (V2): groups scored by their max score. greedy: plain top-K.

    ``by_rank`` (default: inside torch.compile) selects by counting, for each entry, the entries that beat it
    (``rank_desc``) instead of ``topk``: elementwise compares and sums that Inductor fuses into the block's
    kernels, where the three ``topk`` calls per layer were sort kernels of their own (7 ms of a 170 ms `small`
    step on an H200). Same experts, same order (descending, ties to the lower index), same weights; ``topk`` is
    the reference. Eager runs keep ``topk``: unfused, the counts would materialize [T, E, E] (4 GB for a V3
    prefill of 64k tokens).
    """
    c = config
    if by_rank is None:
        by_rank = torch.compiler.is_compiling()
    scores = logits_TE.float().sigmoid() if c.scoring_func == "sigmoid" else logits_TE.float().softmax(dim=-1)
    choice = scores if bias_E is None else scores + bias_E.float()
    T, E = choice.shape
    G = c.n_group
    if c.topk_method != "greedy" and G > 1 and c.topk_group < G:
        grouped = choice.view(T, G, E // G)
        if c.topk_method != "noaux_tc":
            group_score = grouped.amax(dim=-1)
        elif by_rank:
            group_score = torch.where(rank_desc(grouped) < 2, grouped, 0.0).sum(dim=-1)
        else:
            group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)
        if by_rank:
            keep_TG = rank_desc(group_score) < c.topk_group
        else:
            keep_TG = torch.zeros_like(group_score, dtype=torch.bool)
            keep_TG.scatter_(1, group_score.topk(c.topk_group, dim=-1).indices, True)
        choice = choice.masked_fill(~keep_TG.repeat_interleave(E // G, dim=1), float("-inf"))
    K = c.num_experts_per_tok
    if by_rank:
        # slot r of token t holds the expert of rank r: a one-hot [T, K, E] reduced over E (no gather, so the
        # weights' backward is elementwise too)
        pick_TKE = rank_desc(choice)[:, None, :] == torch.arange(K, device=choice.device)[:, None]
        idx = (pick_TKE * torch.arange(E, device=choice.device)).sum(dim=-1)
        weight = torch.where(pick_TKE, scores[:, None, :], 0.0).sum(dim=-1)
    else:
        idx = choice.topk(K, dim=-1).indices
        weight = scores.gather(1, idx)
    if c.norm_topk_prob:
        weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
    return Routing(idx, weight * c.routed_scaling_factor, scores)


def rank_desc(x: torch.Tensor) -> torch.Tensor:
    """Rank of each entry along the last dim in descending order (0 = largest), ties ranked by position:
    entry e's rank is the number of entries j with x_j > x_e, or x_j == x_e and j < e. [..., N] -> [..., N]."""
    N = x.shape[-1]
    pos = torch.arange(N, device=x.device)
    before_EJ = pos[None, :] < pos[:, None]                   # [e, j]: j comes before e
    other, this = x[..., None, :], x[..., :, None]
    return ((other > this) | ((other == this) & before_EJ)).sum(dim=-1)


class Router(nn.Module):
    """``mlp.gate``: a bias-free linear in fp32 plus the persistent fp32 ``e_score_correction_bias``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        if config.uses_bias_balancing:
            self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, x_TD: torch.Tensor) -> Routing:
        with torch.autocast(x_TD.device.type, enabled=False):  # the router stays fp32 under autocast
            return route(router_logits(x_TD, self.weight), self.e_score_correction_bias, self.config)


def router_logits(x_TD: torch.Tensor, w_ED: torch.Tensor) -> torch.Tensor:
    """fp32 logits x w^T, as ``F.linear(x.float(), w.float())`` (the reference). When both are bf16 on CUDA the
    products are exact in bf16, so one bf16 tensor-core GEMM with fp32 output gives the same logits
    (``_Bf16RouterLogits``) where the fp32 GEMM ran on CUDA cores (3 GEMMs per layer, 4.6 ms of the `small`
    step on an H200)."""
    if x_TD.is_cuda and x_TD.dtype == torch.bfloat16 and w_ED.dtype == torch.bfloat16:
        return _Bf16RouterLogits.apply(x_TD, w_ED)
    return F.linear(x_TD.float(), w_ED.float())


def mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of bf16 operands accumulated and returned in fp32 (tensor cores on CUDA; the CPU upcasts)."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


class _Bf16RouterLogits(torch.autograd.Function):
    """fp32 x w^T for bf16 x [T, D] and w [E, D] on tensor cores, forward and backward.

    Forward: exact products, fp32 sums (the reference's math). Backward: the fp32 gradient g [T, E] is split
    into g_hi + g_lo, two bf16 numbers whose sum carries 16 of its 24 mantissa bits, and each gradient is one
    GEMM over [g_hi, g_lo] (K doubled), summed in fp32; dx and dw are rounded to bf16 afterwards, 8 bits
    coarser than the split, so they match the fp32 reference up to that final rounding."""

    @staticmethod
    def forward(ctx, x_TD, w_ED):
        ctx.save_for_backward(x_TD, w_ED)
        return mm_fp32_out(x_TD, w_ED.t())

    @staticmethod
    def backward(ctx, g_TE):
        x_TD, w_ED = ctx.saved_tensors
        hi = g_TE.to(torch.bfloat16)
        g2_TE2 = torch.cat([hi, (g_TE - hi.float()).to(torch.bfloat16)], dim=1)      # [T, 2E]: hi | lo
        E = w_ED.shape[0]
        dx = mm_fp32_out(g2_TE2, torch.cat([w_ED, w_ED])).to(x_TD.dtype)
        dw2 = mm_fp32_out(g2_TE2.t(), x_TD)
        return dx, (dw2[:E] + dw2[E:]).to(w_ED.dtype)


class Experts(nn.Module):
    """Stacked routed experts (SwiGLU each)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, F_, D = config.n_routed_experts, config.moe_intermediate_size, config.hidden_size
        self.num_experts = E
        self.gate_proj = nn.Parameter(torch.empty(E, F_, D))
        self.up_proj = nn.Parameter(torch.empty(E, F_, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, F_))
        self.use_loop_reference = False  # tests flip this to run the per-expert loop
        self.fp8_recipe = None           # set by dsv3.fp8.recipe.convert_to_fp8: FP8 grouped GEMMs

    def forward(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Weighted sum over each token's K experts, combined in fp32; returns x's dtype."""
        if self.use_loop_reference:
            return experts_forward_loop(x_TD, routing, self.gate_proj, self.up_proj, self.down_proj)
        if self.fp8_recipe is None:
            return experts_forward_sorted(x_TD, routing, self.gate_proj, self.up_proj, self.down_proj)
        from dsv3.fp8.triton_grouped import GROUP_ALIGN
        # Each expert's rows start at a multiple of 128 (zero rows between groups), as DeepSeek-V3 pads them:
        # one-launch grouped kernels, and no FP8 tile mixes two experts. FP8 quantizes the fp32 master weights
        # directly (no bf16 copy first).
        return experts_forward_sorted(x_TD, routing, self.gate_proj, self.up_proj, self.down_proj,
                                      gemm=fp8_expert_gemm(self.fp8_recipe), align=GROUP_ALIGN, cast_weights=False,
                                      fuse_gate_up=fusable_gate_up(self.gate_proj))


def fp8_expert_gemm(recipe):
    """The FP8 recipe's grouped GEMM as ``gemm(x, w, ends, counts)`` (the signature of ``grouped_linear``) on
    128-aligned groups; ``w`` may be a (gate, up) tuple. Shared by ``Experts`` and expert parallelism."""
    from dsv3.fp8.grouped import fp8_grouped_mm
    pow2 = bool(getattr(recipe, "pow2_scale", False))
    backend = getattr(recipe, "backend", "auto")

    def gemm(x_MD, w_EOD, ends_E, counts_E=None):
        return fp8_grouped_mm(x_MD, w_EOD, ends_E, pow2_scale=pow2, backend=backend, aligned=True)
    return gemm


def fusable_gate_up(w_gate_EFD: torch.Tensor) -> bool:
    """Whether gate and up can run as one FP8 GEMM (one quantization of x, N = 2F): F fills whole 128x128 blocks."""
    return w_gate_EFD.shape[1] % 128 == 0


def grouped_swiglu(x_MD, w_gate_EFD, w_up_EFD, w_down_EDF, gemm, ends_E, counts_E, fuse_gate_up: bool = False):
    """Each expert's SwiGLU on its rows (sorted by expert, groups ending at ``ends_E``) with ``gemm(x, w, ends,
    counts)``; ``fuse_gate_up`` makes one call against ``(w_gate, w_up)`` ([M, 2F] out, split). The BF16
    grouped GEMM runs gate, up and the product through ``_GroupedSwiGLUInput`` (one input-gradient GEMM)."""
    if fuse_gate_up:
        gate, up = gemm(x_MD, (w_gate_EFD, w_up_EFD), ends_E, counts_E).split(w_gate_EFD.shape[1], dim=1)
    elif gemm is grouped_linear and FUSED_GATE_UP_DGRAD and _grouped_mm_ok(x_MD):
        return gemm(_GroupedSwiGLUInput.apply(x_MD, w_gate_EFD, w_up_EFD, ends_E), w_down_EDF, ends_E, counts_E)
    else:
        gate, up = gemm(x_MD, w_gate_EFD, ends_E, counts_E), gemm(x_MD, w_up_EFD, ends_E, counts_E)
    return gemm(F.silu(gate) * up, w_down_EDF, ends_E, counts_E)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on (grouped GEMMs are not on autocast's lists)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def count_selections(idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Selections per expert [E] (int64) without a host sync (bincount would need the max on the host)."""
    flat = idx_TK.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def sort_copies(idx_TK: torch.Tensor, num_experts: int, counts_E: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The T*K token copies in expert order, on the device: ``order`` (stable argsort of the flat expert ids,
    so copy ``order[j]`` is the j-th in expert order), its inverse permutation, and the copies per expert [E]
    (``counts_E`` when the caller has counted them already: one scatter kernel per layer less)."""
    order = torch.argsort(idx_TK.reshape(-1), stable=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return order, inverse, counts_E if counts_E is not None else count_selections(idx_TK, num_experts)


def experts_forward_loop(x_TD, routing: Routing, w_gate_EFD, w_up_EFD, w_down_EDF) -> torch.Tensor:
    """Reference: for each expert, run its tokens and accumulate weight * output in fp32."""
    T, D = x_TD.shape
    out_TD = torch.zeros(T, D, dtype=torch.float32, device=x_TD.device)
    for e in range(w_gate_EFD.shape[0]):
        tok, slot = torch.where(routing.idx_TK == e)
        if tok.numel() == 0:
            continue
        xe = x_TD[tok]
        ye = F.linear(F.silu(F.linear(xe, w_gate_EFD[e])) * F.linear(xe, w_up_EFD[e]), w_down_EDF[e])
        out_TD.index_add_(0, tok, ye.float() * routing.weight_TK[tok, slot, None])
    return out_TD.to(x_TD.dtype)


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16
    # torch 2.13 runs fp32 grouped GEMMs on the CPU, but its compile-time shape function accepts only bf16
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.compiler.is_compiling()


def grouped_linear(x_MD: torch.Tensor, w_EOD: torch.Tensor, ends_E: torch.Tensor, counts_E: torch.Tensor
                   ) -> torch.Tensor:
    """Rows of x sorted by expert; rows [ends[e-1], ends[e]) go through w[e]: y = x w[e]^T -> [M, O].

    torch._grouped_mm where the build supports it (one kernel, no host sync); otherwise a loop over the
    segments (needs the group ends on the host, fine on CPU).
    """
    if _grouped_mm_ok(x_MD):
        return torch._grouped_mm(x_MD, w_EOD.transpose(-2, -1), offs=ends_E)
    # segments by their ends, as _grouped_mm reads them: with padded groups (``align`` > 1) a group holds its
    # rows and then zero rows up to its end, so the counts alone would misplace every later group
    outs = []
    start = 0
    for e, end in enumerate(ends_E.tolist()):
        outs.append(F.linear(x_MD[start:end], w_EOD[e]))
        start = end
    if start < x_MD.shape[0]:   # rows past the last group (EP "allgather": other ranks' copies): zeros here,
        outs.append(x_MD.new_zeros(x_MD.shape[0] - start, w_EOD.shape[1]))   # never written by _grouped_mm
    return torch.cat(outs, dim=0) if outs else x_MD.new_zeros(0, w_EOD.shape[1])


def grouped_wgrad(g_MO: torch.Tensor, x_MI: torch.Tensor, ends_E: torch.Tensor, counts_E: torch.Tensor
                   ) -> torch.Tensor:
    """Per-expert g_e^T x_e -> [E, O, I] for rows sorted by expert: the weight gradient of ``grouped_linear``
    (the call torch's own _grouped_mm backward makes: a 2D x 2D grouped GEMM split along the rows)."""
    if _grouped_mm_ok(x_MI):
        return torch._grouped_mm(g_MO.t(), x_MI, offs=ends_E)
    out = x_MI.new_zeros(counts_E.numel(), g_MO.shape[1], x_MI.shape[1])
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        if n:
            out[e] = g_MO[start:start + n].t() @ x_MI[start:start + n]
        start += n
    return out


# The two backward passes over the token copies run as custom ops (``dsv3.kernels.moe_permute``: Triton on CUDA,
# their torch references elsewhere). False leaves them to Inductor as plain torch expressions: the A/B switch
# of ``benchmarks/train_step.py --ab PERMUTE_KERNELS`` (read at trace time, so reset dynamo after flipping it).
PERMUTE_KERNELS = True
# Gate and up share one input-gradient GEMM (``_GroupedSwiGLUInput``) when True. Off by default: on an H200
# (2026-11-26, session 7) it measured 1.01x on `small` and 0.98x on 3.2B, because the weight-gradient GEMMs on
# the halves of the [M, 2F] buffer (row stride 2F) ran at 394 us against 260-273 for contiguous operands.
# One weight-gradient GEMM over the whole buffer ([E, 2F, D], split) was worse still (session 8: 0.96x on 3.2B,
# 0.99x on `small`; the split halves are copied to match the parameters' layout).
FUSED_GATE_UP_DGRAD = False
# The dispatch gather and the gate/up GEMMs as one Function (``_CopiesGateUp``) whose backward sums both input
# gradients inside the gather-sum (BF16 path, unpadded groups, with PERMUTE_KERNELS). False: autograd adds them
# first (the A/B switch of ``benchmarks/train_step.py --ab COPIES_GATE_UP``).
COPIES_GATE_UP = True
# The gate/up GEMMs gather x's rows themselves (``dsv3.kernels.gather_gemm``, ``_GatheredGateUp``): the [T*K, D]
# dispatch copy is neither written nor saved for backward, whose weight gradients gather x's rows again, and
# whose input gradient is ONE GEMM over [d_gate | d_up] (one [T*K, D] output for the gather-sum, not two).
# Used on the COPIES_GATE_UP path; off until timed on a GPU (the A/B switch ``--ab GATHER_GEMM``).
GATHER_GEMM = False
# The down projection's backward reads w * g[token] by rows itself (``_GatheredDownCombine``): the combine's
# backward computes only the routing weights' gradient and writes no [T*K, D] dy. Same path; off until timed
# (``--ab GATHERED_COMBINE``).
GATHERED_COMBINE = False


class _GroupedSwiGLUInput(torch.autograd.Function):
    """silu(x w_gate[e]^T) * (x w_up[e]^T) for rows sorted by expert (groups ending at ``ends``): the gate and up
    grouped GEMMs and the SwiGLU product as autograd would run them. Its own backward writes d_gate | d_up once
    into one [M, 2F] buffer and computes dx as ONE grouped GEMM of it against [w_gate ; w_up] [E, 2F, D]; the
    weight gradients read the buffer's two halves. Left to autograd (``FUSED_GATE_UP_DGRAD = False``, the
    reference) the two input-gradient GEMMs each wrote an [M, D] gradient that was then added (206 us per `small`
    layer on an H200), and written as a cat inside this function Inductor computed the SiLU backward twice."""

    @staticmethod
    def forward(ctx, x_MD, w_gate_EFD, w_up_EFD, ends_E):
        gate = torch._grouped_mm(x_MD, w_gate_EFD.transpose(-2, -1), offs=ends_E)
        up = torch._grouped_mm(x_MD, w_up_EFD.transpose(-2, -1), offs=ends_E)
        ctx.save_for_backward(x_MD, w_gate_EFD, w_up_EFD, ends_E, gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, d_h_MF):
        x_MD, w_gate_EFD, w_up_EFD, ends_E, gate, up = ctx.saved_tensors
        F_ = gate.shape[1]
        g, dh = gate.float(), d_h_MF.float()
        sig = torch.sigmoid(g)
        d_up = dh * g * sig
        d_gate = dh * up.float() * sig * (1 + g * (1 - sig))     # d silu(g)/dg = sig (1 + g (1 - sig))
        d_MF2 = torch.cat([d_gate, d_up], dim=1).to(gate.dtype)
        dx = dwg = dwu = None
        if ctx.needs_input_grad[0]:
            dx = torch._grouped_mm(d_MF2, torch.cat([w_gate_EFD, w_up_EFD], dim=1), offs=ends_E)
        if ctx.needs_input_grad[1]:
            dwg = torch._grouped_mm(d_MF2[:, :F_].t(), x_MD, offs=ends_E)
        if ctx.needs_input_grad[2]:
            dwu = torch._grouped_mm(d_MF2[:, F_:].t(), x_MD, offs=ends_E)
        return dx, dwg, dwu, None


def gather_rows_or_zero(x_ND: torch.Tensor, src_R: torch.Tensor) -> torch.Tensor:
    """[R, D] rows ``x[src]``, where ``src == len(x)`` reads a zero row: what a zero-filled buffer with rows
    copied into it holds, as one gather (no fill, no ``index_copy_``, which is the slower kernel)."""
    return torch.cat([x_ND, x_ND.new_zeros(1, x_ND.shape[1])])[src_R]


class _GatherCopies(torch.autograd.Function):
    """x_sorted = x[order // K]: each token's K copies in expert order (placed at rows ``dest`` of a zeroed
    [rows, D] buffer when groups are padded). The gradient sums each token's K rows by gathering them back
    (``copy_rows``: the row of each flat copy) and reducing over K: no atomics, so it is deterministic, where
    autograd's index backward would scatter-add (non-deterministic on GPU)."""

    @staticmethod
    def forward(ctx, x_TD, order, copy_rows, K, dest=None, rows=None):
        ctx.save_for_backward(copy_rows)
        ctx.K = K
        if dest is None:
            return x_TD[order // K]
        # The padded layout as one gather: row r holds token src[r]; padding rows read an appended zero row.
        # (It was a gather, then an index_copy into zeros: three passes and two zero fills; Inductor fuses this
        # into one pass, 0.15 ms per `small` layer on an H200, 2026-12-07.)
        # Out of place on purpose: on torch 2.11 CUDA, a compiled autograd.Function whose forward returns the
        # result of an in-place op on a fresh tensor gets no backward at all (found 2026-11-26: it cost FP8
        # experts their whole dx under compile); the CUDA test in tests/test_moe_compile.py guards it.
        src = torch.full((rows,), x_TD.shape[0], dtype=order.dtype, device=order.device).scatter(0, dest, order // K)
        return gather_rows_or_zero(x_TD, src)

    @staticmethod
    def backward(ctx, g_MD):
        (copy_rows,) = ctx.saved_tensors
        # a custom op (Triton on CUDA): left to Inductor, this gather-sum fused into the RMSNorm backward that
        # consumes it, and that kernel gathered the K rows twice (294 us of a `small` layer's step)
        if PERMUTE_KERNELS:
            return gather_sum(g_MD, copy_rows, ctx.K), None, None, None, None, None
        T = copy_rows.numel() // ctx.K
        return g_MD[copy_rows].view(T, ctx.K, -1).sum(dim=1), None, None, None, None, None


def gathered_gate_up_backward(needs_input_grad, g_gate_MF, g_up_MF, x_MD, w_gate_EFD, w_up_EFD, ends_E, counts_E,
                              gemm, gather_sum_two):
    """(dx, dw_gate, dw_up) of (gate, up) = (x_s w_gate[e]^T, x_s w_up[e]^T), x_s rows gathered from x: the two
    input-gradient GEMMs (``gemm``) go to ``gather_sum_two(dx_gate, dx_up)``, which sums both back to the
    tokens in one pass; None where ``needs_input_grad`` (x, w_gate, w_up first) is False. Shared by the
    single-device ``_CopiesGateUp`` and EP's ``ep_allgather._SlotsGateUp``."""
    dx = dwg = dwu = None
    if needs_input_grad[0]:
        dx = gather_sum_two(gemm(g_gate_MF, w_gate_EFD.transpose(1, 2), ends_E, counts_E),
                            gemm(g_up_MF, w_up_EFD.transpose(1, 2), ends_E, counts_E))
    if needs_input_grad[1]:
        dwg = grouped_wgrad(g_gate_MF, x_MD, ends_E, counts_E)
    if needs_input_grad[2]:
        dwu = grouped_wgrad(g_up_MF, x_MD, ends_E, counts_E)
    return dx, dwg, dwu


class _CopiesGateUp(torch.autograd.Function):
    """(gate, up) = (x_s w_gate[e]^T, x_s w_up[e]^T) for the token copies in expert order, x_s = x[order // K]:
    the dispatch gather and both grouped GEMMs as one Function, so that the backward sums the two GEMMs' input
    gradients inside the gather-sum (``gather_sum(g_gate_dx, rows, K, g_up_dx)``). Left to autograd the two
    [T*K, D] input gradients were first added (a pass that writes one and reads two: 145 us per `small` layer
    and 8192-token micro-batch on an H100, more than the gather-sum itself)."""

    @staticmethod
    def forward(ctx, x_TD, w_gate_EFD, w_up_EFD, order, copy_rows, K, ends_E, counts_E):
        x_MD = x_TD[order // K]
        ctx.save_for_backward(x_MD, w_gate_EFD, w_up_EFD, copy_rows, ends_E, counts_E)
        ctx.K = K
        return (grouped_linear(x_MD, w_gate_EFD, ends_E, counts_E),
                grouped_linear(x_MD, w_up_EFD, ends_E, counts_E))

    @staticmethod
    def backward(ctx, g_gate, g_up):
        x_MD, w_gate_EFD, w_up_EFD, copy_rows, ends_E, counts_E = ctx.saved_tensors
        dx, dwg, dwu = gathered_gate_up_backward(
            ctx.needs_input_grad, g_gate, g_up, x_MD, w_gate_EFD, w_up_EFD, ends_E, counts_E, grouped_linear,
            lambda dx_gate, dx_up: gather_sum(dx_gate, copy_rows, ctx.K, dx_up))
        return dx, dwg, dwu, None, None, None, None, None


class _GatheredGateUp(torch.autograd.Function):
    """[gate | up] = x[src] [w_gate[e] ; w_up[e]]^T as ONE [M, 2F] output of one grouped GEMM that gathers x's
    rows while it loads them (``gathered_grouped_mm``): no [M, D] copy in HBM, none saved. Backward: the input
    gradient is one GEMM of the [M, 2F] gradient against w_gate[e] then w_up[e] along the reduction
    (``gathered_grouped_mm_nn``), summed back to the tokens by the gather-sum; the weight gradients read x's rows
    by token (``gathered_grouped_wgrad``) against the gradient's two column halves."""

    @staticmethod
    def forward(ctx, x_TD, w_gate_EFD, w_up_EFD, src_M, copy_rows, K, ends_E):
        ctx.save_for_backward(x_TD, w_gate_EFD, w_up_EFD, src_M, copy_rows, ends_E)
        ctx.K = K
        return gathered_grouped_mm(x_TD, w_gate_EFD, ends_E, src_M, None, w_up_EFD)

    @staticmethod
    def backward(ctx, g_MF2):
        x_TD, w_gate_EFD, w_up_EFD, src_M, copy_rows, ends_E = ctx.saved_tensors
        g_gate, g_up = g_MF2.split(w_gate_EFD.shape[1], dim=1)
        dx = dwg = dwu = None
        if ctx.needs_input_grad[0]:
            dx = gather_sum(gathered_grouped_mm_nn(g_MF2, w_gate_EFD, ends_E, w2_EKN=w_up_EFD), copy_rows, ctx.K)
        if ctx.needs_input_grad[1]:
            dwg = gathered_grouped_wgrad(g_gate, x_TD, ends_E, x_src=src_M)
        if ctx.needs_input_grad[2]:
            dwu = gathered_grouped_wgrad(g_up, x_TD, ends_E, x_src=src_M)
        return dx, dwg, dwu, None, None, None, None


def combine_rows(y_MD: torch.Tensor, rows: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
    """sum_k w[t, k] * y[rows[t*K + k]] -> [T, D], summed in fp32 and returned in y's dtype."""
    T, K = w_TK.shape
    return cast_result((y_MD[rows].view(T, K, -1).float() * w_TK[..., None]).sum(dim=1), y_MD.dtype)


class _GatheredDownCombine(torch.autograd.Function):
    """The down projection and the combine: y = h w_down[e]^T per expert, out[t] = sum_k w[t, k] y[rows[t*K+k]].
    Its backward never writes dy = w * g[token] (a [T*K, D] tensor): the input-gradient GEMM and the weight
    gradient read rows of g by token, scaled by each row's routing weight, while they load them
    (``gathered_grouped_mm_nn`` / ``gathered_grouped_wgrad``), and the routing weights' gradient
    <g[t], y[row]> comes from ``combine_weight_grad``. The forward is ``_CombineCopies``' on the GEMM's output."""

    @staticmethod
    def forward(ctx, h_MF, w_down_EDF, rows, w_TK, order, src_M, ends_E, counts_E):
        y_MD = grouped_linear(h_MF, w_down_EDF, ends_E, counts_E)
        w_M = w_TK.reshape(-1)[order].float()      # each row's routing weight, rows in expert order
        ctx.save_for_backward(h_MF, w_down_EDF, y_MD, rows, w_TK, src_M, w_M, ends_E)
        return combine_rows(y_MD, rows, w_TK)

    @staticmethod
    def backward(ctx, g_TD):
        h_MF, w_down_EDF, y_MD, rows, w_TK, src_M, w_M, ends_E = ctx.saved_tensors
        dh = dw_down = dw_TK = None
        if ctx.needs_input_grad[0]:
            dh = gathered_grouped_mm_nn(g_TD, w_down_EDF, ends_E, src_M, w_M)
        if ctx.needs_input_grad[1]:
            dw_down = gathered_grouped_wgrad(g_TD, h_MF, ends_E, g_src=src_M, g_scale=w_M)
        if ctx.needs_input_grad[3]:
            dw_TK = combine_weight_grad(g_TD, y_MD, rows, w_TK)
        return dh, dw_down, None, dw_TK, None, None, None, None


class _CombineCopies(torch.autograd.Function):
    """out[t] = sum_k w[t, k] * y[rows[t*K + k]] for y holding exactly the T*K copies (``rows`` the inverse of
    the permutation that sorted them), summed in fp32 and returned in y's dtype: the un-permute and the
    weighted sum as one gather-reduce (Inductor fuses it into one kernel, where an index_copy_ back to token
    order and then the sum were two passes over the [T*K, D] copies). y is saved in its own dtype.

    Backward (``dsv3.kernels.moe_permute.combine_backward``), token by token: g[t] read once, then for each copy
    dy[rows[t*K+k]] = w[t, k] g[t] and dw[t, k] = <g[t], y[rows[t*K+k]]>. Distinct rows, no scatter-add, so it
    is deterministic. In expert order (Inductor's choice) the same pass gathered g K times and took two
    kernels (460 us of a `small` layer on an H200)."""

    @staticmethod
    def forward(ctx, y_MD, rows, w_TK):
        ctx.save_for_backward(y_MD, rows, w_TK)
        return combine_rows(y_MD, rows, w_TK)

    @staticmethod
    def backward(ctx, g_TD):
        y_MD, rows, w_TK = ctx.saved_tensors
        if PERMUTE_KERNELS:
            dy, dw = combine_backward(g_TD, y_MD, rows, w_TK)
            return dy, None, dw
        # left to Inductor: one pass in expert order (the session-6 code, kept for A/B timing)
        T, K = w_TK.shape
        order = torch.empty_like(rows).scatter_(0, rows, torch.arange(rows.numel(), device=rows.device))
        g_MD = g_TD.float()[order // K]
        dy = (g_MD * w_TK.reshape(-1)[order, None]).to(y_MD.dtype)
        dw = (g_MD * y_MD.float()).sum(dim=-1)[rows].view(T, K)
        return dy, None, dw


def combine_copies(y_MD: torch.Tensor, rows: torch.Tensor, weight_TK: torch.Tensor) -> torch.Tensor:
    """Expert outputs, one row per token copy in expert order (``rows``: the row of each flat copy, the inverse
    of the sorting permutation) -> [T, D]: sum_k weight[t, k] * y[rows[t*K+k]] in fp32, returned in y's dtype."""
    return _CombineCopies.apply(y_MD, rows, weight_TK)


def experts_forward_sorted(x_TD, routing: Routing, w_gate_EFD, w_up_EFD, w_down_EDF, gemm=None, align: int = 1,
                           cast_weights: bool = True, fuse_gate_up: bool = False) -> torch.Tensor:
    """Grouped path: sort token copies by expert, grouped GEMMs, un-permute, deterministic weighted sum.

    The weighted sum is a gather back to [T, K, D] then a reduction over K: no atomics, so results do not
    depend on scheduling (index_add_ on GPU would be non-deterministic). ``gemm(x, w, ends, counts)`` replaces
    the BF16 grouped GEMM (the FP8 recipe passes its block-scaled one). ``align`` > 1 starts every expert's
    rows at a multiple of ``align`` (zero rows in between; the buffer has a fixed size, T*K + E*(align-1)
    rounded up, so nothing waits on the host); ``ends`` are then the padded group ends. ``fuse_gate_up`` calls
    ``gemm(x, (w_gate, w_up), ...)`` once for both projections ([M, 2F] out; the FP8 grouped GEMM takes tuples).
    """
    T, D = x_TD.shape
    K = routing.idx_TK.shape[1]
    E = w_gate_EFD.shape[0]
    dtype = compute_dtype(x_TD)
    x_TD = x_TD.to(dtype)
    if cast_weights:
        w_gate_EFD, w_up_EFD, w_down_EDF = (t.to(dtype) for t in (w_gate_EFD, w_up_EFD, w_down_EDF))
    flat_idx = routing.idx_TK.reshape(-1)
    order, inverse, counts_E = sort_copies(routing.idx_TK, E, routing.counts_E)
    M = order.numel()
    if align > 1:
        padded_E = (counts_E + (align - 1)) // align * align
        ends_E = torch.cumsum(padded_E, 0)
        # row of sorted copy j (expert e): j + (padded start of e - unpadded start of e)
        shift_E = (ends_E - padded_E) - (torch.cumsum(counts_E, 0) - counts_E)
        dest = torch.arange(M, device=order.device) + shift_E[flat_idx[order]]
        rows = -(-(M + E * (align - 1)) // align) * align
        copy_rows = dest[inverse]
        x_sorted = _GatherCopies.apply(x_TD, order, copy_rows, K, dest, rows)
        ends_E = ends_E.to(torch.int32)
    else:
        ends_E = torch.cumsum(counts_E, 0).to(torch.int32)
        copy_rows = inverse
        if COPIES_GATE_UP and PERMUTE_KERNELS and gemm is None and not fuse_gate_up and not FUSED_GATE_UP_DGRAD:
            # the token of each row in expert order, for the kernels that gather rows themselves
            src_M = (order // K).to(torch.int32) if GATHER_GEMM or GATHERED_COMBINE else None
            if GATHER_GEMM:
                gate, up = _GatheredGateUp.apply(x_TD, w_gate_EFD, w_up_EFD, src_M, copy_rows, K,
                                                 ends_E).split(w_gate_EFD.shape[1], dim=1)
            else:
                gate, up = _CopiesGateUp.apply(x_TD, w_gate_EFD, w_up_EFD, order, copy_rows, K, ends_E, counts_E)
            h_MF = F.silu(gate) * up
            if GATHERED_COMBINE:
                return _GatheredDownCombine.apply(h_MF, w_down_EDF, copy_rows, routing.weight_TK, order, src_M,
                                                  ends_E, counts_E)
            return combine_copies(grouped_linear(h_MF, w_down_EDF, ends_E, counts_E), copy_rows, routing.weight_TK)
        x_sorted = _GatherCopies.apply(x_TD, order, copy_rows, K)
    # FP8 experts pass their own grouped GEMM
    y_sorted = grouped_swiglu(x_sorted, w_gate_EFD, w_up_EFD, w_down_EDF, gemm or grouped_linear, ends_E, counts_E,
                              fuse_gate_up)
    # back to token order and the weighted sum, one gather-reduce (fp32 sum; autocast leaves it alone). With
    # padded groups too: its backward zeroes the padding rows. (The padded path used to index_select here,
    # whose backward is an index_add: atomics, so non-deterministic, and 1.3 ms per `small` layer on an H100.)
    return combine_copies(y_sorted, copy_rows, routing.weight_TK)


def sequence_balance_loss(scores_BSE: torch.Tensor, k: int) -> torch.Tensor:
    """Complementary sequence-wise balance loss (unweighted): mean over sequences of sum_i f_i * P_i.

    f_i = E/(K*S) * #tokens whose plain top-K (unbiased, no group limit) contains i; P_i = mean_t of the
    normalized affinity s_it / sum_j s_jt. Multiply by alpha (1e-4 in V3) in the trainer.
    """
    B, S, E = scores_BSE.shape
    chosen = torch.zeros_like(scores_BSE).scatter_(-1, scores_BSE.topk(k, dim=-1).indices, 1.0)
    f_BE = chosen.sum(dim=1) * (E / (k * S))
    P_BE = (scores_BSE / scores_BSE.sum(dim=-1, keepdim=True)).mean(dim=1)
    return (f_BE.detach() * P_BE).sum(dim=-1).mean()


def max_violation(counts_E: torch.Tensor) -> torch.Tensor:
    """MaxVio = (max_e n_e - mean n) / mean n."""
    counts = counts_E.float()
    mean = counts.mean()
    return (counts.max() - mean) / mean.clamp_min(1e-9)


class MoE(nn.Module):
    """``mlp`` of a MoE layer: router ``gate``, stacked ``experts``, ``shared_experts``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.gate = Router(config)
        self.experts = Experts(config)
        self.shared_experts = MLP(config.hidden_size, config.n_shared_experts * config.moe_intermediate_size) \
            if config.n_shared_experts > 0 else None
        # Selections since the last bias update; the owning DecoderLayer adds each training forward's counts
        # (not eval, not recompute replays).
        self.register_buffer("tokens_per_expert", torch.zeros(config.n_routed_experts, dtype=torch.int64),
                             persistent=False)

    def forward(self, x_BSD: torch.Tensor, want_balance_loss: bool = False):
        """-> (y [B,S,D], aux) with aux = {'counts': [E] selections in this call, 'balance': scalar or None}."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        routing = self.gate(x_TD)
        counts = count_selections(routing.idx_TK, self.config.n_routed_experts)
        routing = Routing(routing.idx_TK, routing.weight_TK, routing.scores_TE, counts)     # counted once
        y = self.experts(x_TD, routing).view(B, S, D)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x_BSD)
        balance = None
        if want_balance_loss:
            balance = sequence_balance_loss(routing.scores_TE.view(B, S, -1), self.config.num_experts_per_tok)
        return y, {"counts": counts.detach(), "balance": balance}


def init_moe_(moe: MoE, std: float) -> None:
    """Normal(0, std) for router and experts (the shared MLP is a plain MLP and initialized with the rest)."""
    with torch.no_grad():
        moe.gate.weight.normal_(0.0, std)
        for w in (moe.experts.gate_proj, moe.experts.up_proj, moe.experts.down_proj):
            w.normal_(0.0, std)
