"""Triton quantizers (1x128 tiles, 128x128 blocks) vs the torch reference: bit-identical on the GPU (skipped on
CPU); the two-axis helper against the two one-axis reference calls."""

import pytest
import torch

from dsv3.fp8.blocks import quantize_activation_tiles
from dsv3.fp8.triton_quant import HAVE_TRITON, quantize_tiles, quantize_tiles_axes

gpu = pytest.mark.skipif(not (torch.cuda.is_available() and HAVE_TRITON), reason="needs CUDA and Triton")


def test_cpu_dispatch_is_the_reference():
    x = torch.randn(5, 300)
    q, s = quantize_tiles(x)
    q2, s2 = quantize_activation_tiles(x)
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)


@gpu
@pytest.mark.parametrize("shape", [(1, 1), (77, 208), (256, 7168), (300, 129), (4096, 2048)])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_matches_reference_bitwise(shape, transposed, pow2, dtype):
    torch.manual_seed(0)
    x = torch.randn(*shape, device="cuda", dtype=torch.float32) * torch.logspace(-6, 4, shape[-1], device="cuda")
    x = x.to(dtype)
    x[0, : min(128, shape[1])] = 0  # an all-zero tile
    if transposed:
        x = x.t()  # strided input, as for the token-axis tiles of x^T
    q, s = quantize_tiles(x, pow2)
    q_ref, s_ref = quantize_activation_tiles(x, pow2_scale=pow2)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@gpu
@pytest.mark.parametrize("shape", [(1, 1), (77, 208), (3, 512, 1536), (2, 1536, 512), (300, 129), (7168, 2048)])
@pytest.mark.parametrize("pow2", [False, True])
def test_triton_weight_blocks_match_reference_bitwise(shape, pow2):
    from dsv3.fp8.blocks import quantize_weight_blocks
    from dsv3.fp8.triton_quant import quantize_weight_blocks_triton

    torch.manual_seed(0)
    w = torch.randn(*shape, device="cuda") * torch.logspace(-3, 3, shape[-1], device="cuda")
    w[..., :1, :] = 0  # an all-zero row inside a block
    q, s = quantize_weight_blocks_triton(w, pow2)
    q2, s2 = quantize_weight_blocks(w, 128, pow2)
    assert torch.equal(s, s2)
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8))


def test_both_axes_are_the_two_one_axis_quantizations():
    x = torch.randn(300, 130)
    q, s, qt, st = quantize_tiles_axes(x, True, True)
    for got, ref in zip((q, s, qt, st), (*quantize_activation_tiles(x), *quantize_activation_tiles(x.t()))):
        assert got.shape == ref.shape and torch.equal(got.view(torch.uint8), ref.view(torch.uint8))
    assert quantize_tiles_axes(x, False, False) == (None, None, None, None)
    q1, s1, none1, none2 = quantize_tiles_axes(x, True, False)
    assert none1 is None and none2 is None and torch.equal(s1, s)
    none1, none2, qt1, st1 = quantize_tiles_axes(x, False, True)
    assert none1 is None and none2 is None and torch.equal(st1, st) and qt1.shape == (130, 300)


@gpu
@pytest.mark.parametrize("shape,pow2,strided", [((300, 130), False, False), ((4096, 1536), True, False),
                                               ((257, 384), False, True)])
def test_gpu_both_axes_in_one_launch_bitwise(shape, pow2, strided, monkeypatch):
    """Both axes from one paired launch on CUDA: the torch reference's bits, any input strides (through
    quantize_tiles_axes with the switch on, and the kernel directly)."""
    from dsv3.fp8 import triton_quant
    torch.manual_seed(1)
    x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 5
    x[:3, :7] = 0
    if strided:
        x = x.t().contiguous().t()
    monkeypatch.setattr(triton_quant, "PAIRED_LAUNCH", True)
    got = quantize_tiles_axes(x, True, True, pow2)
    ref = (*quantize_activation_tiles(x, 128, pow2), *quantize_activation_tiles(x.t(), 128, pow2))
    direct = triton_quant._quantize_tiles_pair_triton(x, pow2)
    for a, b, c in zip(got, ref, direct):
        assert torch.equal(a, c) if a.element_size() != 1 else torch.equal(a.view(torch.uint8), c.view(torch.uint8))
        assert a.shape == b.shape
        assert torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a,
                           b.view(torch.uint8) if b.element_size() == 1 else b)


@gpu
def test_gpu_transpose_last2_bitwise():
    """The FP8 W^T kernel against torch's strided copy, bit for bit (odd shapes, batched)."""
    from dsv3.fp8.triton_quant import transpose_last2

    for shape in [(64, 1024, 1536), (3, 200, 130), (333, 77)]:
        q = (torch.randn(shape, device="cuda") * 40).to(torch.float8_e4m3fn)
        assert torch.equal(transpose_last2(q).view(torch.uint8), q.transpose(-2, -1).contiguous().view(torch.uint8))
