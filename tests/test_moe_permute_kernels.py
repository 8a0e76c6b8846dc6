"""dsv3.kernels.moe_permute: the custom ops' registration (opcheck on the CPU, where they run their reference)
and, on a GPU, the Triton kernels against the eager references, permuted and padded layouts, odd widths."""
from __future__ import annotations

import pytest
import torch

from dsv3.kernels.moe_permute import (combine_backward, combine_backward_reference, combine_weight_grad, gather_sum,
                                      gather_sum_reference)
from dsv3.model.moe import sort_copies

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _case(device, T=300, K=6, D=200, E=16, padded=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, E, (T, K), generator=g)
    _, inverse, _ = sort_copies(idx, E)
    rows = (inverse * 2 + 1) if padded else inverse
    M = 2 * T * K + 5 if padded else T * K
    y = torch.randn(M, D, generator=g).to(dtype)
    gy = torch.randn(M, D, generator=g).to(dtype)
    gt = torch.randn(T, D, generator=g).to(dtype)
    w = torch.rand(T, K, generator=g)
    return tuple(t.to(device) for t in (y, gy, gt, rows, w)) + (K,)


@pytest.mark.parametrize("padded", [False, True])
def test_ops_pass_opcheck_on_cpu(padded):
    y, gy, gt, rows, w, K = _case("cpu", T=20, D=12, padded=padded)
    torch.library.opcheck(torch.ops.dsv3.gather_sum.default, (gy, rows, K))
    torch.library.opcheck(torch.ops.dsv3.gather_sum.default, (gy, rows, K, y))
    # two gradients of the same rows summed in one pass: the sum of the two gather-sums
    torch.testing.assert_close(gather_sum(gy, rows, K, y), gather_sum_reference(gy, rows, K)
                               + gather_sum_reference(y, rows, K))
    torch.library.opcheck(torch.ops.dsv3.combine_backward.default, (gt, y, rows, w))
    torch.library.opcheck(torch.ops.dsv3.combine_weight_grad.default, (gt, y, rows, w))
    # the weight-only op is the routing weights' gradient, as autograd gets it through the plain weighted sum
    wl = w.clone().requires_grad_()
    (want,) = torch.autograd.grad((y[rows].view(*w.shape, -1) * wl[..., None]).sum(dim=1), wl, gt)
    torch.testing.assert_close(combine_weight_grad(gt, y, rows, w), want)
    assert torch.equal(gather_sum(gy, rows, K), gather_sum_reference(gy, rows, K))


@cuda
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("D", [200, 1536, 7168])
def test_triton_kernels_match_references(padded, D):
    y, gy, gt, rows, w, K = _case("cuda", T=2000, D=D, padded=padded, dtype=torch.bfloat16)
    got = gather_sum(gy, rows, K)
    want = gather_sum_reference(gy, rows, K)
    # both sum the K rows in fp32 and round once; only the summation order may differ
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    assert (got == want).float().mean().item() > 0.99
    got2, want2 = gather_sum(gy, rows, K, y), gather_sum_reference(gy, rows, K, y)
    torch.testing.assert_close(got2.float(), want2.float(), rtol=1e-2, atol=1e-2)
    assert (got2 == want2).float().mean().item() > 0.99
    dy, dw = combine_backward(gt, y, rows, w)
    dy_ref, dw_ref = combine_backward_reference(gt, y, rows, w)
    assert torch.equal(dy, dy_ref)                    # one product, rounded once: exact
    torch.testing.assert_close(dw, dw_ref, rtol=1e-5, atol=1e-4)
    # without dy: the same kernel, the same sums
    assert torch.equal(combine_weight_grad(gt, y, rows, w), dw)
