"""Which modules train in FP8, and the in-place conversion of a model.

DeepSeek-V3 (tech report section 3.3) runs the GEMMs of the attention
projections, the dense MLP and all experts in FP8, and keeps in BF16/FP32 the
parts that are sensitive or cheap: embedding, output head, MoE router
(``mlp.gate``), norms and the attention core (softmax(QK^T)V). The recipe
below encodes that split; ``convert_to_fp8`` applies it to a module tree with
Hugging Face DeepseekV3 names.

Conversion swaps each eligible ``nn.Linear`` for an ``FP8Linear`` that holds
the *same* Parameter objects, so parameter names, values, ``state_dict`` keys
and any optimizer already built on the model are unchanged.

Stacked routed experts (``layers.N.mlp.experts`` with 3-D ``gate_proj``,
``up_proj``, ``down_proj`` parameters) are not ``nn.Linear``s and their forward
belongs to the model code. ``convert_to_fp8`` marks them by setting the
attribute ``fp8_recipe`` on the experts module; the experts' forward is
expected to call ``dsv3.fp8.grouped.fp8_grouped_mm`` when that attribute is a
recipe (and its grouped BF16 path when it is absent or None).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from dsv3.fp8.blocks import BLOCK, TILE
from dsv3.fp8.linear import FP8Linear

__all__ = ["FP8Recipe", "convert_to_fp8", "fp8_eligibility"]

# Attention projections of MLA (q_lora and no-q_lora variants) and the SwiGLU
# linears (dense MLP and shared experts), by the last part of their name.
ATTENTION_PROJ = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
# Always high precision: output head (also MTP's shared_head.head) and embedding.
# Anything else not listed above (MTP's eh_proj, say) stays high precision too.
ALWAYS_SKIP = ("lm_head", "embed_tokens", "head")


@dataclass
class FP8Recipe:
    """DeepSeek-V3's fine-grained FP8 recipe.

    tile: activation tile width along the reduction dim (1 x tile).
    block: weight block side (block x block). Must equal tile (dgrad reuses W's blocks).
    pow2_scale: round scales up to powers of two.
    attention / mlp / experts: which GEMM families run in FP8.
    backend: GEMM backend for FP8Linear ("auto", "reference", "scaled_mm").
    skip: extra name suffixes kept in high precision.
    """

    tile: int = TILE
    block: int = BLOCK
    pow2_scale: bool = False
    attention: bool = True
    mlp: bool = True
    experts: bool = True
    backend: str = "auto"
    skip: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.tile != TILE or self.block != BLOCK:
            # The GEMM kernels (cuBLAS blockwise modes) exist for 128 only.
            raise ValueError(f"only tile = block = 128 is supported, got tile={self.tile} block={self.block}")


def fp8_eligibility(name: str, module: nn.Module, recipe: FP8Recipe) -> str | None:
    """None if ``module`` (qualified ``name``) should become FP8, else the reason it stays."""
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("gate"):
        return "router (mlp.gate) stays fp32/bf16"
    if leaf in ALWAYS_SKIP or any(name.endswith(s) for s in recipe.skip):
        return "embedding/head/explicit skip stays high precision"
    if type(module) is not nn.Linear:
        return "not a plain nn.Linear"
    if leaf in ATTENTION_PROJ:
        if not recipe.attention:
            return "attention projections disabled in recipe"
    elif leaf in MLP_PROJ:
        if not recipe.mlp:
            return "mlp linears disabled in recipe"
    else:
        return "not an attention projection or MLP linear"
    # FP8 tensor cores need 16-byte aligned rows of 1-byte elements:
    # torch._scaled_mm checks K % 16 == 0 and N % 16 == 0 (mat2's two dims).
    if module.in_features % 16 or module.out_features % 16:
        return f"in/out features ({module.in_features}, {module.out_features}) not multiples of 16"
    return None


def _is_stacked_experts(module: nn.Module) -> bool:
    p = getattr(module, "gate_proj", None)
    return isinstance(p, nn.Parameter) and p.dim() == 3


def convert_to_fp8(model: nn.Module, recipe: FP8Recipe | None = None) -> dict[str, list]:
    """Swap eligible ``nn.Linear`` modules of ``model`` for ``FP8Linear``, in place.

    Returns ``{"converted": [names], "experts": [names], "skipped": [(name, reason)]}``
    (skipped lists only ``nn.Linear``s and expert stacks, not every module).
    """
    recipe = recipe or FP8Recipe()
    report: dict[str, list] = {"converted": [], "experts": [], "skipped": []}
    # Materialize the list first: we mutate the tree while walking it.
    for name, module in list(model.named_modules()):
        if not name:
            continue
        if _is_stacked_experts(module):
            dims_ok = all(getattr(module, p).shape[-1] % 16 == 0 and getattr(module, p).shape[-2] % 16 == 0
                          for p in MLP_PROJ if isinstance(getattr(module, p, None), nn.Parameter))
            if recipe.experts and dims_ok:
                module.fp8_recipe = recipe
                report["experts"].append(name)
            else:
                module.fp8_recipe = None
                report["skipped"].append((name, "experts disabled or dims not multiples of 16"))
            continue
        if not isinstance(module, nn.Linear) or isinstance(module, FP8Linear):
            continue
        reason = fp8_eligibility(name, module, recipe)
        if reason is not None:
            report["skipped"].append((name, reason))
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, FP8Linear.from_linear(module, recipe.pow2_scale, recipe.backend))
        report["converted"].append(name)
    return report
