"""Building blocks shared by every layer: RMSNorm and the SwiGLU MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = w * x / rms(x), the reduction in fp32 (the result is cast back before the weight, as DeepSeek does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference RMSNorm (the fused kernels are tested against this)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


# Whether shared_input_linears runs one GEMM (None: on CUDA only; tests set True to check it on the CPU).
FUSE_SHARED_INPUT: bool | None = None


def shared_input_linears(x: torch.Tensor, linears: tuple[nn.Module, ...]) -> tuple[torch.Tensor, ...]:
    """``tuple(l(x) for l in linears)``, computed on CUDA as one GEMM against the concatenated weights and split.

    Same products and sums, one launch: the narrow projections that read the same input (MLA's q_a / kv_a at
    N = 512 and 288, SwiGLU's gate and up) run well below the GEMM peak on their own, and their input
    gradients come out of one GEMM instead of two GEMMs and an add. Falls back to the separate calls when a
    layer is not a bias-free ``nn.Linear`` (the FP8 recipe's layers, for one)."""
    fuse = x.is_cuda if FUSE_SHARED_INPUT is None else FUSE_SHARED_INPUT
    if not fuse or any(type(lin) is not nn.Linear or lin.bias is not None for lin in linears):
        return tuple(lin(x) for lin in linears)
    weight = torch.cat([lin.weight for lin in linears])
    return F.linear(x, weight).split([lin.out_features for lin in linears], dim=-1)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); used for dense layers and the shared experts."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = shared_input_linears(x, (self.gate_proj, self.up_proj))
        return self.down_proj(F.silu(gate) * up)
