"""Step-time simulator: one training step of an MLA/MoE model on a PP x DP layout (EP inside DP), from rates.

What it times, per pipeline chunk and micro-batch (``chunk_work``):

* compute of every decoder layer in the chunk: the attention projections, shared experts and dense FFNs at
  the dense GEMM rate, the routed experts at the grouped GEMM rate (FP8 or BF16 per ``precision``), the
  router in BF16, the attention core at the attention rates (causal model FLOPs), and the memory-bound work
  (RMSNorms, RoPE, residual adds, SwiGLU, FP8 quantization, the weighted combine) as HBM bytes. Backward is
  split like a zero-bubble schedule: B = input gradients (+ attention backward, elementwise backward and the
  recomputation), W = weight gradients (one more GEMM pass). The first chunk embeds; the last runs the final
  norm, the head, the loss, and the MTP module(s) (eh_proj, one MoE block, the shared head again).
* the EP all-to-all of every MoE layer: dispatch (FP8, 1 byte/value) and combine (BF16, 2 bytes/value) bytes
  from ``comm.ep_traffic``; node-limited routing sends one copy per reached node over IB (a token reaches
  ``min(topk_group, K, EP nodes)`` nodes, of which a fraction (N-1)/N is remote) and K copies over NVLink
  inside the node; IB and NVLink legs pipeline, so a transfer takes the slower leg plus a latency. Backward
  moves the same bytes (V3: FP8 for the gradient sent to the experts, BF16 back).
* pipeline P2P: the BF16 activation (forward) or its gradient (backward) of one micro-batch; IB when
  neighbouring stages sit on different nodes, NVLink otherwise; it delays the consumer, occupies no SMs.
* ZeRO-1 data parallelism: reduce-scatter of the gradients (``grad_bytes``) and all-gather of the BF16
  weights, non-expert parameters over DP, expert parameters over DP/EP (ring volumes, IB when the group
  spans nodes); the reduce-scatter of a chunk starts when the rank's last backward op of that chunk ends
  (hidden under the rest of the step as far as it goes); the optimizer (AdamW on the local shard) at the fused
  AdamW's achieved bytes/s (``Rates.optimizer_gbps``).

What this project's trainer pays on top (``trainer_options``; off in the V3 defaults, each term's derivation
in its docstring and at the code): fp32 master weights cast to BF16 every micro-batch and their gradients
cast back and accumulated in fp32 (``cast_work``), an fp32 residual stream, the fp32 router, torch top-k
routing (``Rates.routing_ns_per_token``), the sort-based permutation of the token copies and, with EP, the
receiver's regrouping, a host sync per MoE layer and micro-batch with EP and a few per step
(``Rates.host_sync_us``), the fused fp32 AdamW (``Options.optimizer_bytes`` at ``Rates.optimizer_gbps``),
gradient clipping, and data parallelism as the trainer runs it (fp32 all-reduce of gradient buckets plus the
buckets' copies, ZeRO-1 broadcast of fp32 parameters). ``ep_chunks`` > 1 hides all but one chunk of each
layer's all-to-alls under the routed experts. Checked against benchmarks/results/raw/profile-small.txt (one
step of the small preset on an H100, per kernel) and the one-GPU / DP=2 steps of
benchmarks/results/2026-11-25-distributed.json (tests/test_plan_step_trainer.py).

The schedule (``dsv3.parallel.pipeline.schedules``: 1F1B, or DualPipeV: DeepSeek's DualPipe folded to a V,
the same Table-2 bubble for the same number of stages) is simulated event by event: every rank runs its op
list in order, an op starts when the rank is free and its inputs have arrived. A lone op exposes its EP
communication (compute + comm); an overlapped F&B pair (DualPipe) costs max(compute x sms/(sms-comm_sms),
comm of both halves): the pair's communication hides under the other half's computation while the compute
loses the SMs the all-to-all occupies. Exposed communication = communication time not hidden under compute.

Golden check (tests/test_plan_step.py): the Insights paper's Table 4 (``TABLE4``), DeepSeek-V3 on 2,048 H800
GPUs: 19.926 s per step and 1,541.7 tokens/s/GPU. Its operating point: 272.80B tokens/day on 2,048 GPUs at
19.926 s/step = 62,914,560 tokens per step = 15,360 sequences of 4,096 tokens (the V3 report's final batch
size); PP 16, EP 64, DP 128 (V3 report 3.2), so 120 sequences per pipeline per step. MFU = model FLOPs per
token (causal or not) x tokens/s/GPU / 989 TFLOP/s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from dsv3.config import ModelConfig
from dsv3.plan import comm as ep_comm
from dsv3.plan.flops import training_flops_per_token
from dsv3.plan.params import expert_params, mla_attention_params, router_params
from dsv3.plan.rates import Rates

SCHEDULES = ("1f1b", "dualpipev", "dualpipe")  # "dualpipe" is simulated as DualPipeV (see ``_schedule_name``)
PRECISIONS = ("fp8", "bf16")
RECOMPUTE = ("none", "selective", "full", "attention")

# Insights paper (arXiv 2505.09343) Table 4, MPFT column: DeepSeek-V3 on 2,048 H800 GPUs. The per-phase rows
# (s, one rank) add up to 19.90 s, the step time within 0.13%.
TABLE4 = {"tokens_per_day_B": 272.80, "step_s": 19.926, "tokens_per_s_per_gpu": 1541.7, "1F_s": 1.13,
          "bubble_s": 2.06, "1B_s": 1.99, "1W_s": 0.48, "1F1B_s": 13.95, "opt_s": 0.29,
          "tflops_noncausal": 432, "tflops_causal": 385, "mfu_noncausal_pct": 43.73, "mfu_causal_pct": 38.94}
TABLE4_LAYOUT = {"pp": 16, "ep": 64, "dp": 128, "micro_batch": 1, "seq_len": 4096, "microbatches": 120}


# ----------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    """PP stages x DP replicas (GPUs = pp * dp); EP ranks carved out of DP; no tensor parallelism."""

    pp: int = 1
    ep: int = 1
    dp: int = 1

    @property
    def gpus(self) -> int:
        return self.pp * self.dp

    def check(self, cfg: ModelConfig | None = None) -> "Layout":
        if min(self.pp, self.ep, self.dp) < 1:
            raise ValueError(f"layout pp={self.pp}, ep={self.ep}, dp={self.dp}: every size must be >= 1")
        if self.dp % self.ep:
            raise ValueError(f"ep ({self.ep}) must divide dp ({self.dp}): EP ranks are carved out of data parallel")
        if cfg is not None and cfg.n_routed_experts and cfg.n_routed_experts % self.ep:
            raise ValueError(f"ep ({self.ep}) must divide n_routed_experts ({cfg.n_routed_experts})")
        return self


def parse_layout(text: str) -> Layout:
    """``pp=16,ep=64,dp=128`` (any order, missing sizes 1) -> Layout; ValueError naming the bad part."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        key, sep, val = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("pp", "ep", "dp"):
            raise ValueError(f"bad layout part {part!r} in {text!r}: write e.g. pp=16,ep=64,dp=128 "
                             "(keys pp, ep, dp)")
        if key in sizes:
            raise ValueError(f"layout {text!r} names {key} twice")
        try:
            sizes[key] = int(val)
        except ValueError:
            raise ValueError(f"layout {text!r}: {key} = {val!r} is not an integer") from None
    if not sizes:
        raise ValueError(f"empty layout {text!r}: write e.g. pp=16,ep=64,dp=128")
    return Layout(**sizes).check()


# ------------------------------------------------------------------------------------------ chunk costs
@dataclass
class Work:
    """Seconds of one chunk for one micro-batch: compute split F / B (input part) / W, and EP comm."""

    f: float = 0.0        # forward compute
    b: float = 0.0        # backward input-gradient compute (incl. recomputation and attention backward)
    w: float = 0.0        # weight-gradient compute
    kf: float = 0.0       # forward EP all-to-all (dispatch + combine of every MoE layer)
    kb: float = 0.0       # backward EP all-to-all
    parts: dict = field(default_factory=dict)  # forward compute by kind, for the report
    b_parts: dict = field(default_factory=dict)  # backward terms priced on their own (not as GEMM replays)

    def add(self, other: "Work") -> None:
        self.f += other.f
        self.b += other.b
        self.w += other.w
        self.kf += other.kf
        self.kb += other.kb
        for k, v in other.parts.items():
            self.parts[k] = self.parts.get(k, 0.0) + v
        for k, v in other.b_parts.items():
            self.b_parts[k] = self.b_parts.get(k, 0.0) + v


