"""A dtype cast that is safe as the last op of an ``autograd.Function``'s forward under ``torch.compile``."""
from __future__ import annotations

import torch


def cast_result(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, except that ``t`` itself comes back when it has that dtype already.

    Why not plain ``.to``: on torch 2.11 (the GPU machine's), an ``autograd.Function`` whose forward ends in a
    ``.to`` that changes nothing (fp32 -> fp32) gets all-zero input gradients once Dynamo traces it, on CPU and
    CUDA alike (found 2026-12-07: every routed expert, the router and the MoE input lost their gradients in
    compiled fp32 blocks; torch 2.13 is fine). The checks: ``tests/test_autograd_function_style.py`` (no forward
    returns a cast) and ``tests/test_moe_compile.py::test_fp32_experts_compiled_keep_every_gradient``.
    """
    return t if t.dtype == dtype else t.to(dtype)
