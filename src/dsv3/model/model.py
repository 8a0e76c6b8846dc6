"""The DeepSeek-V3 decoder: embedding, first-k dense + MoE layers, final norm, head, and MTP modules.

Module names follow the Hugging Face checkpoint keys without the leading ``model.`` (``embed_tokens``,
``layers.{l}.self_attn.q_a_proj``, ...); ``mtp.{k-1}`` holds MTP depth k (HF layer num_hidden_layers+k-1).
The model is single-device and knows nothing of parallelism.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.attention import MLA
from dsv3.model.layers import MLP, RMSNorm
from dsv3.model.moe import MoE, init_moe_
from dsv3.model.recompute import checkpoint
from dsv3.model.rope import RotaryEmbedding

IGNORE_INDEX = -100
RECOMPUTE_MODES = ("none", "selective", "full")


@dataclass
class ModelOutput:
    """What a forward returns: logits of the main head, the total loss and its parts, per-layer expert counts."""

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    expert_counts: list[torch.Tensor] = field(default_factory=list)  # main MoE layers first, then MTP layers
    hidden: torch.Tensor | None = None                                # h^0 as fed to MTP (see mtp_hidden_norm)


class DecoderLayer(nn.Module):
    """Pre-norm block: h + MLA(norm(h)), then h + MLP-or-MoE(norm(h))."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = MoE(config) if self.is_moe else MLP(config.hidden_size, config.intermediate_size)
        self.recompute = "none"

    def _attention(self, h, cos, sin, doc_ids, cache):
        return h + self.self_attn(self.input_layernorm(h), cos, sin, doc_ids, cache)

    def _ffn(self, h, want_balance):
        x = self.post_attention_layernorm(h)
        if self.is_moe:
            y, aux = self.mlp(x, want_balance)
            return h + y, aux["counts"], aux["balance"]
        return h + self.mlp(x), None, None

    def _block(self, h, cos, sin, doc_ids, want_balance):
        h = self._attention(h, cos, sin, doc_ids, None)
        return self._ffn(h, want_balance)

    def forward(self, h, cos, sin, doc_ids=None, cache=None, want_balance=False):
        """-> (h, counts or None, balance loss or None).

        Training forwards add this call's expert selections to ``mlp.tokens_per_expert`` here, outside any
        recomputed region, so a replay during backward never counts twice.
        """
        training = cache is None and self.training and torch.is_grad_enabled()
        if training and self.recompute == "full":
            h, counts, balance = checkpoint(self._block, h, cos, sin, doc_ids, want_balance)
        elif training and self.recompute == "selective":  # replay attention: its expanded K/V are cheap to redo
            h, counts, balance = self._ffn(checkpoint(self._attention, h, cos, sin, doc_ids, None), want_balance)
        else:
            h, counts, balance = self._ffn(self._attention(h, cos, sin, doc_ids, cache), want_balance)
        if training and counts is not None:
            self.mlp.tokens_per_expert.add_(counts)
        return h, counts, balance