@dataclass(frozen=True)
class Options:
    """What else shapes the cost besides the rates.

    The defaults describe DeepSeek-V3's training stack (the Table 4 golden check). The fields after
    ``overlap_dp`` price what this project's trainer pays on top of the model's kernels; they are off (zero)
    by default and ``trainer_options`` sets them as ``dsv3 train`` runs (each value's derivation is there).
    """

    precision: str = "fp8"          # GEMM inputs of Linear layers (V3: FP8; head, router, attention stay BF16)
    recompute: str = "selective"    # V3: RMSNorms and MLA up-projections recomputed, SwiGLU from FP8 inputs;
    #                                 "attention": the attention sub-block replayed (the trainer's "selective")
    node_limit: int | None = None   # nodes a token may reach (default: the model's topk_group)
    dispatch_bytes: float = 1.0     # FP8 dispatch
    combine_bytes: float = 2.0      # BF16 combine
    grad_bytes: float = 4.0         # gradients reduce-scattered in FP32 (V3 keeps FP32 grads for the optimizer)
    weight_bytes: float = 2.0       # BF16 weights all-gathered after the optimizer
    expert_imbalance: float = 1.0   # busiest EP rank's expert tokens / mean (1.0 = perfectly balanced)
    overlap_dp: bool = True         # start a chunk's gradient reduce-scatter when its last backward ends
    # ---- the trainer's own costs (see trainer_options)
    optimizer_bytes: float | None = None  # HBM bytes per parameter of the AdamW update (None: V3's
    #                                 grad_bytes + 8 fp32 master read/write + 8 BF16 moments read/write + weight_bytes)
    residual_bytes: float = 2.0     # bytes per value of the residual stream (4: fp32 under autocast)
    autocast_casts: bool = False    # fp32 master weights cast to BF16 every micro-batch, BF16 weight gradients
    #                                 cast back and accumulated into fp32 .grad
    casts_once_per_step: bool = False  # with autocast_casts: train.weight_cast = "per_step" (BF16 copies cast once
    #                                 per step; their BF16 gradients added straight into the fp32 .grad)
    router_fp32: bool = False       # router GEMMs in fp32 (Rates.gemm_fp32_tflops), its input cast to fp32
    torch_routing: bool = False     # top-k routing and the dispatch sort as torch kernels (Rates.routing_ns_per_token)
    moe_permute: bool = False       # sort-based gather of the K copies and the un-permute (V3: inside DeepEP)
    ep_regroup: bool = False        # EP receiver regroups rows by local expert and back (two row permutations)
    ep_host_syncs: int = 0          # host syncs per MoE layer and micro-batch (forward) when ep > 1
    ep_chunks: int = 1              # MoE token chunks per layer whose all-to-alls overlap the other chunks' experts
    ep_dispatch: str = "alltoall"   # "allgather": every token to every EP rank (parallel.ep_dispatch; no host sync,
    #                                 ep x T x K slots sorted and gathered on each rank)
    host_syncs_per_microbatch: int = 0
    step_host_syncs: int = 0        # host syncs per optimizer step outside the micro-batches
    clip_bytes: float = 0.0         # HBM bytes per parameter of global-norm gradient clipping
    dp_allreduce: bool = False      # gradients all-reduced (twice a reduce-scatter's volume), not reduce-scattered
    dp_bucket_bytes: float = 0.0    # HBM bytes per parameter of bucket flatten / pre-divide / copy-back when dp > 1
    misc_kernels: bool = False      # the small kernels no term names (Rates.misc_kernels_ns_per_token per block)
    overlap_param_sync: bool = False  # the all-gather (ZeRO-1 broadcast) lands during the next step's first
    #                                   micro-batch forward: only what exceeds that forward is exposed

    def check(self) -> "Options":
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute {self.recompute!r}: use one of {', '.join(RECOMPUTE)}")
        if self.expert_imbalance < 1.0:
            raise ValueError("expert_imbalance is max/mean load and cannot be below 1")
        if self.node_limit is not None and self.node_limit < 1:
            raise ValueError("node_limit must be >= 1")
        if self.ep_chunks < 1:
            raise ValueError("ep_chunks must be >= 1")
        if self.ep_dispatch not in ("alltoall", "allgather"):
            raise ValueError(f"ep_dispatch {self.ep_dispatch!r}: use alltoall or allgather")
        if self.ep_dispatch == "allgather" and self.ep_chunks > 1:
            raise ValueError("ep_dispatch allgather takes ep_chunks = 1")
        for name in ("residual_bytes", "clip_bytes", "dp_bucket_bytes", "ep_host_syncs", "host_syncs_per_microbatch",
                     "step_host_syncs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.optimizer_bytes is not None and self.optimizer_bytes < 0:
            raise ValueError("optimizer_bytes must be >= 0")
        return self

    @property
    def adamw_bytes(self) -> float:
        """HBM bytes per parameter of one AdamW update."""
        if self.optimizer_bytes is not None:
            return self.optimizer_bytes
        return self.grad_bytes + 8 + 8 + self.weight_bytes


def trainer_options(precision: str = "bf16", recompute: str = "none", *, ep: int = 1, dp: int = 1,
                    bf16_moments: bool = False, fp8_dispatch: bool = False, ep_chunks: int = 1,
                    ep_host_syncs: int = 1, expert_imbalance: float = 1.0, pp: int = 1,
                    overlap_param_sync: bool = True, reduce_to_owner: bool = True,
                    grad_as_bucket_view: bool = True, ep_dispatch: str = "alltoall",
                    weight_cast: str = "per_use") -> Options:
    """Options for a step of ``dsv3 train`` (dsv3.train.trainer) on CUDA: ``precision`` 'bf16' (autocast) or
    'fp8', ``recompute`` as train.recompute ('selective' replays the attention sub-block), the layout's ``ep``
    and ``dp``, train.bf16_moments, parallel.fp8_dispatch / ep_chunks, and the measured EP receive imbalance.

    Where each value comes from (bytes per parameter or per value; one read + one write per kernel):

    * fp32 parameters under autocast: every Linear / grouped weight is cast to BF16 in each micro-batch's
      forward (read 4 + write 2) and its BF16 gradient cast back (read 2 + write 4); micro-batches after the
      first add into the fp32 ``.grad`` (read 4 + 4, write 4). The embedding lookup is not autocast, so the
      residual stream is fp32: ``residual_bytes = 4``. ``weight_cast = "per_step"`` (train.weight_cast, as
      resolved: the trainer's 'auto' on CUDA; ``dsv3.train.compute_weights``): the same weights are cast once per
      optimizer step (read 4 + write 2, spread over the micro-batches), and each BF16 weight gradient goes
      straight into the fp32 ``.grad``: the first micro-batch's converted (read 2 + write 4), the later ones'
      added (read 4 + 2, write 4). The weights it does not copy (norms, router, embedding) accumulate as above.
    * the router runs fp32 (``MoE.gate``: ``F.linear(x.float(), weight.float())`` with autocast off; torch
      leaves TF32 off), top-k routing and the dispatch argsort are torch kernels, and the K copies of each
      token are gathered into expert order and un-permuted with index kernels (``experts_forward_sorted``).
    * optimizer: torch's fused AdamW over fp32 parameters, gradients and moments reads p, g, m, v and writes
      p, m, v: 28 bytes. ``bf16_moments`` runs ``AdamWLowPrecisionMoments``, on CUDA one Triton pass per tensor
      (``dsv3.kernels.adamw``): p read and written (8), g read (4), the bf16 m and v read and written (8): 20
      bytes. (Its eager loop, the CPU path, moved 124.)
    * clipping: one process calls torch's foreach ``clip_grad_norm_`` (norms read 4, scale read+write 8: 12);
      with dp or ep > 1 ``dsv3.parallel.data_parallel.clip_grad_norm_`` runs per parameter pow(2) (8), sum
      (4) and mul_ (8): 20.
    * dp > 1: ``GradReducer`` flattens each bucket (cat: 8), pre-divides it (mul_: 8) and copies the result
      back into ``.grad`` (8): 24 bytes for every local parameter (expert buckets too, even with no peer).
      With ``parallel.grad_as_bucket_view`` (the default) the gradients live in the buckets: the first
      micro-batch's gradient is copied into its slice (8), and with pp = 1 the trainer's loss weights carry the
      1/dp, so nothing else (a pipeline still pre-divides: 16);
      the gradients are all-reduced in fp32, and ZeRO-1 (ZeroRedundancyOptimizer) broadcasts the updated fp32
      parameters from their owners (``weight_bytes = 4``). With ``parallel.overlap_param_sync`` (the default,
      pp = 1 only) the broadcasts are waited for layer by layer in the next step's forward, so only the part
      longer than the first micro-batch's forward is exposed.
    * ``parallel.reduce_to_owner`` (the default, pp = 1 only): each gradient bucket is reduced to the rank that
      steps it, a reduce-scatter's volume; otherwise (a pipeline) the buckets are all-reduced, twice that.
    * host syncs: one per micro-batch (its target-token count is read with ``int()``), four per step (the
      global target count, the loss, the gradient norm, the closing ``torch.cuda.synchronize``), and with EP
      ``ep_host_syncs`` per MoE layer and micro-batch (the split sizes read back: 1 in the current
      ``ep_experts_forward``; the version that measured 0.787 s on EP=2 also synced in ``repeat_interleave``: 2).
    * with EP the receiver regroups rows by local expert and back (``ep_regroup``); the dispatch goes in BF16
      (2 bytes) unless ``fp8_dispatch`` (1 byte + a 4-byte scale per 128 values); the combine in BF16.
    * ``ep_dispatch = "allgather"`` (``parallel.ep_dispatch``, resolved: ``expert_parallel.resolve_dispatch``): no
      host syncs and no regrouping; every rank sends its T rows to each peer (BF16, plus 2K fp32 routing values
      per token) and gets T partial sums back from each, and sorts and gathers ep*T*K slots.
    """
    allgather = ep_dispatch == "allgather" and ep > 1
    if weight_cast not in ("per_use", "per_step"):
        raise ValueError(f"weight_cast {weight_cast!r}: the trainer resolves it to per_use or per_step")
    if recompute not in ("none", "selective", "full"):
        raise ValueError(f"recompute {recompute!r}: the trainer takes none, selective or full")
    return Options(
        precision=precision, recompute="attention" if recompute == "selective" else recompute,
        dispatch_bytes=(1.0 + 4.0 / 128) if fp8_dispatch else 2.0, combine_bytes=2.0,
        grad_bytes=4.0, weight_bytes=4.0, expert_imbalance=expert_imbalance,
        optimizer_bytes=20.0 if bf16_moments else 28.0, residual_bytes=4.0, autocast_casts=True,
        casts_once_per_step=weight_cast == "per_step" and precision == "bf16",
        router_fp32=True, torch_routing=True, moe_permute=True, ep_regroup=ep > 1 and not allgather,
        ep_host_syncs=ep_host_syncs if ep > 1 and not allgather else 0, ep_chunks=ep_chunks if ep > 1 else 1,
        ep_dispatch="allgather" if allgather else "alltoall",
        host_syncs_per_microbatch=1, step_host_syncs=4, misc_kernels=True,
        clip_bytes=12.0 if (ep == 1 and dp == 1) else 20.0,
        dp_allreduce=not (reduce_to_owner and pp == 1),
        dp_bucket_bytes=0.0 if dp == 1 else (8.0 if pp == 1 else 16.0) if grad_as_bucket_view else 24.0,
        overlap_param_sync=overlap_param_sync and pp == 1).check()


def _gemm(params: float, tokens: float, tflops: float) -> float:
    """Seconds of one forward pass of a weight matrix with ``params`` entries over ``tokens`` rows."""
    return 2.0 * params * tokens / (tflops * 1e12)


def _ep_geometry(layout: Layout, rates: Rates) -> tuple[int, int]:
    """(nodes the EP group spans, GPUs of the EP group inside one node)."""
    per_node = min(layout.ep, rates.gpus_per_node)
    return max(1, math.ceil(layout.ep / rates.gpus_per_node)), per_node


def ep_seconds(cfg: ModelConfig, layout: Layout, rates: Rates, opts: Options, tokens: float) -> tuple[float, float]:
    """(dispatch, combine) seconds of one MoE layer's all-to-all for ``tokens`` tokens of one GPU."""
    if layout.ep <= 1 or not cfg.n_routed_experts:
        return 0.0, 0.0
    nodes, per_node = _ep_geometry(layout, rates)
    if opts.ep_dispatch == "allgather":
        # T rows to each of the ep - 1 peers (their routing packed beside them in the same collective, rows
        # padded to 16 bytes), T partial sums back from each
        peers_nvl, peers_ib = per_node - 1, layout.ep - per_node
        out = []
        for per_token, calls in ((math.ceil((cfg.hidden_size * 2.0 + 8.0 * cfg.num_experts_per_tok) / 16) * 16, 1),
                                 (cfg.hidden_size * 2.0, 1)):
            value = tokens * per_token
            nvl = value * peers_nvl / (rates.nvlink_gbps * 1e9) + (calls * rates.nvlink_latency_us * 1e-6
                                                                  if peers_nvl else 0.0)
            ib = value * peers_ib / (rates.ib_gbps * 1e9) + (calls * rates.ib_latency_us * 1e-6 if peers_ib else 0.0)
            out.append(max(nvl, ib))
        return out[0], out[1]
    tr = ep_comm.ep_traffic(cfg, nodes, True, opts.dispatch_bytes, opts.combine_bytes)
    reach = tr.nodes_reached if opts.node_limit is None else min(opts.node_limit, tr.experts, nodes)
    remote = reach * (nodes - 1) / nodes if nodes > 1 else 0.0   # expected copies leaving the node
    local_copies = tr.experts * (per_node - 1) / per_node        # copies forwarded to other GPUs of the node
    out = []
    for nbytes in (opts.dispatch_bytes, opts.combine_bytes):
        value = tokens * tr.hidden * nbytes
        ib = value * remote / (rates.ib_gbps * 1e9) + (rates.ib_latency_us * 1e-6 if remote else 0.0)
        nvl = value * local_copies / (rates.nvlink_gbps * 1e9) + (rates.nvlink_latency_us * 1e-6 if local_copies else 0.0)
        out.append(max(ib, nvl))
    return out[0], out[1]


_GEMM_PARTS = ("attention projections", "router", "shared experts", "routed experts", "dense FFN")


def layer_work(cfg: ModelConfig, moe: bool, layout: Layout, rates: Rates, opts: Options, tokens: float,
               seq_len: int) -> Work:
    """One decoder layer (``moe`` or dense) for ``tokens`` tokens of sequences of ``seq_len``."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    fp8 = opts.precision == "fp8"
    q8 = 1 if fp8 else 0  # the FP8 copy a quantizing kernel writes next to its BF16 output
    r = opts.residual_bytes
    dense_rate = rates.gemm_fp8_tflops if fp8 else rates.gemm_bf16_tflops
    group_rate = rates.grouped_fp8_tflops if fp8 else rates.grouped_bf16_tflops
    hbm = rates.hbm_gbps * 1e9
    T = tokens
    parts: dict[str, float] = {}
    # MLA projections (inner norms are not matmuls: take them out of the parameter count)
    inner = (cfg.q_lora_rank or 0) + cfg.kv_lora_rank
    attn_p = mla_attention_params(cfg) - inner
    up_p = (cfg.q_lora_rank * h * cfg.qk_head_dim if cfg.q_lora_rank else 0) + \
        cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    parts["attention projections"] = _gemm(attn_p, T, dense_rate)
    # attention core: causal FLOPs (QK^T and PV over half the sequence on average)
    core = 2.0 * h * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len / 2 * T
    parts["attention core"] = core / (rates.attention_fwd_tflops * 1e12)
    core_b = 2 * core / (rates.attention_bwd_tflops * 1e12)
    # Memory-bound bytes per token (one read of each input and one write of each output per fused kernel).
    # Attention sub-block: input RMSNorm (read the residual, write BF16 + FP8 copy), q_a/kv_a norms, RoPE on
    # q_pe/k_pe, o_proj input quantization (FP8 only), the residual add (read residual + branch, write).
    norm = (r + 2 + q8) * d
    add = (2 * r + 2) * d
    attn_ew = norm + (4 + q8) * inner + 8 * h * cfg.qk_rope_head_dim + 3 * q8 * h * cfg.v_head_dim + add
    # FFN
    e = expert_params(cfg)
    f_extra = b_extra = 0.0    # memory-bound seconds priced explicitly (not as 2 x forward in backward)
    routed = 0.0
    if moe:
        K, S, f = cfg.num_experts_per_tok, cfg.n_shared_experts, cfg.moe_intermediate_size
        router_rate = rates.gemm_fp32_tflops if opts.router_fp32 else rates.gemm_bf16_tflops
        parts["router"] = _gemm(cfg.n_routed_experts * d, T, router_rate)
        parts["shared experts"] = _gemm(S * e, T, dense_rate)
        routed = _gemm(K * e, T, group_rate) * opts.expert_imbalance
        parts["routed experts"] = routed
        width = (K + S) * f
        # post-attention norm, residual add, SwiGLU (read gate/up, write the product + FP8 copy), weighted
        # combine of K expert outputs, routing scores (fp32 over the experts); the fp32 router's input copy
        ew = (attn_ew + norm + add + (6 + q8) * width + 2 * d * (K + 1) + 16 * cfg.n_routed_experts
              + (6 * d if opts.router_fp32 else 0))
        if opts.torch_routing:  # torch.topk / sort kernels: latency-bound, priced per token (measured)
            parts["routing"] = T * rates.routing_ns_per_token * 1e-9
        if opts.moe_permute and opts.ep_dispatch == "allgather" and layout.ep > 1:
            # ep*T*K slots whatever the routing, but the slot kernels (dsv3.kernels.local_slots) move only the
            # local copies' rows, ~T*K on average: forward the slot gather (read + write, 4Kd per copy) and the
            # combine's gather-reduce (2Kd); backward the dy scatter, the dw read of y and the gather-sum of both
            # input gradients (10Kd). The SwiGLU's elementwise passes still run over the (ep - 1) x T x K slots
            # no GEMM wrote (6f bytes forward: gate and up read, h written; 12f backward), beyond the real
            # copies that ``ew`` prices
            other = (layout.ep - 1) * K * f * T
            f_extra += 6 * K * d * T / hbm + 6 * other / hbm
            b_extra += 10 * K * d * T / hbm + 12 * other / hbm
        elif opts.moe_permute:
            # forward: gather the K copies into expert order (read + write 2 bytes x K x d) and the index_copy_
            # back to token order (the same): 8Kd. Backward: the un-permute's gradient gathered (4Kd), the
            # copies' gradient gathered back by the inverse permutation (4Kd) and summed over K (read 2Kd).
            # Check (benchmarks/results/raw/profile-small.txt): these index kernels take ~1.27 ms per MoE
            # layer per 16,384 tokens on an H100; 18Kd bytes/token at 3 TB/s = 1.2 ms.
            f_extra += 8 * K * d * T / hbm
            b_extra += 10 * K * d * T / hbm
        if opts.ep_regroup and layout.ep > 1:
            # EP receiver: rows regrouped by local expert and back (two gathers, 8Kd) and in backward the two
            # inverse gathers (8Kd), for the rows this rank's experts receive (x the imbalance)
            f_extra += 8 * K * d * T * opts.expert_imbalance / hbm
            b_extra += 8 * K * d * T * opts.expert_imbalance / hbm
        if f_extra or b_extra:
            parts["MoE permutation"] = f_extra
        if opts.ep_host_syncs and layout.ep > 1:
            # GPU idle while the host reads the split sizes back, plus the counts all-to-all (one latency)
            parts["EP host syncs"] = opts.ep_host_syncs * rates.host_sync_us * 1e-6 + rates.nvlink_latency_us * 1e-6
    else:
        width = cfg.intermediate_size
        parts["dense FFN"] = _gemm(3 * d * width, T, dense_rate)
        ew = attn_ew + norm + add + (6 + q8) * width
    parts["memory-bound"] = ew * T / hbm
    b_parts = {"MoE permutation": b_extra} if b_extra else {}
    if opts.misc_kernels and rates.misc_kernels_ns_per_token:
        # the profile's kernels below its top 40, per token per block: a third forward, two thirds backward
        # (the memory-bound work's split)
        misc = T * rates.misc_kernels_ns_per_token * 1e-9
        parts["other kernels"] = misc / 3
        b_parts["other kernels"] = 2 * misc / 3
    gemm_f = sum(v for k, v in parts.items() if k in _GEMM_PARTS)
    fwd = sum(parts.values())
    if opts.recompute == "full":
        recomp = fwd
    elif opts.recompute == "selective":
        # norms and the MLA up-projections again; SwiGLU recomputed from its cached FP8 inputs
        recomp = _gemm(up_p, T, dense_rate) + (2 * 5 * d + 5 * inner + 7 * width) * T / hbm
    elif opts.recompute == "attention":
        # the trainer's "selective": the attention sub-block (norms, projections, RoPE, core) replayed
        recomp = parts["attention projections"] + parts["attention core"] + attn_ew * T / hbm
    else:
        recomp = 0.0
    w = Work(f=fwd, b=gemm_f + core_b + 2 * parts["memory-bound"] + sum(b_parts.values()) + recomp, w=gemm_f,
             parts=parts, b_parts=b_parts)
    if moe:
        disp, comb = ep_seconds(cfg, layout, rates, opts, T)
        w.kf = w.kb = disp + comb
        if opts.ep_chunks > 1 and w.kf > 0:
            # C token chunks: chunk i+1's dispatch and chunk i-1's combine move while chunk i's experts run.
            # Exposed: the first dispatch and the last combine (1/C of the transfers) plus whatever of the rest
            # the experts of that direction (forward: routed; backward: dgrad + wgrad = 2 x routed) cannot hide.
            C = opts.ep_chunks
            k = disp + comb
            w.kf = k / C + max(0.0, k * (C - 1) / C - routed)
            w.kb = k / C + max(0.0, k * (C - 1) / C - 2 * routed)
    return w


def head_work(cfg: ModelConfig, layout: Layout, rates: Rates, opts: Options, tokens: float, seq_len: int) -> Work:
    """The last chunk's extras: final norm, head and loss, and each MTP depth (norms, eh_proj, a MoE block,
    the shared head and its loss). The head stays BF16 (V3 recipe)."""
    d, V, T = cfg.hidden_size, cfg.vocab_size, tokens
    hbm = rates.hbm_gbps * 1e9
    dense_rate = rates.gemm_fp8_tflops if opts.precision == "fp8" else rates.gemm_bf16_tflops

    def one_head() -> Work:
        g = _gemm(V * d, T, rates.gemm_bf16_tflops)
        loss = 3 * 4 * V * T / hbm  # fp32 logits written, read for the softmax, and once more for the gradient
        return Work(f=g + loss + 5 * d * T / hbm, b=g + 2 * loss, w=g, parts={"head + loss": g + loss})

    out = one_head()
    for _ in range(cfg.num_nextn_predict_layers):
        eh = _gemm(2 * d * d, T, dense_rate)
        out.add(Work(f=eh + 4 * 5 * d * T / hbm, b=eh + 8 * 5 * d * T / hbm, w=eh, parts={"MTP": eh}))
        blk = layer_work(cfg, cfg.num_moe_layers > 0, layout, rates, opts, T, seq_len)
        blk.parts = {"MTP": blk.f}
        out.add(blk)
        h2 = one_head()
        h2.parts = {"MTP": h2.f}
        out.add(h2)
    return out


def chunk_work(cfg: ModelConfig, layers: range, first: bool, last: bool, layout: Layout, rates: Rates,
               opts: Options, tokens: float, seq_len: int, microbatches: int = 1) -> Work:
    """Everything one pipeline chunk does for one micro-batch of ``tokens`` tokens (``microbatches`` per step:
    the fp32 gradient accumulation of ``Options.autocast_casts`` is spread over them)."""
    w = Work()
    for l in layers:
        w.add(layer_work(cfg, cfg.is_moe_layer(l), layout, rates, opts, tokens, seq_len))
    if first:
        # gather; scatter-add in backward (values of the residual stream's dtype)
        emb = 3 * cfg.hidden_size * opts.residual_bytes * tokens / (rates.hbm_gbps * 1e9)
        w.add(Work(f=emb, b=0.0, w=2 * emb, parts={"embedding": emb}))
    if last:
        w.add(head_work(cfg, layout, rates, opts, tokens, seq_len))
    if opts.autocast_casts:
        w.add(cast_work(cfg, layers, first, last, layout, rates, microbatches, opts.casts_once_per_step))
    return w


def cast_params(cfg: ModelConfig, layers: range, first: bool, last: bool, ep: int) -> float:
    """Weights one GPU holds for a chunk that autocast casts to BF16 every micro-batch: every Linear and the
    local routed experts; not the norms, the fp32 router, nor the embedding (a lookup, not autocast)."""
    d = cfg.hidden_size
    inner = (cfg.q_lora_rank or 0) + cfg.kv_lora_rank
    attn = mla_attention_params(cfg) - inner
    e_local = cfg.n_routed_experts // ep if cfg.n_routed_experts else 0
    moe = (cfg.n_shared_experts + e_local) * expert_params(cfg)
    n = 0.0
    for l in layers:
        n += attn + (moe if cfg.is_moe_layer(l) else 3 * d * cfg.intermediate_size)
    if last:
        D = cfg.num_nextn_predict_layers
        n += cfg.vocab_size * d + D * (2 * d * d + attn + moe)
    return n


def cast_work(cfg: ModelConfig, layers: range, first: bool, last: bool, layout: Layout, rates: Rates,
              microbatches: int, once_per_step: bool = False) -> Work:
    """fp32 master weights under autocast, per micro-batch of a chunk: forward casts each cast weight to BF16
    (read 4 + write 2 bytes); backward casts its BF16 gradient to fp32 (read 2 + write 4) and, for every
    micro-batch after the first, AccumulateGrad adds it into the fp32 ``.grad`` of every parameter (read 4 + 4,
    write 4), spread evenly over the step's micro-batches.

    ``once_per_step`` (train.weight_cast = "per_step"): the forward casts happen once per step (6 bytes per cast
    weight, spread over the micro-batches); a cast weight's BF16 gradient is converted into ``.grad`` in the
    first micro-batch (6) and added into it in the later ones (read 4 + 2, write 4: 10); the other parameters
    accumulate as above."""
    hbm = rates.hbm_gbps * 1e9
    cast = cast_params(cfg, layers, first, last, layout.ep)
    dense, exp = chunk_params(cfg, layers, first, last, layout.ep)
    later = (microbatches - 1) / microbatches
    if once_per_step:
        f = 6 * cast / microbatches / hbm
        w = (cast * (6 / microbatches + 10 * later) + 12 * (dense + exp - cast) * later) / hbm
        return Work(f=f, b=0.0, w=w, parts={"weight casts (once per step)": f})
    f = 6 * cast / hbm
    acc = 12 * (dense + exp) * later / hbm
    return Work(f=f, b=0.0, w=6 * cast / hbm + acc, parts={"autocast weight casts": f})


# --------------------------------------------------------------------------------------------- schedule
def _schedule_name(schedule: str) -> str:
    s = schedule.lower()
    if s not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
    return s


def num_stages(schedule: str, pp: int) -> int:
    """Model pieces (stages) of ``schedule`` on ``pp`` ranks: pp for 1F1B and (bidirectional) DualPipe, whose
    rank r holds stages r and pp-1-r (two weight copies); 2*pp for DualPipeV (rank r holds r and 2pp-1-r)."""
    return 2 * pp if _schedule_name(schedule) == "dualpipev" else pp


def rank_stages(schedule: str, pp: int, rank: int) -> list[int]:
    s = _schedule_name(schedule)
    if s == "1f1b":
        return [rank]
    n = num_stages(s, pp)
    return sorted({rank, n - 1 - rank})


@dataclass(frozen=True)
class _Plan:
    """Op lists over "virtual chunks" v: stage(v), owner(v), and the chunk before/after v on a micro-batch's
    way (None at the ends). DualPipe has two directions: v = d * pp + s, direction 1 running stage s on
    rank pp-1-s; its micro-batch ids count per direction."""

    ops: list
    stage: list
    owner: list
    prev: list
    nxt: list


def build_plan(schedule: str, pp: int, m: int) -> _Plan:
    """Per-rank op lists. 1F1B and DualPipeV come from ``dsv3.parallel.pipeline.schedules`` (the runtime's
    own lists); DualPipe on pp ranks (pp even, m even, m/2 micro-batches from each end) is the same eight
    phases: its rank r and mirror rank pp-1-r run DualPipeV's rank min(r, pp-1-r) list on pp/2 ranks, with
    the two directions swapped on the second half (how DeepSeek's dualpipe.py derives both halves)."""
    from dsv3.errors import UserError
    from dsv3.parallel.pipeline.schedules import Op, build_schedule

    s = _schedule_name(schedule)
    try:
        if s != "dualpipe":
            ops = build_schedule(s, pp, m)
            C = num_stages(s, pp)
            from dsv3.parallel.pipeline.partition import chunk_owner
            return _Plan(ops, list(range(C)), [chunk_owner(g, s, pp) for g in range(C)],
                         [g - 1 if g else None for g in range(C)], [g + 1 if g < C - 1 else None for g in range(C)])
        if pp % 2 or m % 2:
            raise ValueError(f"DualPipe needs an even pp and an even number of micro-batches (got pp={pp}, m={m})")
        half, per_dir = pp // 2, m // 2
        if per_dir < pp:
            raise ValueError(f"DualPipe on pp = {pp} needs at least {2 * pp} micro-batches per step "
                             f"({pp} from each end), got {m}")
        ops = []
        for r in range(pp):
            h = min(r, pp - 1 - r)
            second = r >= half
            out = []
            for o in build_schedule("dualpipev", half, per_dir)[h]:
                down = o.chunk < half  # DualPipeV's phase 0 chunk h
                d = (1 if down else 0) if second else (0 if down else 1)
                out.append(Op(o.kind, d * pp + o.chunk, o.mb, split=o.split, pair=o.pair))
            ops.append(out)
    except UserError as e:
        raise ValueError(str(e)) from None
    stage = [v % pp for v in range(2 * pp)]
    owner = [v if v < pp else 2 * pp - 1 - v for v in range(2 * pp)]
    prev = [None if v % pp == 0 else v - 1 for v in range(2 * pp)]
    nxt = [None if v % pp == pp - 1 else v + 1 for v in range(2 * pp)]
    return _Plan(ops, stage, owner, prev, nxt)


@dataclass
class RankTimes:
    """Where one pipeline rank's step went (seconds)."""

    f: float = 0.0           # lone forward chunks (with their exposed EP comm)
    b: float = 0.0           # lone backward chunks (input part, or full B in 1F1B)
    w: float = 0.0           # lone weight-gradient chunks
    pairs: float = 0.0       # overlapped F&B pairs
    exposed_comm: float = 0.0
    hidden_comm: float = 0.0
    sm_overhead: float = 0.0  # compute slowed by the SMs the all-to-all takes during pairs
    end: float = 0.0         # pipeline end on this rank
    grad_ready: dict = field(default_factory=dict)  # chunk -> time its last backward op ended

    @property
    def busy(self) -> float:
        return self.f + self.b + self.w + self.pairs


def simulate_schedule(schedule: str, pp: int, m: int, works: list[Work], p2p_s: float = 0.0,
                      sm_factor: float = 1.0) -> tuple[float, list[RankTimes]]:
    """Event-driven run of the op lists of ``schedule`` with chunk costs ``works`` (one per chunk).

    Returns (pipeline makespan, per-rank times). Each rank runs its ops in order; an op starts when the rank
    is free and its inputs are there (``p2p_s`` later when they come from another rank). An F followed by a
    ``pair`` B runs as one overlapped F&B: max(sm_factor x compute, comm) when there is comm to hide.
    """
    s = _schedule_name(schedule)
    n = num_stages(s, pp)
    if len(works) != n:
        raise ValueError(f"{s} on pp = {pp} has {n} stages, got {len(works)} stage costs")
    plan = build_plan(s, pp, m)
    ops, owner = plan.ops, plan.owner

    def deps(op):
        v = op.chunk
        if op.kind == "F":
            return [] if plan.prev[v] is None else [("F", plan.prev[v], op.mb)]
        if op.kind == "B":
            return [("F", v, op.mb)] + ([] if plan.nxt[v] is None else [("B", plan.nxt[v], op.mb)])
        return [("B", v, op.mb)]

    finish: dict = {}
    clock = [0.0] * pp
    pos = [0] * pp
    ranks = [RankTimes() for _ in range(pp)]

    def ready_at(op, r):
        t = 0.0
        for dkey in deps(op):
            if dkey not in finish:
                return None
            t = max(t, finish[dkey] + (p2p_s if owner[dkey[1]] != r else 0.0))
        return t

    def lone_cost(op) -> tuple[float, float, str]:
        wk = works[plan.stage[op.chunk]]
        if op.kind == "F":
            return wk.f, wk.kf, "f"
        if op.kind == "W":
            return wk.w, 0.0, "w"
        return (wk.b if op.split else wk.b + wk.w), wk.kb, "b"

    total = sum(len(x) for x in ops)
    done = 0
    while done < total:
        progressed = False
        for r in range(pp):
            rt = ranks[r]
            while pos[r] < len(ops[r]):
                op = ops[r][pos[r]]
                nxt = ops[r][pos[r] + 1] if pos[r] + 1 < len(ops[r]) else None
                if op.kind == "F" and nxt is not None and nxt.kind == "B" and nxt.pair:
                    a, b = ready_at(op, r), ready_at(nxt, r)
                    if a is None or b is None:
                        break
                    cf, kf, _ = lone_cost(op)
                    cb, kb, _ = lone_cost(nxt)
                    comp, com = cf + cb, kf + kb
                    slowed = comp * sm_factor if com > 0 else comp
                    cost = max(slowed, com)
                    rt.pairs += cost
                    rt.sm_overhead += slowed - comp
                    rt.exposed_comm += max(0.0, com - slowed)
                    rt.hidden_comm += min(com, slowed)
                    t0 = max(clock[r], a, b)
                    for o in (op, nxt):
                        finish[(o.kind, o.chunk, o.mb)] = t0 + cost
                    if not nxt.split:
                        rt.grad_ready[plan.stage[nxt.chunk]] = t0 + cost
                    clock[r] = t0 + cost
                    pos[r] += 2
                    done += 2
                    progressed = True
                    continue
                a = ready_at(op, r)
                if a is None:
                    break
                comp, com, kind = lone_cost(op)
                cost = comp + com
                setattr(rt, kind, getattr(rt, kind) + cost)
                rt.exposed_comm += com
                t0 = max(clock[r], a)
                finish[(op.kind, op.chunk, op.mb)] = t0 + cost
                if op.kind == "W" or (op.kind == "B" and not op.split):
                    rt.grad_ready[plan.stage[op.chunk]] = t0 + cost
                clock[r] = t0 + cost
                pos[r] += 1
                done += 1
                progressed = True
        if not progressed:
            raise AssertionError("schedule deadlocks")  # the op lists are validated by the pipeline tests
    for r, rt in enumerate(ranks):
        rt.end = clock[r]
    return max(clock), ranks


def simulated_bubble(schedule: str, pp: int, m: int, F: float, B: float, W: float, FB: float | None = None) -> float:
    """Worst rank's idle time with uniform chunk costs and no communication (to compare with Table 2): F
    forward, B full backward (input part B - W), W weight part, FB an overlapped pair (default F + B, no gain).

    A pair cheaper than F + B is expressed as the SM factor FB / (F + B) with a vanishing comm term that
    switches the pair rule on."""
    s = _schedule_name(schedule)
    C = num_stages(s, pp)
    if FB is None or FB == F + B:
        works = [Work(f=F, b=B - W, w=W) for _ in range(C)]
        factor = 1.0
    else:
        works = [Work(f=F, b=B - W, w=W, kf=1e-300) for _ in range(C)]
        factor = FB / (F + B)
    span, ranks = simulate_schedule(s, pp, m, works, 0.0, factor)
    return max(span - r.busy for r in ranks)


# ------------------------------------------------------------------------------------------ partition
def partition_stages(layer_cost: list[float], first_extra: float, last_extra: float, schedule: str,
                     pp: int) -> list[range]:
    """Contiguous split of the decoder layers into the schedule's stages (each at least one layer) that keeps
    the busiest *rank* light, from per-layer seconds and the first/last stage extras (embedding; head, loss,
    MTP). DualPipe and DualPipeV ranks hold stage p and stage n-1-p, so the split is built from the outside
    in: a bisection on the rank load limit, each rank (pair) taking as many layers from both ends as fit
    under it, shared between its two stages as evenly as their costs allow; the innermost rank takes the rest."""
    s = _schedule_name(schedule)
    n = num_stages(s, pp)
    L = len(layer_cost)
    if L < n:
        raise ValueError(f"cannot split {L} decoder layers into {n} pipeline stages of at least one layer: "
                         f"lower pp or use 1f1b")
    pre = [0.0]
    for c in layer_cost:
        pre.append(pre[-1] + c)
    extra = [0.0] * n
    extra[0] += first_extra
    extra[-1] += last_extra
    groups = [(g,) for g in range(n)] if s == "1f1b" else [(q, n - 1 - q) for q in range(n // 2)]

    def greedy(limit):
        """(bounds per stage, max load) taking layers group by group under ``limit``."""
        lo, hi = 0, L
        spans: dict[int, tuple[int, int]] = {}
        worst = 0.0
        for i, grp in enumerate(groups):
            need_after = sum(len(x) for x in groups[i + 1:])  # one layer per later stage
            last = i == len(groups) - 1
            if len(grp) == 1:
                g = grp[0]
                j = hi if last else lo + 1
                while not last and j + 1 <= hi - need_after and pre[j + 1] - pre[lo] + extra[g] <= limit:
                    j += 1
                spans[g] = (lo, j)
                worst = max(worst, pre[j] - pre[lo] + extra[g])
                lo = j
                continue
            a, b = grp
            avail = hi - lo - need_after
            best = None
            for k in (range(avail, 1, -1) if not last else [avail]):
                cand = None
                for x in range(1, k):
                    ca = pre[lo + x] - pre[lo] + extra[a]
                    cb = pre[hi] - pre[hi - (k - x)] + extra[b]
                    if cand is None or abs(ca - cb) < cand[0]:
                        cand = (abs(ca - cb), x, ca + cb)
                if cand is not None and (last or cand[2] <= limit):
                    best = (k, cand[1], cand[2])
                    break
            if best is None:
                k, x = 2, 1
                load = pre[lo + 1] - pre[lo] + extra[a] + pre[hi] - pre[hi - 1] + extra[b]
            else:
                k, x, load = best
            spans[a] = (lo, lo + x)
            spans[b] = (hi - (k - x), hi)
            worst = max(worst, load)
            lo, hi = lo + x, hi - (k - x)
        return spans, worst

    top = pre[-1] + first_extra + last_extra
    lo_t, hi_t = 0.0, top
    best_spans, best_worst = greedy(top)
    for _ in range(40):
        mid = (lo_t + hi_t) / 2
        spans, worst = greedy(mid)
        if worst <= mid * (1 + 1e-12):
            hi_t = mid
            if worst <= best_worst:
                best_spans, best_worst = spans, worst
        else:
            lo_t = mid
    return [range(*best_spans[g]) for g in range(n)]


# ------------------------------------------------------------------------------------------- the step
def _dp_seconds(nparams: float, group: int, nbytes: float, bw_gbps: float, lat_us: float) -> float:
    """Ring reduce-scatter (or all-gather) time of ``nparams`` parameters of ``nbytes`` over ``group`` GPUs."""
    if group <= 1 or nparams <= 0:
        return 0.0
    return (group - 1) / group * nparams * nbytes / (bw_gbps * 1e9) + (group - 1) * lat_us * 1e-6


def chunk_params(cfg: ModelConfig, layers: range, first: bool, last: bool, ep: int) -> tuple[float, float]:
    """(non-expert, local expert) parameters one GPU holds for a chunk."""
    d = cfg.hidden_size
    dense = exp = 0.0
    e_local = cfg.n_routed_experts // ep if cfg.n_routed_experts else 0
    moe_extra = cfg.n_shared_experts * expert_params(cfg) + router_params(cfg)
    for l in layers:
        dense += mla_attention_params(cfg) + 2 * d
        if cfg.is_moe_layer(l):
            dense += moe_extra
            exp += e_local * expert_params(cfg)
        else:
            dense += 3 * d * cfg.intermediate_size
    if first:
        dense += cfg.vocab_size * d
    if last:
        dense += d + cfg.vocab_size * d
        D = cfg.num_nextn_predict_layers
        dense += D * (4 * d + 2 * d * d + mla_attention_params(cfg) + 2 * d + moe_extra)
        exp += D * e_local * expert_params(cfg)
    return dense, exp


def predict_step(model_cfg: ModelConfig, layout: Layout | str, rates: Rates, micro_batch: int = 1,
                 seq_len: int = 4096, microbatches: int = 120, schedule: str = "dualpipev",
                 options: Options | None = None) -> dict:
    """Simulate one optimizer step; returns a flat dict of seconds, fractions and rates (see keys below).

    ``microbatches`` per pipeline (DP replica) per step, each of ``micro_batch`` sequences of ``seq_len``.
    Keys: step_s, pipeline_s, bubble_s, bubble_fraction, exposed_comm_s (EP + DP exposed on the critical
    rank), exposed_ep_comm_s, exposed_dp_s, hidden_comm_s, optimizer_s, clip_s, dp_bucket_s, host_sync_s
    (the step's syncs outside the MoE layers), tokens_per_step,
    tokens_per_s_per_gpu, mfu_causal, mfu_noncausal (of rates.peak_bf16_tflops), mfu_causal_measured_peak
    (of the dense GEMM rate of the precision), phase times of the critical rank (f_s, b_s, w_s, pairs_s), and
    per-chunk costs (chunks).
    """
    cfg = model_cfg
    if isinstance(layout, str):
        layout = parse_layout(layout)
    layout.check(cfg)
    if layout.pp == 1:   # one stage has no pipeline to schedule (DualPipe's two chunks need pp >= 2)
        schedule = "1f1b"
    opts = (options or Options()).check()
    rates.check()
    if micro_batch < 1 or seq_len < 1 or microbatches < 1:
        raise ValueError("micro_batch, seq_len and microbatches must be >= 1")
    s = _schedule_name(schedule)
    T = micro_batch * seq_len
    n = num_stages(s, layout.pp)
    one = [layer_work(cfg, cfg.is_moe_layer(l), layout, rates, opts, T, seq_len) for l in range(cfg.num_hidden_layers)]
    head = head_work(cfg, layout, rates, opts, T, seq_len)
    stages = partition_stages([x.f + x.b + x.w for x in one], 0.0, head.f + head.b + head.w, s, layout.pp)
    works = [chunk_work(cfg, stages[g], g == 0, g == n - 1, layout, rates, opts, T, seq_len, microbatches)
             for g in range(n)]

    # pipeline P2P of one micro-batch's activation (BF16); neighbours are dp ranks apart in the rank order
    act = T * cfg.hidden_size * 2
    if layout.pp == 1:
        p2p = 0.0
    elif layout.gpus > rates.gpus_per_node:  # stages are dp ranks apart: count every hop as crossing nodes
        p2p = act / (rates.ib_gbps * 1e9) + rates.ib_latency_us * 1e-6
    else:
        p2p = act / (rates.nvlink_gbps * 1e9) + rates.nvlink_latency_us * 1e-6
    sm_factor = rates.sms / (rates.sms - rates.comm_sms)
    span, ranks = simulate_schedule(s, layout.pp, microbatches, works, p2p, sm_factor)

    # ZeRO-1 data parallelism per rank: reduce-scatter after the rank's last backward of each chunk, then
    # the optimizer on the local shard, then the all-gather of the updated weights.
    # Inside a node the gradient reduction runs at the all-reduce bus bandwidth when one is given.
    nvl_dp = rates.nvlink_allreduce_gbps or rates.nvlink_gbps
    dp_group_on_ib = layout.dp > rates.gpus_per_node
    dp_bw = rates.ib_gbps if dp_group_on_ib else nvl_dp
    dp_lat = rates.ib_latency_us if dp_group_on_ib else rates.nvlink_latency_us
    exp_group = layout.dp // layout.ep
    exp_on_ib = layout.ep * exp_group > rates.gpus_per_node and exp_group > 1
    exp_bw = rates.ib_gbps if exp_on_ib else nvl_dp
    exp_lat = rates.ib_latency_us if exp_on_ib else rates.nvlink_latency_us
    # an all-reduce moves a reduce-scatter's volume and then an all-gather's: twice the ring time
    red = 2.0 if opts.dp_allreduce else 1.0
    hbm = rates.hbm_gbps * 1e9
    # GPU idle at the host syncs of the step: per micro-batch and per step
    sync_s = (opts.host_syncs_per_microbatch * microbatches + opts.step_host_syncs) * rates.host_sync_us * 1e-6
    results = []
    for r, rt in enumerate(ranks):
        link_free = 0.0
        ag = opt_s = clip_s = bucket_s = 0.0
        for g in sorted(rank_stages(s, layout.pp, r), key=lambda c: rt.grad_ready.get(c, rt.end)):
            dense, exp = chunk_params(cfg, stages[g], g == 0, g == n - 1, layout.ep)
            rs = red * (_dp_seconds(dense, layout.dp, opts.grad_bytes, dp_bw, dp_lat) +
                        _dp_seconds(exp, exp_group, opts.grad_bytes, exp_bw, exp_lat))
            ag += _dp_seconds(dense, layout.dp, opts.weight_bytes, dp_bw, dp_lat) + \
                _dp_seconds(exp, exp_group, opts.weight_bytes, exp_bw, exp_lat)
            start = rt.grad_ready.get(g, rt.end) if opts.overlap_dp else rt.end
            link_free = max(link_free, start) + rs
            shard = dense / layout.dp + exp / exp_group
            # AdamW on the local shard: Options.adamw_bytes per parameter at the optimizer's achieved rate
            # (V3: read grad fp32, read+write master fp32 and two BF16 moments, write BF16 weights)
            opt_s += shard * opts.adamw_bytes / (rates.optimizer_gbps * 1e9)
            # clipping reads (and scales) every local gradient; the DP buckets copy them when dp > 1
            clip_s += (dense + exp) * opts.clip_bytes / hbm
            if layout.dp > 1:
                bucket_s += (dense + exp) * opts.dp_bucket_bytes / hbm
        rs_exposed = max(0.0, link_free - rt.end)
        if opts.overlap_param_sync:   # hidden behind the next step's first micro-batch forward
            ag = max(0.0, ag - rt.f / microbatches)
        results.append((rt.end + rs_exposed + opt_s + ag + clip_s + bucket_s + sync_s, rs_exposed, opt_s, ag,
                        clip_s, bucket_s))
    crit = max(range(layout.pp), key=lambda r: results[r][0])
    step, rs_exposed, opt_s, ag, clip_s, bucket_s = results[crit]
    rt = ranks[crit]
    bubble = span - rt.busy
    worst_bubble = max(span - x.busy for x in ranks)

    tokens = layout.dp * microbatches * T
    tps = tokens / step / layout.gpus
    fc = training_flops_per_token(cfg, seq_len, True).total
    fn = training_flops_per_token(cfg, seq_len, False).total
    meas_peak = rates.gemm_fp8_tflops if opts.precision == "fp8" else rates.gemm_bf16_tflops
    return {
        "schedule": s, "pp": layout.pp, "ep": layout.ep, "dp": layout.dp, "gpus": layout.gpus,
        "micro_batch": micro_batch, "seq_len": seq_len, "microbatches": microbatches,
        "tokens_per_step": tokens, "step_s": step, "pipeline_s": span, "critical_rank": crit,
        "f_s": rt.f, "b_s": rt.b, "w_s": rt.w, "pairs_s": rt.pairs, "bubble_s": bubble,
        "worst_rank_bubble_s": worst_bubble, "bubble_fraction": worst_bubble / span if span else 0.0,
        "exposed_ep_comm_s": rt.exposed_comm, "hidden_ep_comm_s": rt.hidden_comm, "sm_share_overhead_s": rt.sm_overhead,
        "p2p_s": p2p, "exposed_dp_s": rs_exposed + ag, "dp_reduce_scatter_exposed_s": rs_exposed,
        "dp_all_gather_s": ag, "optimizer_s": opt_s, "clip_s": clip_s, "dp_bucket_s": bucket_s,
        "host_sync_s": sync_s, "exposed_comm_s": rt.exposed_comm + rs_exposed + ag,
        "tokens_per_s_per_gpu": tps, "flops_per_token_causal": fc, "flops_per_token_noncausal": fn,
        "tflops_causal": tps * fc / 1e12, "mfu_causal": tps * fc / (rates.peak_bf16_tflops * 1e12),
        "mfu_noncausal": tps * fn / (rates.peak_bf16_tflops * 1e12),
        "mfu_causal_measured_peak": tps * fc / (meas_peak * 1e12), "measured_peak_tflops": meas_peak,
        "peak_tflops": rates.peak_bf16_tflops, "rates": rates.name,
        "chunks": [{"layers": f"{stages[g].start}-{stages[g].stop - 1}",
                    "ranks": [r for r in range(layout.pp) if g in rank_stages(s, layout.pp, r)],
                    "F_ms": works[g].f * 1e3, "B_ms": works[g].b * 1e3, "W_ms": works[g].w * 1e3,
                    "F_parts_ms": {k: v * 1e3 for k, v in works[g].parts.items()},
                    "EP_comm_F_ms": works[g].kf * 1e3, "EP_comm_B_ms": works[g].kb * 1e3} for g in range(n)],
    }


# -------------------------------------------------------------------------------------------- the CLI
def add_parser(sub) -> None:
    """`dsv3 plan step`: registered in dsv3.plan.cli.SUBVERBS."""
    from dsv3.plan.cli import MODEL_HELP, POS_FLOAT, POS_INT, _common, _wrap
    from dsv3.plan.rates import DEVICES

    p = sub.add_parser("step", help="simulate one training step: step time, bubble, exposed comm, tokens/s, MFU",
                       description="Event-driven simulation of one optimizer step from per-kernel rates and link "
                                   "bandwidths: F/B/W chunks per stage, EP all-to-all per MoE layer, pipeline P2P, "
                                   "ZeRO-1 gradient reduction and the optimizer, over the 1F1B / DualPipe / "
                                   "DualPipeV schedule. Defaults: DeepSeek-V3's run on 2,048 H800s (Insights "
                                   "paper, Table 4).")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--layout", default="pp=16,ep=64,dp=128", help="pp=P,ep=E,dp=D: GPUs = P x D, EP inside DP "
                   "(default pp=16,ep=64,dp=128)")
    p.add_argument("--schedule", choices=SCHEDULES, default="dualpipe", help="pipeline schedule (default dualpipe)")
    p.add_argument("--micro-batch", type=POS_INT, default=1, help="sequences per micro-batch (default 1)")
    p.add_argument("--seq-len", type=POS_INT, default=4096, help="tokens per sequence (default 4096)")
    p.add_argument("--global-batch", type=POS_INT, default=15360,
                   help="sequences per optimizer step over all replicas (default 15360, V3's)")
    p.add_argument("--microbatches", type=POS_INT, help="micro-batches per pipeline per step (overrides "
                   "--global-batch)")
    p.add_argument("--device", choices=DEVICES, default="h800", help="rate profile (default h800: the papers' "
                   "cluster; h100: this project's measured rates)")
    p.add_argument("--rates", metavar="FILE.json", help="JSON object of rate fields overriding the profile "
                   "(e.g. {\"grouped_fp8_tflops\": 900, \"ib_gbps\": 45})")
    p.add_argument("--ib-gbps", type=POS_FLOAT, help="IB GB/s per GPU (override)")
    p.add_argument("--nvlink-gbps", type=POS_FLOAT, help="NVLink GB/s per GPU (override)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="Linear GEMM precision (default fp8; bf16 with --trainer)")
    p.add_argument("--recompute", choices=RECOMPUTE, default=None,
                   help="default selective (V3's); with --trainer: none, selective (the trainer's: the attention "
                        "sub-block replayed) or full, default none")
    p.add_argument("--trainer", action="store_true",
                   help="price what `dsv3 train` pays on top of the kernels: fp32 master weights cast per "
                        "micro-batch, fp32 gradient accumulation, fused fp32 AdamW, clipping, fp32 router, torch "
                        "routing and permutations, EP host syncs, DP gradient all-reduce (see trainer_options)")
    p.add_argument("--bf16-moments", action="store_true", help="with --trainer: train.bf16_moments")
    p.add_argument("--weight-cast", choices=("per_step", "per_use"), default="per_step",
                   help="with --trainer: train.weight_cast as resolved (default per_step, the trainer's 'auto' "
                        "for bf16 on CUDA)")
    p.add_argument("--ep-chunks", type=POS_INT, default=1, help="with --trainer: parallel.ep_chunks (default 1)")
    p.add_argument("--ep-dispatch", choices=("auto", "alltoall", "allgather"), default="auto",
                   help="with --trainer: parallel.ep_dispatch (default auto, as the trainer: allgather at ep = 2 "
                        "< top-k, else alltoall)")
    p.add_argument("--node-limit", type=POS_INT, help="nodes a token may reach (default the model's topk_group)")
    p.add_argument("--expert-imbalance", type=POS_FLOAT, default=1.0,
                   help="busiest EP rank's routed tokens / mean (default 1.0)")
    p.add_argument("--no-overlap-dp", action="store_true", help="reduce gradients only after the last backward")
    _common(p)
    p.set_defaults(func=_wrap(_run_step))


def _run_step(args) -> list:
    from dsv3.plan.models import is_dense, load_model
    from dsv3.plan.rates import load_rates

    cfg, label = load_model(args.model)
    if is_dense(cfg):
        raise ValueError("step simulation needs a DeepSeek-family (MLA/MoE) model, not a dense config")
    layout = parse_layout(args.layout).check(cfg)
    rates = load_rates(args.device, args.rates, ib_gbps=args.ib_gbps, nvlink_gbps=args.nvlink_gbps)
    m = args.microbatches
    if m is None:
        per = layout.dp * args.micro_batch
        if args.global_batch % per:
            raise ValueError(f"--global-batch {args.global_batch} is not a multiple of dp x micro-batch = {per}")
        m = args.global_batch // per
    if args.trainer:
        import dataclasses
        from dsv3.parallel.expert_parallel import resolve_dispatch
        precision = args.precision or "bf16"
        dispatch = resolve_dispatch(args.ep_dispatch, layout.ep, cfg.num_experts_per_tok, False, args.ep_chunks,
                                    precision == "fp8")
        opts = trainer_options(precision, args.recompute or "none", ep=layout.ep, dp=layout.dp,
                               bf16_moments=args.bf16_moments, ep_chunks=args.ep_chunks,
                               expert_imbalance=args.expert_imbalance, pp=layout.pp, ep_dispatch=dispatch,
                               weight_cast=args.weight_cast)
        opts = dataclasses.replace(opts, node_limit=args.node_limit, overlap_dp=not args.no_overlap_dp).check()
    else:
        opts = Options(precision=args.precision or "fp8", recompute=args.recompute or "selective",
                       node_limit=args.node_limit, expert_imbalance=args.expert_imbalance,
                       overlap_dp=not args.no_overlap_dp)
    r = predict_step(cfg, layout, rates, args.micro_batch, args.seq_len, m, args.schedule, opts)
    head = [("layout", f"{layout.gpus} GPUs = PP {layout.pp} x DP {layout.dp}; EP {layout.ep}"),
            ("schedule", r["schedule"]), ("micro-batches per pipeline", m),
            ("tokens per step", r["tokens_per_step"]), ("rates", rates.name),
            ("step time s", r["step_s"]), ("tokens/s/GPU", r["tokens_per_s_per_gpu"]),
            ("bubble fraction (worst rank)", r["bubble_fraction"]),
            ("exposed communication s", r["exposed_comm_s"]),
            (f"MFU causal (of {rates.peak_bf16_tflops:g} TFLOP/s)", r["mfu_causal"]),
            (f"MFU non-causal (of {rates.peak_bf16_tflops:g} TFLOP/s)", r["mfu_noncausal"]),
            (f"MFU causal (of measured {r['measured_peak_tflops']:g} TFLOP/s GEMM)", r["mfu_causal_measured_peak"])]
    crit = [("critical rank", r["critical_rank"]), ("lone forwards (1F) s", r["f_s"]),
            ("lone backwards (1B) s", r["b_s"]), ("lone weight grads (1W) s", r["w_s"]),
            ("overlapped F&B pairs s", r["pairs_s"]), ("bubble (idle) s", r["bubble_s"]),
            ("exposed EP all-to-all s", r["exposed_ep_comm_s"]), ("hidden EP all-to-all s", r["hidden_ep_comm_s"]),
            ("compute slowed by comm SMs s", r["sm_share_overhead_s"]), ("pipeline P2P per hop ms", r["p2p_s"] * 1e3),
            ("DP reduce-scatter exposed s", r["dp_reduce_scatter_exposed_s"]),
            ("DP all-gather s", r["dp_all_gather_s"]), ("optimizer s", r["optimizer_s"]),
            ("gradient clipping s", r["clip_s"]), ("DP bucket copies s", r["dp_bucket_s"]),
            ("host syncs (step, micro-batches) s", r["host_sync_s"])]
    stages = [(f"stage {i} layers {c['layers']} (ranks {c['ranks']})",
               f"F {c['F_ms']:.1f} / B {c['B_ms']:.1f} / W {c['W_ms']:.1f} ms; EP comm {c['EP_comm_F_ms']:.1f} "
               f"/ {c['EP_comm_B_ms']:.1f} ms") for i, c in enumerate(r["chunks"])]
    out = [(f"{label}: simulated training step", head), ("critical rank breakdown", crit), ("stages", stages)]
    if args.json:
        out.append(("result", [(k, v) for k, v in r.items()]))
        out.append(("rate profile", [(k, v) for k, v in rates.to_dict().items()]))
    return out
