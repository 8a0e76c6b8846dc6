"""Memory per GPU for a training layout, and the largest micro-batch or depth that fits.

Layout: PP pipeline stages, DP = gpus / PP data-parallel replicas, EP expert-parallel ranks carved out of DP
(V3: 2,048 GPUs, PP 16, DP 128, EP 64), no tensor parallelism. ZeRO-1 shards the optimizer state (master
weights and moments) over the replicas that hold the same weights: DP for dense weights, DP / EP for experts.
Gradients stay whole (accumulated over micro-batches in the precision the recipe names).

Activations: a list of the tensors one token leaves for the backward pass in one layer (``saved_values``),
each tagged as a Linear input (FP8 in V3's recipe) or something else (BF16). Recompute choices: 'none',
'selective' (V3: RMSNorms and the MLA up-projections are recomputed), 'full' (only each layer's input is kept).
The worst pipeline stage is reported: the first holds the embedding and the most in-flight micro-batches, the
last holds the head, its logits and the MTP module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from dsv3.config import ModelConfig
from dsv3.plan.kvcache import dtype_bytes
from dsv3.plan.params import expert_params, mla_attention_params, router_params
from dsv3.plan.pipeline import schedule_cost

RECOMPUTE = ("none", "selective", "full")
ATTENTION = ("flash", "eager")
GIB = 1024 ** 3


@dataclass(frozen=True)
class Recipe:
    """Bytes per element of each training state (V3: FP32 master, BF16 weights, FP32 grads, BF16 moments)."""

    weights: str = "bf16"
    master: str | None = "fp32"
    grads: str = "fp32"
    moments: str = "bf16"
    act_linear: str = "fp8"  # saved inputs of Linear layers
    act_other: str = "bf16"  # everything else kept for backward

    @classmethod
    def named(cls, name: str) -> "Recipe":
        """'v3' (the paper's FP8 recipe), 'bf16' (BF16 mixed precision), 'fp32' (plain fp32, what CPU tests run)."""
        recipes = {"v3": cls(), "bf16": cls(act_linear="bf16", moments="fp32"),
                   "fp32": cls(weights="fp32", master=None, grads="fp32", moments="fp32", act_linear="fp32",
                               act_other="fp32")}
        try:
            return recipes[name]
        except KeyError:
            raise ValueError(f"unknown precision recipe {name!r}: use one of {', '.join(recipes)}") from None


@dataclass(frozen=True)
class Layout:
    """How the job is laid out over GPUs."""

    gpus: int = 1
    pp: int = 1
    ep: int = 1
    micro_batch: int = 1
    seq_len: int = 4096
    zero1: bool = True
    recompute: str = "none"
    schedule: str = "1f1b"
    attention: str = "flash"
    grad_accumulation: bool = True  # grads live while activations are held (micro-batch accumulation)

    @property
    def dp(self) -> int:
        return self.gpus // self.pp

    def check(self, cfg: ModelConfig) -> None:
        """Raise ValueError naming the first inconsistent number."""
        if min(self.gpus, self.pp, self.ep, self.micro_batch, self.seq_len) < 1:
            raise ValueError("gpus, pp, ep, micro-batch and seq-len must all be >= 1")
        if self.gpus % self.pp:
            raise ValueError(f"gpus ({self.gpus}) must be a multiple of pp ({self.pp})")
        if self.dp % self.ep:
            raise ValueError(f"ep ({self.ep}) must divide the data-parallel size gpus/pp = {self.dp}")
        if cfg.n_routed_experts and cfg.n_routed_experts % self.ep:
            raise ValueError(f"ep ({self.ep}) must divide n_routed_experts ({cfg.n_routed_experts})")
        if self.pp > cfg.num_hidden_layers:
            raise ValueError(f"pp ({self.pp}) cannot exceed num_hidden_layers ({cfg.num_hidden_layers})")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute {self.recompute!r}: use one of {', '.join(RECOMPUTE)}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention {self.attention!r}: use one of {', '.join(ATTENTION)}")


@dataclass
class StageMemory:
    """Bytes on one GPU of one pipeline stage."""

    stage: int
    layers: int
    params: int  # weights held by this GPU (after the schedule's parameter multiple)
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.parts.values())


