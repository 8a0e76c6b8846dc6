"""Which decoder layers each pipeline chunk runs, and which rank holds each chunk.

Chunks are numbered in the order a micro-batch's forward visits them: chunk 0 embeds the tokens, chunk C-1
runs the final norm, the head, the MTP module(s) and the loss. With ``pp`` ranks:

* 1F1B: C = pp chunks, rank r holds chunk r.
* DualPipeV: C = 2*pp chunks in a V, rank r holds chunk r (the way "down") and chunk 2*pp-1-r (the way
  "up"), so rank 0 holds both the embedding and the head and rank pp-1 hands chunk pp-1's output to
  chunk pp without communication.

The split is contiguous in layer order and minimizes the most expensive chunk under a per-token matmul
cost model (dense vs MoE layers, and the head + MTP extras on the last chunk). Everything here is pure
arithmetic on the config, so every rank reaches the same answer (or the same UserError) before any
communication happens.
"""
from __future__ import annotations

from dataclasses import dataclass

from dsv3.config import ModelConfig
from dsv3.errors import UserError

SCHEDULES = ("1f1b", "dualpipev")


def num_chunks(schedule: str, pp: int) -> int:
    """Chunks of the model for ``schedule`` on ``pp`` ranks."""
    return pp if check_schedule(schedule) == "1f1b" else 2 * pp


def check_schedule(schedule: str) -> str:
    s = schedule.lower()
    if s not in SCHEDULES:
        raise UserError(f"pipeline schedule {schedule!r} is unknown: use one of {', '.join(SCHEDULES)}")
    return s


def chunk_owner(chunk: int, schedule: str, pp: int) -> int:
    """The pp rank that runs ``chunk``."""
    if check_schedule(schedule) == "1f1b":
        return chunk
    return chunk if chunk < pp else 2 * pp - 1 - chunk


def rank_chunks(rank: int, schedule: str, pp: int) -> list[int]:
    """The chunks rank ``rank`` runs, in increasing chunk order (one for 1F1B, two for DualPipeV)."""
    if check_schedule(schedule) == "1f1b":
        return [rank]
    return [rank, 2 * pp - 1 - rank]


# ------------------------------------------------------------------------------------------ cost model

def attention_cost(c: ModelConfig) -> float:
    """Matmul multiply-adds per token of one MLA block's projections (attention core left out: it depends
    on the sequence length and is the same for every layer, so it does not move the split much)."""
    d, h = c.hidden_size, c.num_attention_heads
    qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    q = d * c.q_lora_rank + c.q_lora_rank * h * qk if c.q_lora_rank else d * h * qk
    kv = d * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim)
    return float(q + kv + h * c.v_head_dim * d)


def layer_cost(c: ModelConfig, layer: int) -> float:
    """Per-token multiply-adds of decoder layer ``layer``: attention plus dense MLP or activated MoE."""
    d = c.hidden_size
    if c.is_moe_layer(layer):
        ffn = 3 * d * c.moe_intermediate_size * (c.num_experts_per_tok + c.n_shared_experts) + d * c.n_routed_experts
    else:
        ffn = 3 * d * c.intermediate_size
    return attention_cost(c) + ffn


def head_cost(c: ModelConfig) -> float:
    """Extras of the last chunk: the head, plus per MTP depth its combine projection, its (MoE) block and
    the shared head again."""
    d, v = c.hidden_size, c.vocab_size
    moe_block = layer_cost(c, max(c.num_hidden_layers, c.first_k_dense_replace))
    return float(d * v + c.num_nextn_predict_layers * (2 * d * d + moe_block + d * v))


# ------------------------------------------------------------------------------------------- the split

@dataclass(frozen=True)
class Partition:
    """``layers[g]`` = range of decoder layers run by chunk g; ``costs[g]`` its modelled per-token cost."""

    schedule: str
    pp: int
    layers: tuple[range, ...]
    costs: tuple[float, ...]

    @property
    def num_chunks(self) -> int:
        return len(self.layers)

    def owner(self, chunk: int) -> int:
        return chunk_owner(chunk, self.schedule, self.pp)

    def chunks_of(self, rank: int) -> list[int]:
        return rank_chunks(rank, self.schedule, self.pp)

    def imbalance(self) -> float:
        """max chunk cost / mean chunk cost (1.0 = perfect)."""
        return max(self.costs) / (sum(self.costs) / len(self.costs))


def partition_layers(config: ModelConfig, schedule: str, pp: int) -> Partition:
    """Split the decoder layers into contiguous chunks minimizing the costliest chunk.

    Raises UserError (naming the problem and the fix) when the layout cannot work: pp < 1, or fewer
    decoder layers than chunks (every chunk needs at least one layer).
    """
    s = check_schedule(schedule)
    if pp < 1:
        raise UserError(f"parallel.pp = {pp} is invalid: it must be >= 1")
    n_chunks = num_chunks(s, pp)
    L = config.num_hidden_layers
    if L < n_chunks:
        need = "2*pp" if s == "dualpipev" else "pp"
        raise UserError(
            f"cannot split {L} decoder layers into {n_chunks} pipeline chunks ({s} on pp = {pp} needs {need} "
            f"chunks of at least one layer each): lower parallel.pp to at most "
            f"{L // (2 if s == 'dualpipev' else 1)}, use more layers, or choose "
            f"{'1f1b' if s == 'dualpipev' else 'fewer stages'}")
    costs = [layer_cost(config, i) for i in range(L)]
    extra_last = head_cost(config)
    bounds = _min_max_split(costs, n_chunks, extra_last)
    layers = tuple(range(a, b) for a, b in zip(bounds[:-1], bounds[1:]))
    chunk_costs = tuple(sum(costs[a:b]) + (extra_last if g == n_chunks - 1 else 0.0)
                        for g, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])))
    return Partition(s, pp, layers, chunk_costs)


def _min_max_split(costs: list[float], parts: int, extra_last: float) -> list[int]:
    """Boundaries b_0=0 < ... < b_parts=L minimizing max_g cost(chunk g), each chunk non-empty.

    Dynamic programme over (chunks used, layers covered); O(parts * L^2) is nothing for L ~ 100. Ties go to
    the split whose boundaries come earliest, so every rank computes the same answer.
    """
    L = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    INF = float("inf")
    # best[k][i]: the minimal max-chunk cost covering layers [0, i) with k chunks; arg[k][i] its last boundary
    best = [[INF] * (L + 1) for _ in range(parts + 1)]
    arg = [[0] * (L + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, L + 1):
            extra = extra_last if (k == parts and i == L) else 0.0
            for j in range(k - 1, i):
                v = max(best[k - 1][j], prefix[i] - prefix[j] + extra)
                if v < best[k][i] - 1e-9 * max(1.0, abs(v)):
                    best[k][i], arg[k][i] = v, j
    bounds = [L]
    for k in range(parts, 0, -1):
        bounds.append(arg[k][bounds[-1]])
    return bounds[::-1]
