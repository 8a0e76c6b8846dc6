"""Per-kernel and per-link rates for the step-time simulator (`dsv3 plan step`), with where each number comes from.

A ``Rates`` is what one GPU (and its links) achieves, not the data sheet: GEMM TFLOP/s at the shapes the model
runs, attention TFLOP/s (model FLOPs, causal), HBM bandwidth for the memory-bound kernels (norms, SwiGLU,
quantization, the loss, the optimizer), and per-GPU link bandwidths (NVLink inside a node, InfiniBand between
nodes) with a per-message latency.

Profiles:

* ``h100``: this project's measurements on one H100 80GB SXM (design.md section 4; torch 2.11): dense BF16
  GEMM 756 TFLOP/s, ``torch._grouped_mm`` BF16 at expert shapes ~356, FP8 blockwise GEMM (1x128 activations,
  128x128 weights) 1236, cuDNN SDPA with V3's head dims (q/k 192, v 128, causal) 532 forward and ~369 for
  forward+backward, HBM ~3.0 TB/s, NVLink all-reduce bus bandwidth ~330 GB/s between 2 H100s. Not measured,
  derived: the FP8 grouped GEMM (grouped BF16 x FP8/BF16 dense ratio = 356 x 1236/756 = 582) and the
  attention backward alone (from forward 532 and forward+backward 369: 2 / (3/369 - 1/532) = 320). The
  lent machines had no InfiniBand: IB is the H800 assumption below (the same 400 Gb/s ConnectX-7 NIC).
* ``h800``: the Insights paper's (arXiv 2505.09343) and the V3 report's (arXiv 2412.19437) assumptions for
  the H800 cluster DeepSeek-V3 trained on. The H800 is an H100 SXM with NVLink cut to 400 GB/s: the same
  132 SMs, clocks, HBM3 and tensor cores (989 dense BF16 / 1979 dense FP8 TFLOP/s), so the kernel rates are
  the Hopper rates we measured (the papers publish no per-kernel rates for the 2024 training stack). Links:
  NVLink ~160 GB/s achievable per GPU and IB 50 GB/s nominal per GPU (one 400 Gb/s CX7 NIC per GPU, V3 report
  section 3.2.1), ~40 GB/s achieved (Insights paper, section 5: the all-to-all bandwidth measured on its
  multi-plane fat tree). 20 of the 132 SMs run the all-to-all while computation overlaps it (V3 report
  3.2.2). IB latency 2.8 us (Insights paper, IB end-to-end latency), NVLink 1 us (assumed).

The trainer's own costs (``dsv3.plan.step.trainer_options``) need five more rates: the fp32 GEMM of the router,
the fused AdamW's achieved bytes/s, torch's top-k routing per token, the GPU idle time of one host
synchronisation, and the all-reduce bus bandwidth of the DP gradient reduction. The catalogue values come
from the one-GPU kernel profile of the small preset (``benchmarks/results/raw/profile-small.txt``), except
``host_sync_us`` (assumed).

``--rates FILE.json`` overrides any field by name on top of ``--device`` (the keys of ``Rates``).
``benchmarks/measure_rates.py`` writes such a file: every rate it can measure on the machine it runs on, at
the shapes of a model preset (GEMMs at the model's linear and expert shapes, attention at its head dims, the
all-to-all at its EP message size).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Rates:
    """Achieved rates of one GPU and its links; TFLOP/s are 1e12 FLOP/s, GB/s are 1e9 bytes/s."""

    name: str = "custom"
    peak_bf16_tflops: float = 989.0      # nominal dense BF16 peak: the MFU denominator the papers use
    gemm_bf16_tflops: float = 756.0      # dense GEMM (attention projections, dense FFN, shared experts, head)
    gemm_fp8_tflops: float = 1236.0      # dense FP8 GEMM, fine-grained (1x128 / 128x128) scaling
    grouped_bf16_tflops: float = 356.0   # routed experts (grouped GEMM at expert shapes)
    grouped_fp8_tflops: float = 582.0
    attention_fwd_tflops: float = 532.0  # causal attention core, model FLOPs (the causal half counted)
    attention_bwd_tflops: float = 320.0
    hbm_gbps: float = 3000.0             # memory-bound kernels and the optimizer
    nvlink_gbps: float = 160.0           # per GPU, one direction, achievable
    ib_gbps: float = 40.0                # per GPU (per NIC), one direction, achievable
    nvlink_latency_us: float = 1.0
    ib_latency_us: float = 2.8
    gpus_per_node: int = 8
    sms: int = 132
    comm_sms: int = 20                   # SMs running the EP all-to-all while compute overlaps it
    # Rates of what this project's trainer runs besides the model's GEMMs and attention (priced only when
    # ``dsv3.plan.step.Options`` asks for them, see ``trainer_options``; ``optimizer_gbps`` always):
    gemm_fp32_tflops: float = 33.0       # fp32 GEMM, no TF32 (the trainer's router: fp32 logits, Options.router_fp32)
    optimizer_gbps: float = 2250.0       # fused AdamW: bytes moved per second (bytes per parameter: Options)
    routing_ns_per_token: float = 26.0   # torch top-k routing + dispatch sort, per token per MoE layer (forward)
    host_sync_us: float = 50.0           # GPU idle per host synchronisation (queue drained, CPU relaunches)
    nvlink_allreduce_gbps: float = 0.0   # all-reduce bus bandwidth inside a node (DP); 0 = nvlink_gbps
    misc_kernels_ns_per_token: float = 0.0  # kernels no other term names, per token per decoder block (fwd + bwd)
    sources: dict = field(default_factory=dict, compare=False)

    def check(self) -> "Rates":
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("name", "sources"):
                continue
            if f.name in ("nvlink_latency_us", "ib_latency_us", "comm_sms", "routing_ns_per_token", "host_sync_us",
                          "nvlink_allreduce_gbps", "misc_kernels_ns_per_token"):
                if v < 0:
                    raise ValueError(f"rate {f.name} = {v} must be >= 0")
            elif not v > 0:
                raise ValueError(f"rate {f.name} = {v} must be > 0")
        if self.comm_sms >= self.sms:
            raise ValueError(f"comm_sms ({self.comm_sms}) must be fewer than sms ({self.sms})")
        return self

    def replace(self, **changes) -> "Rates":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown rate field(s) {', '.join(sorted(unknown))}: use "
                             f"{', '.join(f.name for f in dataclasses.fields(self) if f.name != 'sources')}")
        return dataclasses.replace(self, **changes).check()

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


_HOPPER_MEASURED = {
    "gemm_bf16_tflops": "H100, bf16 GEMM 8192^3 (design.md section 4: 753-756)",
    "gemm_fp8_tflops": "H100, torch._scaled_mm blockwise 1x128/128x128 8192^3 (design.md section 4)",
    "grouped_bf16_tflops": "H100, grouped GEMM at expert shapes (~356, the project's measurement)",
    "grouped_fp8_tflops": "derived: 356 x 1236/756 (not measured)",
    "attention_fwd_tflops": "H100, cuDNN SDPA q/k 192, v 128, causal, 4x16x4096 (design.md section 4)",
    "attention_bwd_tflops": "derived: forward 532 and forward+backward ~369 -> 2/(3/369-1/532)",
    "hbm_gbps": "H100 measured ~3.0 TB/s (3.35 nominal)",
    "comm_sms": "V3 report 3.2.2: 20 of 132 SMs for communication",
    "peak_bf16_tflops": "data sheet dense BF16 (the MFU denominator of the papers)",
    # from benchmarks/results/raw/profile-small.txt (2 steps of the small preset without MTP, bf16 weights,
    # 4 x 4096 tokens, compiled blocks, fused AdamW; H100, torch 2.11):
    "gemm_fp32_tflops": "H100 profile: the fp32 router GEMMs (sgemm / xmma f32, 16384x1536x64, forward + 2 "
                        "backward) 8.67 ms per 2 steps x 15 layers -> 33.4 TFLOP/s",
    "optimizer_gbps": "H100 profile: fused AdamW (multi_tensor kernels) 15.65 ms per step over 2.511e9 bf16 "
                      "parameters x 14 bytes (read p, g, m, v; write p, m, v) -> 2,246 GB/s",
    "routing_ns_per_token": "H100 profile: torch.topk (gatherTopK) + bitonicSort 0.425 ms per MoE layer per 16,384 "
                            "tokens (64 experts, 8 groups) -> 25.9 ns/token; the dispatch argsort is below the "
                            "profile's top 40, so this is a lower bound",
    "host_sync_us": "assumed (not measured): a .tolist() round trip ~10 us plus the CPU relaunching eager ops "
                    "before the GPU has work again; benchmarks/measure_rates.py measures it",
}

PROFILES: dict[str, Rates] = {
    "h100": Rates(
        name="h100", nvlink_gbps=330.0, ib_gbps=40.0, nvlink_allreduce_gbps=330.0, misc_kernels_ns_per_token=62.0,
        sources={**_HOPPER_MEASURED,
                 "misc_kernels_ns_per_token": "H100 profile: the kernels below its top 40 (each < 2 ms per 2 steps: "
                                              "small reductions, copies, fills; the named terms price the top 40) "
                                              "take 32.7 ms per 2 steps of 16,384 tokens x 16 blocks -> 62 ns; "
                                              "not measurable without profiling the compiled model",
                 "nvlink_gbps": "H100 x2 NVLink all-reduce bus bandwidth ~330 GB/s (measured), used for the EP "
                                "all-to-all too (its own rate was not measured)",
                 "nvlink_allreduce_gbps": "H100 x2 NVLink all-reduce bus bandwidth ~330 GB/s (measured)",
                 "ib_gbps": "not measured (no IB on the lent machines): the H800 cluster's 40 GB/s"}),
    "h800": Rates(
        name="h800", nvlink_gbps=160.0, ib_gbps=40.0,
        sources={**_HOPPER_MEASURED,
                 "nvlink_gbps": "V3 report 3.2.1: NVLink 160 GB/s achievable on H800",
                 "ib_gbps": "IB 50 GB/s nominal (400 Gb/s CX7 per GPU), ~40 GB/s achieved (Insights paper)",
                 "ib_latency_us": "Insights paper: IB end-to-end latency ~2.8 us",
                 "compute": "H800 = H100 SXM compute (989/1979 TFLOP/s, 132 SMs): Hopper rates measured here"}),
}
DEVICES = tuple(PROFILES)


def load_rates(device: str = "h800", path: str | Path | None = None, **overrides) -> Rates:
    """A named profile, then the fields of a JSON file, then keyword overrides (None values ignored)."""
    try:
        r = PROFILES[device.lower()]
    except KeyError:
        raise ValueError(f"unknown device {device!r}: use one of {', '.join(DEVICES)} (or --rates FILE.json)") from None
    changes: dict = {}
    if path is not None:
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise ValueError(f"rates file {p} does not exist") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"rates file {p} is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"rates file {p} must hold one JSON object of rate fields")
        changes.update(data)
        changes.setdefault("name", f"{r.name}+{p.name}")
    changes.update({k: v for k, v in overrides.items() if v is not None})
    return r.replace(**changes) if changes else r.check()
