"""FP8 grouped expert GEMM: vs fp32 per-group reference, recipe details, GPU parity."""

import contextlib

import pytest
import torch

from dsv3.fp8.blocks import FP8_DTYPE, quantize_activation_tiles
from dsv3.fp8.gemm import dequantize_operand, scaled_mm_blockwise_available
from dsv3.fp8.grouped import fp8_grouped_mm, group_bounds
from dsv3.fp8.linear import fp8_linear

# Same derivation as tests/test_fp8_linear.py: predicted RMS relative error 0.0375.
REL_ERR_BOUND = 0.045

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def loop_reference(x, w, sizes):
    out, s = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float32), 0
    for g, c in enumerate(sizes):
        out[s:s + c] = x[s:s + c].float() @ w[g].float().t()
        s += c
    return out


@pytest.mark.parametrize("sizes,n,k", [([100, 0, 300, 37], 256, 384),   # gate/up: [E, F, D]
                                       ([128, 128, 5], 384, 128),        # down: [E, D, F]
                                       ([0, 0, 64], 128, 256)])
def test_grouped_vs_fp32_loop(sizes, n, k):
    torch.manual_seed(0)
    e = len(sizes)
    t = sum(sizes) + 3  # 3 padding rows past the last group
    x = torch.randn(t, k, requires_grad=True)
    w = torch.randn(e, n, k, requires_grad=True)
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    y = fp8_grouped_mm(x, w, offs)
    y_ref = loop_reference(x, w, sizes)
    gy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), gy)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, w), gy)
    errs = rel(y, y_ref), rel(dx, dx_ref), rel(dw, dw_ref)
    print(f"\ngroups {sizes} N={n} K={k}: rel err y {errs[0]:.4f} dx {errs[1]:.4f} dW {errs[2]:.4f}")
    assert all(err <= REL_ERR_BOUND for err in errs), errs
    assert (y[sum(sizes):] == 0).all() and (dx[sum(sizes):] == 0).all()
    for g, c in enumerate(sizes):
        if c == 0:
            assert (dw[g] == 0).all()


def test_grouped_equals_per_group_fp8_linear():
    """Each group is exactly an FP8 linear on its rows (wgrad tiles start at the group's first row)."""
    torch.manual_seed(1)
    sizes = [130, 70]
    x = torch.randn(200, 256, requires_grad=True)
    w = torch.randn(2, 128, 256, requires_grad=True)
    gy = torch.randn(200, 128)
    offs = torch.tensor([130, 200], dtype=torch.int32)
    y = fp8_grouped_mm(x, w, offs)
    dx, dw = torch.autograd.grad(y, (x, w), gy)
    s = 0
    for g, c in enumerate(sizes):
        xg = x[s:s + c].detach().requires_grad_()
        wg = w[g].detach().requires_grad_()
        yg = fp8_linear(xg, wg)
        dxg, dwg = torch.autograd.grad(yg, (xg, wg), gy[s:s + c])
        assert torch.allclose(y[s:s + c], yg, rtol=1e-6, atol=1e-5)
        assert torch.allclose(dx[s:s + c], dxg, rtol=1e-6, atol=1e-5)
        assert torch.allclose(dw[g], dwg, rtol=1e-6, atol=1e-5)
        s += c


def test_grouped_saves_fp8_activations():
    x = torch.randn(256, 256, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(2, 128, 256, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, tuple(t.shape))) or t,
                                                  lambda t: t):
        y = fp8_grouped_mm(x, w, torch.tensor([100, 256], dtype=torch.int32))
    y.float().sum().backward()
    assert all(d in (FP8_DTYPE, torch.float32, torch.int32) for d, _ in saved), saved  # int32: the group ends
    assert (FP8_DTYPE, (256, 100)) in saved and (FP8_DTYPE, (256, 156)) in saved


