"""Pipeline stage modules: views of a full DeepseekV3 that run one chunk of layers.

A ``PipelineStage`` registers the model's own submodules under their own names (``embed_tokens``,
``layers.{l}``, ``norm``, ``lm_head``, ``mtp.{k}``), so ``stage.named_parameters()`` yields the full model's
parameter objects with the full model's names: an optimizer, a checkpoint or a grad-norm over the stage
sees ordinary names. Nothing is copied; the model code stays single-device and unaware of pipelining.

Only hidden states travel between stages. Every rank is given the same micro-batch dicts (token ids,
labels, doc_ids are small), so each stage derives positions/cos/sin and the last stage its labels and MTP
inputs locally.

Tied embedding: the MTP module embeds t_{i+k} with the main model's ``embed_tokens``. Under DualPipeV the
last chunk lives on rank 0 with the first, so the parameter is simply shared. Under 1F1B with pp > 1 the
last rank holds its own reference (``tied_names``): its gradient is summed with rank 0's after the step
(see runtime.sync_tied_grads) and it must be counted once in a global grad norm (``norm_parameters``).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from dsv3.model.model import DeepseekV3, mtp_shift, _positions
from dsv3.parallel.pipeline.partition import Partition, partition_layers

LossFn = Callable[[dict], torch.Tensor]


class PipelineLoss:
    """The step's loss as a linear function of its parts: main + mtp_lambda/D * sum_k mtp_k + alpha * balance.

    Linearity matters: each stage applies it to the parts it computed (a middle stage only has its layers'
    balance terms), and the sum over stages is the model's loss.
    """

    def __init__(self, mtp_lambda: float = 0.3, balance_alpha: float = 0.0, mtp_depth: int = 1):
        self.mtp_lambda, self.balance_alpha, self.mtp_depth = mtp_lambda, balance_alpha, mtp_depth

    @property
    def want_balance(self) -> bool:
        return self.balance_alpha > 0

    def __call__(self, parts: dict) -> torch.Tensor | None:
        total = None
        for name, value in parts.items():
            if name == "main":
                w = 1.0
            elif name.startswith("mtp_"):
                w = self.mtp_lambda / max(self.mtp_depth, 1)
            elif name == "balance":
                w = self.balance_alpha
            else:
                raise KeyError(f"unknown loss part {name!r}")
            total = value * w if total is None else total + value * w
        return total


class StageOutput:
    """What one chunk's forward leaves for its backward and for the step's report.

    ``out``: the hidden state to pass on, or (last chunk) the micro-batch's weighted loss; ``aux``: this
    chunk's weighted balance-loss term when it is not the last chunk (its gradient starts here);
    ``parts``: detached unweighted loss parts; ``counts``: {moe index: selections [E]}.
    """

    __slots__ = ("out", "aux", "parts", "counts")

    def __init__(self, out, aux, parts, counts):
        self.out, self.aux, self.parts, self.counts = out, aux, parts, counts


class PipelineStage(nn.Module):
    """Chunk ``chunk`` of ``num_chunks``: layers[layer_range] (+ embedding first, + head/MTP/loss last)."""

    def __init__(self, model: DeepseekV3, chunk: int, num_chunks: int, layer_range: range):
        super().__init__()
        self.chunk, self.num_chunks, self.layer_range = chunk, num_chunks, layer_range
        self.is_first, self.is_last = chunk == 0, chunk == num_chunks - 1
        self.config = model.config
        # Not registered: rotary has no persistent state and must not appear as a submodule of every stage.
        self._rotary = [model.rotary]
        if self.is_first:
            self.embed_tokens = model.embed_tokens
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_range})
        if self.is_last:
            self.norm, self.lm_head, self.mtp = model.norm, model.lm_head, model.mtp
            if len(model.mtp) and not self.is_first:
                self.embed_tokens = model.embed_tokens   # the MTP input embedding (shared weight)
        # MoE index (position in model.moe_layers()) of each MoE layer this chunk runs.
        moe_ids, k = {}, 0
        for layer in list(model.layers) + list(model.mtp):
            if layer.is_moe:
                moe_ids[id(layer)] = k
                k += 1
        self._moe_index = moe_ids
        self.num_moe_layers = k
        self._model_ref = [model]

    @property
    def tied_names(self) -> set[str]:
        """Parameter names this stage shares with another stage on another rank (set by build_stages)."""
        return getattr(self, "_tied", set())

    def forward(self, x: torch.Tensor | None, mb: dict, loss_fn: LossFn, weight: float = 1.0) -> StageOutput:
        """Run the chunk on micro-batch ``mb`` (``input_ids``, ``labels``, optional ``doc_ids``).

        x: the previous chunk's hidden state (None for chunk 0). The micro-batch's loss is scaled by
        ``weight`` (1/M for the mean over M micro-batches) before anything flows backward from it.
        """
        ids, labels, doc_ids = mb["input_ids"], mb.get("labels"), mb.get("doc_ids")
        B, S = ids.shape
        pos = _positions(doc_ids, B, S, ids.device) if doc_ids is not None else torch.arange(S, device=ids.device)
        cos, sin = self._rotary[0](pos)
        want_balance = bool(getattr(loss_fn, "want_balance", False)) and labels is not None
        h = self.embed_tokens(ids) if self.is_first else x
        counts: dict[int, torch.Tensor] = {}
        balances = []
        for layer in self.layers.values():
            h, c, b = layer(h, cos, sin, doc_ids, None, want_balance)
            if c is not None:
                counts[self._moe_index[id(layer)]] = c
            if b is not None:
                balances.append(b)
        parts: dict[str, torch.Tensor] = {}
        if not self.is_last:
            aux = None
            if balances:
                parts["balance"] = torch.stack(balances).sum()
                aux = loss_fn({"balance": parts["balance"]}) * weight
            return StageOutput(h, aux, {k: v.detach() for k, v in parts.items()}, counts)

        # Last chunk: final norm, fused head loss, MTP depths (mirrors DeepseekV3.forward).
        model = self._model_ref[0]
        h_final = self.norm(h)
        parts["main"] = model._head_loss(h_final, None, labels)
        h_prev = h_final if self.config.mtp_hidden_norm == "post" else h
        for k, layer in enumerate(self.mtp, start=1):
            next_ids, targets = mtp_shift(ids, labels, k, doc_ids)
            z = layer.combine(self.embed_tokens(next_ids), h_prev)
            h_k, c, b = layer(z, cos, sin, doc_ids, None, want_balance)
            counts[self._moe_index[id(layer)]] = c
            if b is not None:
                balances.append(b)
            parts[f"mtp_{k}"] = model._head_loss(layer.shared_head.norm(h_k), None, targets)
            h_prev = h_k
        if balances:
            parts["balance"] = torch.stack(balances).sum()
        loss = loss_fn(parts) * weight
        return StageOutput(loss, None, {k: v.detach() for k, v in parts.items()}, counts)


def build_stages(model: DeepseekV3, schedule: str, pp_rank: int, pp: int,
                 partition: Partition | None = None) -> list[PipelineStage]:
    """The stages rank ``pp_rank`` runs (1F1B: one; DualPipeV: two, chunk r then chunk 2*pp-1-r).

    Raises dsv3.errors.UserError for a layout that cannot be split; call it on every rank before any
    pipeline communication so that all ranks fail alike.
    """
    part = partition or partition_layers(model.config, schedule, pp)
    stages = [PipelineStage(model, g, part.num_chunks, part.layers[g]) for g in part.chunks_of(pp_rank)]
    on_rank = {g for g in part.chunks_of(pp_rank)}
    for st in stages:
        # The MTP embedding reference on the last chunk is tied to chunk 0's when chunk 0 is elsewhere.
        if st.is_last and not st.is_first and len(model.mtp) and 0 not in on_rank:
            st._tied = {"embed_tokens.weight"}
    return stages


def rank_module(stages: list[PipelineStage]) -> nn.Module:
    """One module holding everything this rank runs, under the full model's names (``layers.{l}``,
    ``embed_tokens``, ``norm``, ``lm_head``, ``mtp.{k}``): hand it to build_optimizer, a GradReducer, a
    grad-norm or a checkpoint writer in place of the full model. Parameters are the model's own objects."""
    holder = nn.Module()
    layers = nn.ModuleDict()
    for st in sorted(stages, key=lambda s: s.chunk):
        for name, child in st.named_children():
            if name == "layers":
                for key, layer in child.items():
                    layers[key] = layer
            elif not hasattr(holder, name):
                holder.add_module(name, child)
    holder.add_module("layers", layers)
    return holder


