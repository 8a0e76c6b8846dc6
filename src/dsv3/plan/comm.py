"""Expert-parallel traffic per token per MoE layer, and the decode speed limit it sets.

Dispatch sends each token's hidden state to its experts (FP8: 1 byte per value, scales ignored as the papers
do); combine brings the weighted expert outputs back (BF16: 2 bytes). Node-limited routing (V3: a token
reaches at most M = topk_group nodes) sends one copy per node over the scale-out network (IB) and forwards it
inside the node over NVLink to each selected expert's GPU.

Decode speed limit (Insights paper, section 2.3.2): with dual micro-batch overlap and computation assumed
hidden, one layer costs two EP steps of communication:
    t_step = (dispatch + combine bytes) x tokens_per_device x experts_per_token x hidden / bandwidth
    TPOT   = layers x 2 x t_step
32 tokens, 9 experts (8 routed + 1 shared), hidden 7,000 ("about 7K"), 50 GB/s: 120.96 us, 14.76 ms, ~67 tok/s.
"""
from __future__ import annotations

from dataclasses import dataclass

from dsv3.config import ModelConfig


@dataclass(frozen=True)
class EPTraffic:
    """Bytes one token moves in one MoE layer (dispatch + combine)."""

    dispatch_bytes_per_value: float
    combine_bytes_per_value: float
    hidden: int
    experts: int  # routed experts each token is sent to
    nodes_reached: int  # distinct nodes over the scale-out network (<= M with node-limited routing)

    @property
    def per_copy(self) -> float:
        return self.hidden * (self.dispatch_bytes_per_value + self.combine_bytes_per_value)

    @property
    def scale_out_bytes(self) -> float:
        """IB bytes: one copy per reached node (dedup happens before the network)."""
        return self.nodes_reached * self.per_copy

    @property
    def scale_up_bytes(self) -> float:
        """NVLink bytes: one copy per selected expert, forwarded inside its node."""
        return self.experts * self.per_copy


def ep_traffic(cfg: ModelConfig, nodes: int, node_limited: bool = True, dispatch_bytes: float = 1.0,
               combine_bytes: float = 2.0) -> EPTraffic:
    """Worst-case traffic per token per MoE layer; ``node_limited`` caps the nodes at ``topk_group``."""
    K = cfg.num_experts_per_tok
    reach = min(K, nodes)
    if node_limited and cfg.n_group > 1:
        reach = min(reach, cfg.topk_group)
    return EPTraffic(dispatch_bytes, combine_bytes, cfg.hidden_size, K, reach)


@dataclass(frozen=True)
class DecodeLimit:
    """The communication-bound decode speed (no latency, perfect overlap: an upper bound)."""

    ep_step_s: float
    layer_s: float
    token_s: float  # time per output token (TPOT)

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.token_s


def decode_limit(hidden: int, layers: int, bandwidth_gbps: float, tokens_per_device: int = 32,
                 experts_per_token: int = 9, dispatch_bytes: float = 1.0, combine_bytes: float = 2.0,
                 overlap_micro_batches: int = 2) -> DecodeLimit:
    """TPOT bound from EP all-to-all time; ``bandwidth_gbps`` in GB/s (1e9 bytes/s) per device."""
    if bandwidth_gbps <= 0:
        raise ValueError("bandwidth must be > 0 GB/s")
    bytes_step = (dispatch_bytes + combine_bytes) * tokens_per_device * experts_per_token * hidden
    step = bytes_step / (bandwidth_gbps * 1e9)
    # Dual micro-batch overlap hides compute under communication, so a layer costs one EP step per micro-batch.
    layer = overlap_micro_batches * step
    return DecodeLimit(step, layer, layers * layer)