def test_group_bounds_validation():
    assert group_bounds(torch.tensor([2, 2, 5], dtype=torch.int32)) == [(0, 2), (2, 2), (2, 5)]
    with pytest.raises(ValueError):
        group_bounds(torch.tensor([3, 1], dtype=torch.int32))
    with pytest.raises(ValueError):
        fp8_grouped_mm(torch.randn(4, 128), torch.randn(2, 16, 128), torch.tensor([2, 9], dtype=torch.int32))


@cuda
def test_gpu_grouped_matches_reference():
    if not scaled_mm_blockwise_available(0):
        pytest.skip("blockwise torch._scaled_mm unavailable on this GPU/torch")
    torch.manual_seed(2)
    sizes = [256, 0, 77, 640, 128]
    x = torch.randn(sum(sizes), 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(len(sizes), 384, 512, device="cuda", requires_grad=True)
    offs = torch.tensor(sizes, device="cuda").cumsum(0).to(torch.int32)
    gy = torch.randn(sum(sizes), 384, device="cuda", dtype=torch.bfloat16)
    outs = {}
    for backend in ("reference", "scaled_mm"):
        y = fp8_grouped_mm(x, w, offs, backend=backend)
        outs[backend] = (y, *torch.autograd.grad(y, (x, w), gy))
    for name, a, b in zip(("y", "dx", "dW"), outs["scaled_mm"], outs["reference"]):
        e = rel(a, b)
        print(f"\ngrouped {name}: scaled_mm vs reference {e:.2e}")
        assert e <= 4e-3


def _aligned_problem(sizes, k, device="cpu", dtype=torch.float32, align=128):
    """Rows of each group at a multiple of `align`, zero rows between groups and after the last."""
    pad = [-(-s // align) * align for s in sizes]
    ends = torch.tensor(pad).cumsum(0).to(torch.int32)
    rows = int(ends[-1]) + align
    x = torch.zeros(rows, k, device=device, dtype=dtype)
    for e, s in enumerate(sizes):
        start = int(ends[e]) - pad[e]
        x[start:start + s] = torch.randn(s, k, device=device, dtype=dtype)
    return x, ends.to(device)


def test_aligned_groups_give_the_same_numbers_as_packed_groups():
    """Zero rows between 128-aligned groups change nothing: y, dx and dW equal the packed layout's."""
    torch.manual_seed(3)
    sizes, n, k = [130, 0, 200, 7], 256, 384
    xa, ends = _aligned_problem(sizes, k)
    keep = xa.abs().sum(1) > 0
    xp = xa[keep].clone().requires_grad_(True)
    xa = xa.requires_grad_(True)
    w = torch.randn(len(sizes), n, k, requires_grad=True)
    ya = fp8_grouped_mm(xa, w, ends, aligned=True)
    yp = fp8_grouped_mm(xp, w, torch.tensor(sizes).cumsum(0).to(torch.int32))
    # equal up to fp32 summation order (the reference matmuls see different row counts)
    assert rel(ya[keep], yp) < 1e-6
    assert (ya[~keep] == 0).all()
    gy = torch.randn_like(yp)
    gya = torch.zeros_like(ya)
    gya[keep] = gy
    dxa, dwa = torch.autograd.grad(ya, (xa, w), gya)
    dxp, dwp = torch.autograd.grad(yp, (xp, w), gy)
    assert rel(dxa[keep], dxp) < 1e-6 and rel(dwa, dwp) < 1e-6
    assert (dxa[~keep] == 0).all()


def test_moe_padding_plumbing_matches_unpadded():
    """experts_forward_sorted(align=128) (zero rows between experts) equals align=1 in output and gradients,
    with the same plain per-group GEMM: only the row layout differs."""
    import torch.nn.functional as F

    from dsv3.model.moe import Routing, experts_forward_sorted

    def loop_gemm(x, w, ends, counts):
        out, start = [], 0
        for e, end in enumerate(ends.tolist()):
            out.append(F.linear(x[start:end], w[e]))
            start = end
        return torch.cat(out + [x.new_zeros(x.shape[0] - start, w.shape[1])])

    torch.manual_seed(4)
    T, D, F_, E, K = 37, 64, 32, 6, 2
    x = torch.randn(T, D, requires_grad=True)
    ws = [torch.randn(E, F_, D, requires_grad=True), torch.randn(E, F_, D, requires_grad=True),
          torch.randn(E, D, F_, requires_grad=True)]
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    idx[:5] = torch.tensor([0, 1])  # uneven groups; expert 5 may be empty
    weight = torch.rand(T, K, requires_grad=True)
    gy = torch.randn(T, D)
    outs = []
    for align in (1, 128):
        y = experts_forward_sorted(x, Routing(idx, weight, None), *ws, gemm=loop_gemm, align=align)
        outs.append((y, *torch.autograd.grad(y, (x, weight, *ws), gy)))
    for a, b in zip(*outs):
        assert rel(a, b) < 1e-6  # fp32 sums of different lengths


def test_weight_cache_quantizes_once_per_scope(monkeypatch):
    from dsv3.fp8 import weight_cache

    calls = []
    real = weight_cache.quantize_blocks
    monkeypatch.setattr(weight_cache, "quantize_blocks", lambda *a: calls.append(1) or real(*a))
    w = torch.nn.Parameter(torch.randn(2, 128, 256))
    x = torch.randn(256, 256)
    ends = torch.tensor([128, 256], dtype=torch.int32)
    fp8_grouped_mm(x, w, ends)
    fp8_grouped_mm(x, w, ends)
    assert len(calls) == 2 and weight_cache.cache_size() == 0  # no scope: no caching
    with weight_cache.reuse_quantized_weights():
        y1 = fp8_grouped_mm(x, w, ends)
        y2 = fp8_grouped_mm(x, w, ends)
        assert len(calls) == 3 and torch.equal(y1, y2)
        with torch.no_grad():
            w.mul_(2)  # an in-place change inside the scope is seen (version counter)
        y3 = fp8_grouped_mm(x, w, ends)
        assert len(calls) == 4
        torch.testing.assert_close(y3, 2 * y1, rtol=0, atol=0)  # exact: scales double, FP8 bytes equal
    assert weight_cache.cache_size() == 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_joined_weight_blocks_are_the_parts_quantized_separately(device):
    """``weight_blocks((gate, up))``: each part quantized into its rows of one joined FP8 copy, the bits of
    quantizing each alone and concatenating; inside a scope it is one cache entry (not the parts again)."""
    from dsv3.fp8 import weight_cache
    from dsv3.fp8.blocks import quantize_weight_blocks

    torch.manual_seed(13)
    parts = (torch.randn(3, 256, 200, device=device), torch.randn(3, 130, 200, device=device) * 7)
    want = [quantize_weight_blocks(p) for p in parts]
    for scoped in (False, True):
        with weight_cache.reuse_quantized_weights() if scoped else contextlib.nullcontext():
            q, sc = weight_cache.weight_blocks(parts)
            assert weight_cache.cache_size() == int(scoped)
        assert torch.equal(q.view(torch.uint8), torch.cat([a for a, _ in want], -2).view(torch.uint8))
        assert torch.equal(sc, torch.cat([b for _, b in want], -2))
    with pytest.raises(ValueError, match="multiples of 128"):
        weight_cache.weight_blocks((parts[1], parts[0]))


@cuda
def test_gpu_triton_grouped_matches_reference():
    """The one-launch Triton kernels (aligned groups) vs the fp32 reference: y, dx, dW; zero padding rows."""
    from dsv3.fp8.grouped import triton_path_available

    x0 = torch.zeros(1, 1, device="cuda")
    if not triton_path_available(x0):
        pytest.skip("Triton not installed")
    torch.manual_seed(5)
    for sizes, n, k in [([256, 0, 77, 640, 130], 512, 1536), ([5, 300], 1536, 512), ([0, 0, 1], 256, 384)]:
        x, ends = _aligned_problem(sizes, k, "cuda", torch.bfloat16)
        x.requires_grad_(True)
        w = torch.randn(len(sizes), n, k, device="cuda", requires_grad=True)
        gy = torch.randn(x.shape[0], n, device="cuda", dtype=torch.bfloat16)
        gy[x.detach().abs().sum(1) == 0] = 0  # padding rows get no gradient (as in the MoE)
        outs = {}
        for backend in ("reference", "triton"):
            y = fp8_grouped_mm(x, w, ends, backend=backend, aligned=backend == "triton")
            outs[backend] = (y, *torch.autograd.grad(y, (x, w), gy))
        for name, a, b in zip(("y", "dx", "dW"), outs["triton"], outs["reference"]):
            e = rel(a, b)
            print(f"\ntriton grouped {sizes} N={n} K={k} {name}: vs reference {e:.2e}")
            assert e <= 4e-3, (name, e)
        tail = int(ends[-1])
        assert (outs["triton"][0][tail:] == 0).all()


def test_joined_weights_equal_separate_gemms():
    """fp8_grouped_mm(x, (w1, w2)) is the two grouped GEMMs side by side, gradients split back per weight."""
    torch.manual_seed(6)
    x, ends = _aligned_problem([200, 0, 90], 256)
    x.requires_grad_(True)
    w1 = torch.randn(3, 128, 256, requires_grad=True)
    w2 = torch.randn(3, 256, 256, requires_grad=True)
    gy = torch.randn(x.shape[0], 384)
    y = fp8_grouped_mm(x, (w1, w2), ends, aligned=True)
    ys = torch.cat([fp8_grouped_mm(x, w1, ends, aligned=True), fp8_grouped_mm(x, w2, ends, aligned=True)], 1)
    got = (y, *torch.autograd.grad(y, (x, w1, w2), gy))
    ref = (ys, *torch.autograd.grad(ys, (x, w1, w2), gy))
    for a, b in zip(got, ref):
        assert rel(a, b) < 1e-6
    with pytest.raises(ValueError, match="multiples of 128"):
        fp8_grouped_mm(x, (w1, torch.randn(3, 100, 256)), ends)



@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize("joined", [False, True])
def test_custom_op_matches_the_autograd_function_bitwise(joined, device):
    """``dsv3::fp8_grouped_mm`` (what compiled blocks run) gives the bits of the eager path on aligned groups:
    y, dx and every weight gradient. On the CPU the eager path tiles x^T per group and the op over all rows at
    once; on CUDA both run the Triton kernels."""
    from dsv3.fp8.grouped import fp8_grouped_mm_op
    torch.manual_seed(8)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, ends = _aligned_problem([200, 0, 90, 128, 1], 256, device, dtype)
    w = tuple(torch.randn(5, 128, 256, device=device, requires_grad=True) for _ in range(2 if joined else 1))
    gy = torch.randn(x.shape[0], 128 * len(w), device=device, dtype=dtype)
    outs = {}
    for name, fn in (("eager", lambda xx: fp8_grouped_mm(xx, w if joined else w[0], ends, aligned=True)),
                     ("op", lambda xx: fp8_grouped_mm_op(xx, w if joined else w[0], ends))):
        xx = x.clone().requires_grad_(True)
        y = fn(xx)
        outs[name] = (y, *torch.autograd.grad(y, (xx, *w), gy))
    for a, b in zip(outs["op"], outs["eager"]):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    # no weight gradient wanted: the op keeps no x^T and still gives dx
    xx = x.clone().requires_grad_(True)
    wd = tuple(t.detach() for t in w)
    y = fp8_grouped_mm_op(xx, wd if joined else wd[0], ends)
    assert torch.equal(torch.autograd.grad(y, xx, gy)[0], outs["eager"][1])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize("joined", [False, True])
def test_bf16_weights_get_gradients_rounded_once_from_fp32(joined, device):
    """With bf16 weights the weight gradients leave the kernels in bf16 (no fp32 result and cast pass): the
    bits of the same GEMMs with the same values held as fp32 weights (fp32 gradients), rounded to bf16 once;
    eager and custom-op paths alike, and dx unchanged."""
    from dsv3.fp8.grouped import fp8_grouped_mm_op
    torch.manual_seed(12)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, ends = _aligned_problem([200, 0, 90, 128, 1], 256, device, dtype)
    w16 = tuple(torch.randn(5, 128, 256, device=device).to(torch.bfloat16) for _ in range(2 if joined else 1))
    gy = torch.randn(x.shape[0], 128 * len(w16), device=device, dtype=dtype)
    for run in (fp8_grouped_mm, fp8_grouped_mm_op):
        grads = {}
        for wdt in (torch.float32, torch.bfloat16):
            w = tuple(t.to(wdt).requires_grad_(True) for t in w16)
            xx = x.clone().requires_grad_(True)
            kwargs = {"aligned": True} if run is fp8_grouped_mm else {}
            y = run(xx, w if joined else w[0], ends, **kwargs)
            grads[wdt] = torch.autograd.grad(y, (xx, *w), gy)
        assert all(g.dtype == torch.bfloat16 for g in grads[torch.bfloat16][1:])
        assert torch.equal(grads[torch.bfloat16][0], grads[torch.float32][0])
        for got, fp32 in zip(grads[torch.bfloat16][1:], grads[torch.float32][1:]):
            assert torch.equal(got, fp32.to(torch.bfloat16))


def test_compiled_grouped_gemm_has_no_graph_break():
    """Under torch.compile(fullgraph=True) the aligned FP8 grouped GEMM is one graph (the custom ops; a graph
    break would raise), and its numbers are the eager ones."""
    torch._dynamo.reset()
    torch.manual_seed(9)
    x, ends = _aligned_problem([130, 0, 200], 256)
    w1, w2 = (torch.randn(3, 128, 256, requires_grad=True) for _ in range(2))
    wd = torch.randn(3, 256, 256, requires_grad=True)

    def swiglu(xx):
        gate, up = fp8_grouped_mm(xx, (w1, w2), ends, aligned=True).split(128, dim=1)
        h = torch.nn.functional.silu(gate) * up
        return fp8_grouped_mm(torch.cat([h, h], 1), wd, ends, aligned=True)

    compiled = torch.compile(swiglu, fullgraph=True, backend="aot_eager")
    got, ref = {}, {}
    for fn, out in ((compiled, got), (swiglu, ref)):
        xx = x.clone().requires_grad_(True)
        y = fn(xx)
        out["y"] = y
        out["grads"] = torch.autograd.grad(y.square().sum(), (xx, w1, w2, wd))
    assert torch.equal(got["y"], ref["y"])
    for a, b in zip(got["grads"], ref["grads"]):
        assert rel(a, b) < 1e-6

def test_autocast_does_not_reach_inside_the_recipe():
    """Under autocast the FP8 functions compute exactly what they compute without it (the recipe fixes every
    precision; CPU autocast used to fail on the float8 concatenation of joined weights)."""
    torch.manual_seed(7)
    x, ends = _aligned_problem([150, 40], 256)
    w1, w2 = torch.randn(2, 128, 256), torch.randn(2, 128, 256)
    plain = fp8_grouped_mm(x, (w1, w2), ends, aligned=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = fp8_grouped_mm(x, (w1, w2), ends, aligned=True)
        lin = fp8_linear(x, w1[0])
    assert torch.equal(plain, auto)
    assert torch.equal(lin, fp8_linear(x, w1[0]))


# Run by test_triton_grouped_kernels_interpreted in a fresh interpreter with TRITON_INTERPRET=1 (Triton's numpy
# interpreter: the kernels' own code on the CPU). Every kernel variant of dsv3.fp8.triton_grouped against the
# dequantize + fp32 matmul reference, at shapes that hit the edges: an empty group, a group of 1 row, a tile of
# padding past the last group, N not a multiple of the 128-wide tile, K not a multiple of 128.
_INTERPRETED_CHECK = r"""
import torch
import dsv3.fp8.triton_grouped as tg
from dsv3.fp8.blocks import quantize_activation_tiles, quantize_weight_blocks

def deq_tiles(q, s):
    return q.float() * s.repeat_interleave(128, 1)[:, :q.shape[1]]

torch.manual_seed(0)
worst = 0.0
for sizes, n, k in [([128, 0, 256], 256, 256), ([5, 300], 384, 256), ([130, 1], 200, 320)]:
    pad = [-(-c // 128) * 128 for c in sizes]
    ends = torch.tensor(pad).cumsum(0).to(torch.int32)
    m = int(ends[-1]) + 128
    x, start = torch.zeros(m, k), 0
    for c, p in zip(sizes, pad):
        x[start:start + c] = torch.randn(c, k)
        start += p
    w = torch.randn(len(sizes), n, k)
    dy = torch.randn(m, n) * (x.abs().sum(1, keepdim=True) > 0)
    xq, xs = quantize_activation_tiles(x, 128)
    wq, ws = quantize_weight_blocks(w)
    dq, ds = quantize_activation_tiles(dy.t().contiguous(), 128)
    xtq, xts = quantize_activation_tiles(x.t().contiguous(), 128)
    wd = wq.float() * ws.repeat_interleave(128, 1).repeat_interleave(128, 2)[:, :n, :k]
    xd, dd, xtd = deq_tiles(xq, xs), deq_tiles(dq, ds), deq_tiles(xtq, xts)
    y_ref, dw_ref, s = torch.zeros(m, n), torch.zeros(len(sizes), n, k), 0
    for g, e in enumerate(ends.tolist()):
        y_ref[s:e] = xd[s:e] @ wd[g].t()
        dw_ref[g] = dd[:, s:e] @ xtd[:, s:e].t()
        s = e
    runs = {}
    for kernels, defer in (("pointer", False), ("tma", False), ("tma", True)):
        for n_fastest in (True, False):
            tg.KERNELS, tg.N_FASTEST, tg.DEFER_PROMOTION = kernels, n_fastest, defer
            for scales in (xs, xs.t().contiguous().t()):  # activation scales row- or column-major
                y = tg.grouped_fp8_nt(xq, scales, wq, ws, ends, out_dtype=torch.float32)
                assert (y[int(ends[-1]):] == 0).all(), "padding rows past the last group must be zero"
                worst = max(worst, float((y - y_ref).norm() / y_ref.norm()))
            dw = tg.grouped_fp8_wgrad(dq, ds, xtq, xts, ends)
            worst = max(worst, float((dw - dw_ref).norm() / dw_ref.norm()))
            if kernels == "tma":  # deferred promotion: the same sums in the same order, so the same bits
                seen = runs.setdefault(n_fastest, (y, dw))
                assert torch.equal(seen[0], y) and torch.equal(seen[1], dw), "deferred promotion changed the sums"
            # weight gradients stored in bf16 straight from the fp32 accumulator: dw rounded once (within one
            # bf16 step: the interpreter's cast truncates where the GPU's rounds to nearest, which
            # test_bf16_weights_get_gradients_rounded_once_from_fp32 checks bit for bit on CUDA)
            dwb = tg.grouped_fp8_wgrad(dq, ds, xtq, xts, ends, out_dtype=torch.bfloat16)
            assert dwb.dtype == torch.bfloat16
            worst_bf16 = float(((dwb.float() - dw).abs() / dw.abs().clamp_min(1e-30)).max())
            assert worst_bf16 <= 2.0 ** -7, worst_bf16
            if n % 2 == 0:  # N as two joined weights: each part contiguous, the same numbers
                dw2 = tg.grouped_fp8_wgrad(dq, ds, xtq, xts, ends, parts=2)
                assert dw2.shape == (2, len(sizes), n // 2, k) and dw2[1].is_contiguous()
                assert torch.equal(torch.cat([dw2[0], dw2[1]], dim=1), dw)
from dsv3.fp8.triton_quant import _transpose_triton
for shape in [(3, 200, 130), (64, 128), (2, 1, 70, 300)]:  # the FP8 W^T kernel: bit for bit
    q = (torch.randn(shape) * 40).to(torch.float8_e4m3fn)
    assert torch.equal(_transpose_triton(q).view(torch.uint8), q.transpose(-2, -1).contiguous().view(torch.uint8))
# the paired launch: the bits of the one-axis kernel run twice (the interpreter's own float8 rounding differs
# from the GPU's, so FP8 bytes are compared kernel to kernel here; tests/test_fp8_triton.py compares with the
# torch reference on the GPU), and the reference's scales
from dsv3.fp8.triton_quant import _quantize_tiles_pair_triton, quantize_activation_tiles_triton
for m, k, pow2 in ((300, 200, False), (128, 384, True), (1, 130, False)):
    x = torch.randn(m, k, dtype=torch.bfloat16) * 3
    x[0, :5] = 0  # an all-zero tile corner
    got = _quantize_tiles_pair_triton(x, pow2)
    want = (*quantize_activation_tiles_triton(x, pow2), *quantize_activation_tiles_triton(x.t(), pow2))
    for a, b in zip(got, want):
        assert a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a,
                                                  b.view(torch.uint8) if b.element_size() == 1 else b), (m, k)
    assert torch.equal(got[1], quantize_activation_tiles(x, 128, pow2)[1])
    assert torch.equal(got[3], quantize_activation_tiles(x.t(), 128, pow2)[1])
# the 128x128 weight kernel writing each weight into its rows of a joined copy: the bits of separate calls
from dsv3.fp8.triton_quant import quantize_weight_blocks_triton
for lead in ((), (3,)):
    parts = [torch.randn(*lead, r, 200) for r in (256, 130)]
    sep = [quantize_weight_blocks_triton(p) for p in parts]
    q = torch.empty(*lead, 386, 200, dtype=torch.float8_e4m3fn)
    s = torch.empty(*lead, 4, 2)
    quantize_weight_blocks_triton(parts[0], out=(q[..., :256, :], s[..., :2, :]))
    quantize_weight_blocks_triton(parts[1], out=(q[..., 256:, :], s[..., 2:, :]))
    assert torch.equal(q.view(torch.uint8), torch.cat([a for a, _ in sep], -2).view(torch.uint8))
    assert torch.equal(s, torch.cat([b for _, b in sep], -2))
print("WORST", worst)
"""


def test_triton_grouped_kernels_interpreted(run_interpreted):
    """The Triton grouped FP8 kernels (pointer and TMA loads, both tile orders, both scale layouts) run on the CPU
    under Triton's interpreter and match the dequantize + fp32 reference (only the summation order differs); the
    FP8 transpose kernel matches torch's bit for bit."""
    worst = float(run_interpreted(["-c", _INTERPRETED_CHECK]).split("WORST")[1])
    assert worst < 1e-5, worst


def test_step_scope_caches_weights_only_without_cuda_graphs():
    """The trainer's FP8 step scope reuses quantized weights, except under CUDA graphs (a replay runs no Python, so
    a recorded cache hit would keep reading a stale copy): there every call quantizes again."""
    from dsv3.fp8 import weight_cache

    w = torch.randn(256, 256)
    for precision, cudagraphs, cached in [("fp8", False, True), ("fp8", True, False), ("bf16", False, False)]:
        with weight_cache.step_scope(precision, cudagraphs):
            a = weight_cache.weight_blocks(w)
            b = weight_cache.weight_blocks(w)
            assert (a[0] is b[0]) == cached, (precision, cudagraphs)
            assert weight_cache.cache_size() == (1 if cached else 0)
