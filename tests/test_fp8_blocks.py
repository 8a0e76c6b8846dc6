"""Block quantization: formulas, the E4M3 round-trip bound, ragged edges, degenerate blocks."""

import math

import pytest
import torch

from dsv3.fp8.blocks import (
    E4M3_REL_HALF_ULP,
    E4M3_SUBNORMAL_HALF_SPACING,
    FP8_DTYPE,
    FP8_MAX,
    dequantize_activation_tiles,
    dequantize_weight_blocks,
    is_power_of_two,
    quantize_activation_tiles,
    quantize_weight_blocks,
)

SHAPES = [(128, 128), (256, 384), (130, 200), (1, 7), (300, 129), (127, 257)]


def _weight_scale_per_element(s, m, n, b=128):
    out = torch.empty(m, n)
    for i in range(m):
        for j in range(n):
            out[i, j] = s[i // b, j // b]
    return out


def _bound(x, s_elem):
    """Per-element bound from blocks.py: max(2^-4 |x|, 2^-10 s), plus fp32 slack of the division."""
    return torch.maximum(E4M3_REL_HALF_ULP * x.abs(), E4M3_SUBNORMAL_HALF_SPACING * s_elem) * (1 + 1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pow2", [False, True])
def test_weight_blocks_roundtrip_bound(shape, pow2):
    torch.manual_seed(0)
    m, n = shape
    w = torch.randn(m, n) * torch.logspace(-3, 2, n)  # columns of very different magnitude
    q, s = quantize_weight_blocks(w, pow2_scale=pow2)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (math.ceil(m / 128), math.ceil(n / 128))
    s_elem = _weight_scale_per_element(s, m, n)
    deq = dequantize_weight_blocks(q, s, dtype=torch.float32)
    err = (deq - w).abs()
    assert (err <= _bound(w, s_elem)).all(), (err / _bound(w, s_elem)).max()
    # Coarser form of the same bound: within 2^-4 of the block's max magnitude.
    amax_elem = _weight_scale_per_element(
        torch.nn.functional.pad(w.abs(), (0, -n % 128, 0, -m % 128)).view(s.shape[0], 128, s.shape[1], 128).amax((1, 3)),
        m, n)
    assert (err <= E4M3_REL_HALF_ULP * amax_elem * (1 + 1e-6)).all()
    # Scales map each block's max onto 448 (or just below it, for pow2).
    q_amax = q.float().abs()
    assert q_amax.max() <= FP8_MAX
    if not pow2:
        assert q_amax.max() == FP8_MAX


@pytest.mark.parametrize("shape", SHAPES)
def test_weight_dequant_matches_direct_formula(shape):
    torch.manual_seed(1)
    m, n = shape
    q, s = quantize_weight_blocks(torch.randn(m, n))
    direct = q.float() * _weight_scale_per_element(s, m, n)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(dequantize_weight_blocks(q, s, dtype=dtype), direct.to(dtype))


@pytest.mark.parametrize("shape", [(4, 128), (3, 5, 200), (1, 1), (17, 129), (2, 3, 384)])
@pytest.mark.parametrize("pow2", [False, True])
def test_activation_tiles_roundtrip_and_formula(shape, pow2):
    torch.manual_seed(2)
    x = torch.randn(*shape) * 10 ** torch.empty(shape[:-1] + (1,)).uniform_(-4, 3)
    q, s = quantize_activation_tiles(x, pow2_scale=pow2)
    k = shape[-1]
    assert q.dtype == FP8_DTYPE and q.shape == x.shape
    assert s.shape == shape[:-1] + (math.ceil(k / 128),) and s.dtype == torch.float32
    # direct per-element formula
    s_elem = torch.stack([s[..., j // 128] for j in range(k)], dim=-1)
    direct = q.float() * s_elem
    assert torch.equal(dequantize_activation_tiles(q, s, dtype=torch.float32), direct)
    err = (direct - x).abs()
    assert (err <= _bound(x, s_elem)).all()
    if pow2:
        assert is_power_of_two(s)


def test_tile_scale_is_amax_over_448():
    x = torch.zeros(2, 300)
    x[0, 5] = -896.0  # tile 0 of row 0
    x[0, 200] = 44.8  # tile 1 of row 0
    x[1, 299] = 4.48  # ragged tile 2 of row 1
    _, s = quantize_activation_tiles(x)
    assert s[0, 0] == 2.0 and torch.isclose(s[0, 1], torch.tensor(0.1)) and torch.isclose(s[1, 2], torch.tensor(0.01))
    assert s[1, 0] == 1.0  # all-zero tile -> scale 1


@pytest.mark.parametrize("pow2", [False, True])
def test_zero_and_constant_blocks_have_no_nan(pow2):
    w = torch.zeros(200, 300)
    w[128:, 128:256] = 3.0  # one all-equal block
    w[:128, 256:] = -1e-30  # a block of tiny values
    q, s = quantize_weight_blocks(w, pow2_scale=pow2)
    deq = dequantize_weight_blocks(q, s, dtype=torch.float32)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert not torch.isnan(q.float()).any()
    assert (deq[:128, :256] == 0).all()
    assert torch.allclose(deq[128:, 128:256], torch.full((72, 128), 3.0), rtol=2**-4)
    x = torch.zeros(3, 256)
    xq, xs = quantize_activation_tiles(x, pow2_scale=pow2)
    assert (xs == 1).all() and (dequantize_activation_tiles(xq, xs, dtype=torch.float32) == 0).all()
    xq, xs = quantize_activation_tiles(torch.full((2, 130), -7.0), pow2_scale=pow2)
    assert torch.allclose(dequantize_activation_tiles(xq, xs, dtype=torch.float32), torch.full((2, 130), -7.0), rtol=2**-4)


def test_pow2_scales_are_powers_of_two_and_no_smaller():
    torch.manual_seed(3)
    w = torch.randn(384, 256) * 37.0
    _, s = quantize_weight_blocks(w)
    _, s2 = quantize_weight_blocks(w, pow2_scale=True)
    assert is_power_of_two(s2) and not is_power_of_two(s)
    assert (s2 >= s).all() and (s2 < 2 * s).all()


def test_stacked_weights_quantize_each_matrix():
    torch.manual_seed(4)
    w = torch.randn(3, 200, 136)
    w[1] *= 100
    q, s = quantize_weight_blocks(w)
    assert s.shape == (3, 2, 2)
    for e in range(3):
        qe, se = quantize_weight_blocks(w[e])
        assert torch.equal(s[e], se) and torch.equal(q[e].view(torch.uint8), qe.view(torch.uint8))
    assert torch.equal(dequantize_weight_blocks(q, s, dtype=torch.float32)[2],
                       dequantize_weight_blocks(q[2], s[2], dtype=torch.float32))


def test_requantizing_a_dequantized_checkpoint():
    """An FP8 checkpoint (W = W_fp8 * S[i//128, j//128]) loaded to high precision and
    quantized again: bit-exact with power-of-two scales (a pure exponent shift), within
    the round-trip bound otherwise (s = amax * fp32(1/448) can move by an ulp)."""
    torch.manual_seed(5)
    w = torch.randn(256, 384)
    q, s = quantize_weight_blocks(w, pow2_scale=True)
    w_hp = dequantize_weight_blocks(q, s, dtype=torch.float32)
    q2, s2 = quantize_weight_blocks(w_hp, pow2_scale=True)
    assert torch.equal(dequantize_weight_blocks(q2, s2, dtype=torch.float32), w_hp)
    q, s = quantize_weight_blocks(w)
    w_hp = dequantize_weight_blocks(q, s, dtype=torch.float32)
    q2, s2 = quantize_weight_blocks(w_hp)
    w2 = dequantize_weight_blocks(q2, s2, dtype=torch.float32)
    assert ((w2 - w_hp).abs() <= _bound(w_hp, _weight_scale_per_element(s2, 256, 384))).all()