class MTPLayer(DecoderLayer):
    """MTP depth k: z = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)]), h^k = Block(z).

    Embedding and output head are the main model's (shared); ``shared_head.norm`` is this depth's own.
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        d = config.hidden_size
        self.enorm = RMSNorm(d, config.rms_norm_eps)
        self.hnorm = RMSNorm(d, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(d, config.rms_norm_eps)

    def combine(self, emb_BSD: torch.Tensor, h_prev_BSD: torch.Tensor) -> torch.Tensor:
        return self.eh_proj(torch.cat([self.enorm(emb_BSD), self.hnorm(h_prev_BSD)], dim=-1))


class DeepseekV3(nn.Module):
    """DeepSeek-V3-architecture causal LM with MTP; ``forward`` returns a ModelOutput."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPLayer(config, config.num_hidden_layers + k)
                                 for k in range(config.num_nextn_predict_layers))
        self.rotary = RotaryEmbedding(config)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ----------------------------------------------------------------- setup
    def init_weights(self, std: float | None = None) -> None:
        """N(0, initializer_range) for every matrix (V3: 0.006), ones for norms, zero balance biases."""
        std = self.config.initializer_range if std is None else std
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    m.weight.normal_(0.0, std)
                elif isinstance(m, RMSNorm):
                    m.weight.fill_(1.0)
                elif isinstance(m, MoE):
                    init_moe_(m, std)
                    if m.gate.e_score_correction_bias is not None:
                        m.gate.e_score_correction_bias.zero_()
                    m.tokens_per_expert.zero_()

    def set_recompute(self, mode: str) -> None:
        """Activation recomputation for training: 'none', 'selective' (attention) or 'full' (whole block)."""
        if mode not in RECOMPUTE_MODES:
            from dsv3.errors import UserError
            raise UserError(f"recompute = {mode!r} is invalid: allowed values are {', '.join(RECOMPUTE_MODES)}")
        for layer in list(self.layers) + list(self.mtp):
            layer.recompute = mode

    def moe_layers(self) -> list[MoE]:
        """Every MoE block, main layers first then MTP layers (the order of ModelOutput.expert_counts)."""
        return [layer.mlp for layer in list(self.layers) + list(self.mtp) if layer.is_moe]

    # --------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                doc_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache=None, mtp_lambda: float = 0.3, balance_alpha: float = 0.0,
                return_logits: bool = True) -> ModelOutput:
        """input_ids [B,S]; labels [B,S] are next-token targets aligned with positions (labels[:, i] is the
        token after input_ids[:, i]; -100 = ignore). doc_ids [B,S] enables document masking (block-diagonal
        attention, positions restart per document, MTP shifts never cross documents).

        loss = main + mtp_lambda / D * sum_k mtp_k + balance_alpha * sum over MoE layers of the sequence-wise
        balance loss (computed only when balance_alpha > 0).
        """
        B, S = input_ids.shape
        if position_ids is None:
            start = cache.length if cache is not None else 0
            position_ids = _positions(doc_ids, B, S, input_ids.device) if doc_ids is not None else \
                torch.arange(start, start + S, device=input_ids.device)
        cos, sin = self.rotary(position_ids)
        want_balance = balance_alpha > 0 and labels is not None
        h = self.embed_tokens(input_ids)
        counts, balances = [], []
        for i, layer in enumerate(self.layers):
            h, c, b = layer(h, cos, sin, doc_ids, None if cache is None else cache.layer(i), want_balance)
            if c is not None:
                counts.append(c)
            if b is not None:
                balances.append(b)
        h_final = self.norm(h)
        if cache is not None:
            cache.advance(S)
        logits = self.lm_head(h_final) if return_logits else None
        out = ModelOutput(logits=logits, expert_counts=counts,
                          hidden=h_final if self.config.mtp_hidden_norm == "post" else h)
        if labels is None:
            return out

        main = self._head_loss(h_final, logits, labels)
        losses = {"main": main}
        total = main
        D = len(self.mtp)
        if D and cache is None:
            mtp_total = 0.0
            h_prev = out.hidden
            for k, layer in enumerate(self.mtp, start=1):
                next_ids, targets = mtp_shift(input_ids, labels, k, doc_ids)
                z = layer.combine(self.embed_tokens(next_ids), h_prev)
                h_k, c, b = layer(z, cos, sin, doc_ids, None, want_balance)
                counts.append(c)
                if b is not None:
                    balances.append(b)
                losses[f"mtp_{k}"] = self._head_loss(layer.shared_head.norm(h_k), None, targets)
                mtp_total = mtp_total + losses[f"mtp_{k}"]
                h_prev = h_k
            total = total + (mtp_lambda / D) * mtp_total
        if balances:
            losses["balance"] = torch.stack(balances).sum()
            total = total + balance_alpha * losses["balance"]
        out.loss = total
        out.losses = losses
        return out

    def _head_loss(self, h_BSD: torch.Tensor, logits: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        """CE from given logits, or fused with the head projection (no [T, V] fp32 logits) when there are none."""
        if logits is not None:
            return lm_loss(logits, labels)
        from dsv3.kernels.cross_entropy import linear_cross_entropy
        return linear_cross_entropy(h_BSD.reshape(-1, h_BSD.shape[-1]), self.lm_head.weight, labels.reshape(-1))

    # ------------------------------------------------------------- counting
    def num_parameters(self, include_mtp: bool = True) -> int:
        """Every weight a checkpoint holds, counted as DeepSeek counts them: parameters plus the balance
        biases (``e_score_correction_bias`` is a tensor of the released weights). With ``include_mtp`` the MTP
        modules are counted as released, i.e. each depth with its own copy of the embedding and head
        (V3: 671,026,419,200 without MTP, 684,489,845,504 with it)."""
        def weights(module: nn.Module) -> int:
            biases = sum(m.gate.e_score_correction_bias.numel() for m in module.modules()
                         if isinstance(m, MoE) and m.gate.e_score_correction_bias is not None)
            return sum(p.numel() for p in module.parameters()) + biases

        n = weights(self) - weights(self.mtp)
        if include_mtp:
            shared = self.embed_tokens.weight.numel() + self.lm_head.weight.numel()
            n += weights(self.mtp) + len(self.mtp) * shared
        return n

    def num_activated_parameters(self, include_embedding: bool = True, include_mtp: bool = False) -> int:
        """Weights one token touches: all but the unselected routed experts (head always included; V3:
        37,552,297,472 with the input embedding, 36,625,618,432 without)."""
        c = self.config
        n = self.num_parameters(include_mtp=include_mtp)
        per_expert = 3 * c.hidden_size * c.moe_intermediate_size
        moe_layers = c.num_moe_layers + (c.num_nextn_predict_layers if include_mtp else 0)
        n -= moe_layers * (c.n_routed_experts - c.num_experts_per_tok) * per_expert
        if not include_embedding:
            n -= self.embed_tokens.weight.numel()
        return n


def lm_loss(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 over non-ignored positions."""
    return F.cross_entropy(logits_BSV.float().reshape(-1, logits_BSV.shape[-1]), labels_BS.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def mtp_shift(input_ids: torch.Tensor, labels: torch.Tensor, k: int, doc_ids: torch.Tensor | None):
    """For depth k: the input token t_{i+k} and the target t_{i+k+1} at every position i.

    t_{i+k} = labels[i+k-1] and t_{i+k+1} = labels[i+k]; positions past the end (or, with doc_ids, whose
    shifted token lies in another document) get target -100 and a harmless input token.
    """
    B, S = input_ids.shape
    next_ids = torch.zeros_like(input_ids)
    targets = torch.full_like(labels, IGNORE_INDEX)
    if k - 1 < S:
        next_ids[:, : S - k + 1] = labels[:, k - 1:].clamp_min(0)  # padding (-100) -> any id; its target is ignored
    if k < S:
        targets[:, : S - k] = labels[:, k:]
        if doc_ids is not None:
            same = doc_ids[:, k:] == doc_ids[:, : S - k]
            targets[:, : S - k] = targets[:, : S - k].masked_fill(~same, IGNORE_INDEX)
    return next_ids, targets


def _positions(doc_ids: torch.Tensor, B: int, S: int, device) -> torch.Tensor:
    """Position of each token within its document (restarts at 0 where doc_ids changes)."""
    idx = torch.arange(S, device=device).expand(B, S)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_pos = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_pos