# ----------------------------------------------------------------------------------------- activations
def saved_values(cfg: ModelConfig, moe: bool, seq_len: int, recompute: str = "none",
                 attention: str = "flash") -> dict[str, tuple[float, bool]]:
    """Values per token one layer keeps for backward: name -> (count, is_linear_input)."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    if recompute == "full":
        return {"layer input": (d, False)}
    sel = recompute == "selective"
    out: dict[str, tuple[float, bool]] = {"attn norm input": (d, False)}
    if not sel:
        out["attn norm output"] = (d, True)
    if cfg.q_lora_rank:
        out["q_a output"] = (cfg.q_lora_rank, False)
        if not sel:
            out["q_a norm output"] = (cfg.q_lora_rank, True)
    out["kv_a output"] = (cfg.kv_lora_rank + cfg.qk_rope_head_dim, False)
    if not sel:
        out["kv_a norm output"] = (cfg.kv_lora_rank, True)
        # q, k, v at the attention core; selective recompute rebuilds them from the latents (up-projections).
        out["q, k, v"] = (h * (2 * cfg.qk_head_dim + cfg.v_head_dim), False)
    out["attention output"] = (h * cfg.v_head_dim, True)
    if attention == "eager":
        out["attention probabilities"] = (h * seq_len, False)  # plain softmax keeps the s x s map per head
    out["ffn norm input"] = (d, False)
    if not sel:
        out["ffn norm output"] = (d, True)
    if moe:
        K, S, f = cfg.num_experts_per_tok, cfg.n_shared_experts, cfg.moe_intermediate_size
        out["router scores"] = (2 * cfg.n_routed_experts, False)
        out["expert inputs (K copies)"] = (K * d, True)
        out.update(_swiglu("expert ", (K + S) * f, sel))
        out["expert outputs"] = (K * d, False)  # needed for the gradient of the routing weights
    else:
        out.update(_swiglu("", cfg.intermediate_size, sel))
    return out


def _swiglu(prefix: str, width: float, selective: bool) -> dict[str, tuple[float, bool]]:
    """SwiGLU's saved values: eager keeps gate, up, silu(gate) and the product (down's input); V3 caches only
    the SwiGLU inputs, in FP8, and recomputes the rest (report section 3.3)."""
    if selective:
        return {f"{prefix}SwiGLU inputs (gate/up, FP8)": (2 * width, True)}
    return {f"{prefix}gate/up/silu": (3 * width, False), f"{prefix}down input": (width, True)}


def layer_activation_bytes(cfg: ModelConfig, moe: bool, layout: Layout, recipe: Recipe) -> float:
    """Bytes per token one layer keeps for backward."""
    lin, oth = dtype_bytes(recipe.act_linear), dtype_bytes(recipe.act_other)
    vals = saved_values(cfg, moe, layout.seq_len, layout.recompute, layout.attention)
    return sum(n * (lin if is_lin else oth) for n, is_lin in vals.values())


def head_activation_bytes(cfg: ModelConfig, recipe: Recipe) -> float:
    """Per token at the head: final norm input/output and the fp32 logits plus their softmax for the loss."""
    oth = dtype_bytes(recipe.act_other)
    return 2 * cfg.hidden_size * oth + 2 * cfg.vocab_size * 4


def mtp_activation_bytes(cfg: ModelConfig, layout: Layout, recipe: Recipe) -> float:
    """Per token for all MTP modules: norms and eh_proj input, one MoE block, and a head."""
    oth = dtype_bytes(recipe.act_other)
    one = 4 * cfg.hidden_size * oth + layer_activation_bytes(cfg, True, layout, recipe) + head_activation_bytes(cfg, recipe)
    return cfg.num_nextn_predict_layers * one


# ------------------------------------------------------------------------------------------- stages
def split_layers(n_layers: int, pp: int) -> list[range]:
    """Contiguous layer ranges per stage, the first ``n_layers % pp`` stages one layer longer."""
    base, extra = divmod(n_layers, pp)
    out, start = [], 0
    for i in range(pp):
        n = base + (1 if i < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


def stage_memory(cfg: ModelConfig, layout: Layout, recipe: Recipe, stage: int) -> StageMemory:
    """Every term of one GPU's memory in pipeline stage ``stage``."""
    layers = split_layers(cfg.num_hidden_layers, layout.pp)[stage]
    first, last = stage == 0, stage == layout.pp - 1
    d, V = cfg.hidden_size, cfg.vocab_size
    e_local = cfg.n_routed_experts // layout.ep if cfg.n_routed_experts else 0
    dense_w, expert_w = 0, 0
    for l in layers:
        dense_w += mla_attention_params(cfg) + 2 * d
        if cfg.is_moe_layer(l):
            dense_w += cfg.n_shared_experts * expert_params(cfg) + router_params(cfg)
            expert_w += e_local * expert_params(cfg)
        else:
            dense_w += 3 * d * cfg.intermediate_size
    if first:
        dense_w += V * d
    if last:
        dense_w += d + (0 if cfg.tie_word_embeddings else V * d)
        D = cfg.num_nextn_predict_layers
        # MTP lives on the last stage; it shares the main embedding/head, so no copies here.
        dense_w += D * (2 * d + 2 * d * d + mla_attention_params(cfg) + 2 * d + d
                        + cfg.n_shared_experts * expert_params(cfg) + router_params(cfg))
        expert_w += D * e_local * expert_params(cfg)
    sched = schedule_cost(layout.schedule, layout.pp) if layout.pp > 1 else None
    pmult = sched.param_multiple if sched else 1
    dense_w, expert_w = dense_w * pmult, expert_w * pmult
    params = dense_w + expert_w

    shard_dense = layout.dp if layout.zero1 else 1
    shard_expert = max(1, layout.dp // layout.ep) if layout.zero1 else 1
    opt_bytes = 2 * dtype_bytes(recipe.moments) + (dtype_bytes(recipe.master) if recipe.master else 0)
    parts: dict[str, float] = {
        "weights": params * dtype_bytes(recipe.weights),
        "gradients": params * dtype_bytes(recipe.grads),
        "optimizer (master + moments)": opt_bytes * (dense_w / shard_dense + expert_w / shard_expert),
    }
    tokens = layout.micro_batch * layout.seq_len
    per_mb = sum(layer_activation_bytes(cfg, cfg.is_moe_layer(l), layout, recipe) for l in layers)
    if sched is None:
        in_flight = 1
    elif layout.schedule == "dualpipe":
        in_flight = sched.activation_multiple  # PP + 1 (Table 2), units of one stage's micro-batch
    else:
        in_flight = layout.pp - stage  # 1F1B/ZB1P: stage i warms up with PP - i micro-batches
    parts["activations"] = per_mb * tokens * in_flight
    if last:
        # The last stage runs each micro-batch's backward right after its forward: one micro-batch of head,
        # logits and MTP activations at a time.
        parts["head + MTP activations"] = (head_activation_bytes(cfg, recipe)
                                           + mtp_activation_bytes(cfg, layout, recipe)) * tokens
        # Backward starts at the loss: the fp32 gradients w.r.t. the log-probabilities and w.r.t. the logits
        # exist together for a moment, on top of everything saved.
        parts["loss backward transient"] = 2 * V * 4 * tokens
    if not layout.grad_accumulation:
        # One micro-batch with grads freed before it: grads and activations are not alive together, the
        # peak is the larger of the two (activations at the end of forward, grads at the optimizer step).
        parts["gradients"] = max(0.0, parts["gradients"] - parts["activations"])
    return StageMemory(stage, len(layers), params, parts)


def memory_per_gpu(cfg: ModelConfig, layout: Layout, recipe: Recipe = Recipe()) -> list[StageMemory]:
    """Memory of one GPU in every pipeline stage (take ``max(..., key=total)`` for the budget)."""
    layout.check(cfg)
    return [stage_memory(cfg, layout, recipe, s) for s in range(layout.pp)]


def peak_bytes(cfg: ModelConfig, layout: Layout, recipe: Recipe = Recipe()) -> float:
    """Largest per-GPU total over the stages."""
    return max(s.total for s in memory_per_gpu(cfg, layout, recipe))


def max_micro_batch(cfg: ModelConfig, layout: Layout, recipe: Recipe, gpu_bytes: float, limit: int = 1 << 16) -> int:
    """Largest micro-batch whose peak fits ``gpu_bytes`` (0 when even 1 does not fit)."""
    import dataclasses
    lo, hi = 0, limit
    while lo < hi:  # memory grows monotonically with the micro-batch: bisect
        mid = (lo + hi + 1) // 2
        if peak_bytes(cfg, dataclasses.replace(layout, micro_batch=mid), recipe) <= gpu_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


def max_layers(cfg: ModelConfig, layout: Layout, recipe: Recipe, gpu_bytes: float, limit: int = 4096) -> int:
    """Deepest model of this width (more MoE layers) that fits; 0 when none does."""
    import dataclasses
    best = 0
    lo = max(layout.pp, cfg.first_k_dense_replace + 1)
    for n in range(lo, limit + 1):
        c = dataclasses.replace(cfg, num_hidden_layers=n)
        if peak_bytes(c, layout, recipe) > gpu_bytes:
            break
        best = n
    return best


def gib(x: float) -> float:
    """Bytes to GiB."""
    return x / GIB


def fits(total: float, gpu_gib: float) -> bool:
    """Whether ``total`` bytes fit a card of ``gpu_gib`` GiB."""
    return total <= gpu_gib * GIB and math.isfinite(total)