def stage_parameters(stages: list[PipelineStage]) -> list[nn.Parameter]:
    """This rank's parameters, each once (for the optimizer)."""
    seen, out = set(), []
    for st in stages:
        for p in st.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def norm_parameters(stages: list[PipelineStage]) -> list[nn.Parameter]:
    """Parameters to count in a global grad norm summed over pp ranks: tied copies counted only on the
    rank that owns the original (chunk 0's rank)."""
    tied = set()
    for st in stages:
        for name in st.tied_names:
            tied.add(id(st.get_parameter(name)))
    return [p for p in stage_parameters(stages) if id(p) not in tied]


def stage_state_dict(stages: list[PipelineStage]) -> dict[str, torch.Tensor]:
    """This rank's slice of the full model's state dict (full-model keys, tied copies included)."""
    out: dict[str, torch.Tensor] = {}
    for st in stages:
        out.update(st.state_dict())
    return out


def load_stage_state_dict(stages: list[PipelineStage], full: dict[str, torch.Tensor]) -> None:
    """Load this rank's tensors from a full-model state dict (any pp layout wrote it)."""
    for st in stages:
        own = st.state_dict()
        missing = [k for k in own if k not in full]
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} tensors of chunk {st.chunk}, e.g. {missing[0]}")
        st.load_state_dict({k: full[k] for k in own}, strict=True)


def full_state_dict(stages: list[PipelineStage], group=None) -> dict[str, torch.Tensor]:
    """The full model's state dict assembled from every pp rank's stages (a collective over ``group``).

    Layout-independent: equal to ``model.state_dict()`` of the unsplit model, as CPU tensors. Every rank's
    stage state travels tensor-wise (``gather_tensor_dicts``: metadata as objects, tensors as byte buffers
    broadcast from their owner), and every rank ends with
    the whole model in host memory; models that do not fit one host should save per-rank shards of
    ``stage_state_dict`` under the same keys instead.
    """
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return {k: v.detach().cpu() for k, v in stage_state_dict(stages).items()}
    from dsv3.parallel.data_parallel import gather_tensor_dicts
    mine = {k: v.detach() if torch.is_tensor(v) else v for k, v in stage_state_dict(stages).items()}
    full: dict[str, torch.Tensor] = {}
    for p in gather_tensor_dicts(mine, group):
        full.update(p)
    return full
