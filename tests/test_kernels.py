"""Fast paths against their reference twins (forward and gradients). GPU-only checks skip on CPU."""
import pytest
import torch
import torch.nn.functional as F

from dsv3.kernels.attention import fast_causal_attention
from dsv3.kernels.cross_entropy import linear_cross_entropy
from dsv3.model.attention import causal_attention

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.parametrize("chunk", [5, 64, 1000])
def test_linear_cross_entropy_matches_reference_with_ignored_labels(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (37,), generator=g)
    labels[::4] = -100
    loss = linear_cross_entropy(h, w, labels, chunk=chunk)
    (loss * 1.7).backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.cross_entropy(h2 @ w2.T, labels, ignore_index=-100)
    (ref * 1.7).backward()
    assert torch.allclose(loss, ref, rtol=1e-6)
    assert torch.allclose(h.grad, h2.grad, rtol=1e-5, atol=1e-7)
    assert torch.allclose(w.grad, w2.grad, rtol=1e-5, atol=1e-7)


def test_compiled_cross_entropy_chunk_matches_eager_twin():
    """The compiled per-chunk softmax/gradient (the CUDA default) against the eager reference, on the CPU's
    inductor; chunks of two sizes (the last one is shorter), ignored labels included."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(45, 24, generator=g)
    w = torch.randn(70, 24, generator=g)
    labels = torch.randint(0, 70, (45,), generator=g)
    labels[1::3] = -100
    results = []
    for compiled in (False, True):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = linear_cross_entropy(hh, ww, labels, chunk=32, compiled=compiled)
        (loss * 0.9).backward()
        results.append((loss, hh.grad, ww.grad))
    (l0, dh0, dw0), (l1, dh1, dw1) = results
    assert torch.allclose(l0, l1, rtol=1e-6)
    assert torch.allclose(dh0, dh1, rtol=1e-5, atol=1e-7)
    assert torch.allclose(dw0, dw1, rtol=1e-5, atol=1e-7)
    # without gradients (evaluation) the chunks skip the gradient pass and give the same loss
    with torch.no_grad():
        for compiled in (False, True):
            assert torch.allclose(linear_cross_entropy(h, w, labels, chunk=32, compiled=compiled), l0, rtol=1e-6)
    from dsv3.kernels.cross_entropy import chunk_loss_and_grad
    assert chunk_loss_and_grad(h @ w.T, labels, want_grad=False)[1] is None


@cuda
def test_compiled_cross_entropy_on_gpu_matches_fp32_reference():
    """bf16 on the GPU at a realistic vocabulary: the compiled chunks against fp32 F.cross_entropy."""
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(4096, 256, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(32768, 256, device="cuda", generator=g) * 0.05).bfloat16().requires_grad_()
    labels = torch.randint(0, 32768, (4096,), device="cuda", generator=g)
    labels[::7] = -100
    loss = linear_cross_entropy(h, w, labels, chunk=1024)
    loss.backward()
    hf, wf = (t.detach().float().requires_grad_() for t in (h, w))
    ref = F.cross_entropy(hf @ wf.T, labels, ignore_index=-100)
    ref.backward()
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()  # noqa: E731
    assert abs(loss.item() - ref.item()) / ref.item() < 2e-3
    assert rel(h.grad, hf.grad) < 2e-2 and rel(w.grad, wf.grad) < 2e-2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_bf16_cross_entropy_gradients_are_the_chunk_gradients_scaled_once(device):
    """bf16 head: dh is each chunk's g @ w times grad/n_valid in fp32, rounded once (bit for bit); dw is the fp32
    sum over chunks of g^T h, scaled, rounded once (bit for bit on the CPU's fp32 reference; on CUDA, where the
    GEMM sums in its own order, within a bf16 rounding in norm, and ``test_head_weight_gradient_...`` checks
    the fp32 sums themselves). The former code rounded each chunk's g^T h to
    bf16 before summing: that fails here."""
    from dsv3.kernels.cross_entropy import chunk_loss_and_grad
    g = torch.Generator(device=device).manual_seed(3)
    T, D, V, chunk = 600, 64, 1000, 256
    h = torch.randn(T, D, device=device, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(V, D, device=device, generator=g) * 0.1).bfloat16().requires_grad_()
    labels = torch.randint(0, V, (T,), device=device, generator=g)
    labels[::5] = -100
    loss = linear_cross_entropy(h, w, labels, chunk=chunk, compiled=False)
    (loss * 1.7).backward()
    scale = torch.tensor(1.7, device=device) / (labels != -100).sum().float()
    dh_ref, dw_ref = [], torch.zeros(V, D, device=device)
    for s in range(0, T, chunk):
        hc = h.detach()[s:s + chunk]
        gc = chunk_loss_and_grad(hc @ w.detach().t(), labels[s:s + chunk])[1]
        dh_ref.append(((gc @ w.detach()).float() * scale).bfloat16())
        dw_ref += gc.float().t() @ hc.float()
    assert torch.equal(h.grad, torch.cat(dh_ref))
    dw_ref = (dw_ref * scale).bfloat16()
    if device == "cpu":
        assert torch.equal(w.grad, dw_ref)
    else:   # the sums' order differs: a bf16 rounding apart at most, in norm (entries that cancel move more)
        assert ((w.grad.float() - dw_ref.float()).norm() / dw_ref.float().norm()).item() < 2 ** -8


@cuda
def test_head_weight_gradient_accumulates_in_fp32_on_gpu():
    """add_weight_grad on CUDA bf16 chunks (fp32 output, then accumulation in the GEMM epilogue) against fp32
    sums of the exact products: agreement to fp32 summation order. Rounding any chunk to bf16 fails (~1e-3)."""
    from dsv3.kernels.cross_entropy import add_weight_grad
    g = torch.Generator(device="cuda").manual_seed(4)
    V, D = 4096, 512
    dw, ref = None, torch.zeros(V, D, device="cuda")
    for _ in range(3):
        gc = torch.randn(1024, V, device="cuda", generator=g).bfloat16()
        hc = torch.randn(1024, D, device="cuda", generator=g).bfloat16()
        dw = add_weight_grad(dw, gc, hc)
        ref += gc.float().t() @ hc.float()
    assert dw.dtype == torch.float32
    assert ((dw - ref).norm() / ref.norm()).item() < 1e-5


def test_model_fused_loss_equals_logits_loss():
    from dsv3.config import preset
    from dsv3.model import DeepseekV3
    torch.manual_seed(0)
    m = DeepseekV3(preset("tiny").replace(vocab_size=300))
    ids = torch.randint(0, 300, (2, 16))
    a = m(ids, ids, return_logits=True)
    b = m(ids, ids, return_logits=False)
    assert b.logits is None
    for k in a.losses:
        assert torch.allclose(a.losses[k], b.losses[k], rtol=1e-5), k
    ga = torch.autograd.grad(a.loss, m.lm_head.weight)[0]
    gb = torch.autograd.grad(b.loss, m.lm_head.weight)[0]
    assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-7)


def test_fast_attention_falls_back_to_reference_on_cpu():
    q, k = torch.randn(2, 3, 9, 12), torch.randn(2, 3, 9, 12)
    v = torch.randn(2, 3, 9, 8)
    assert torch.equal(fast_causal_attention(q, k, v, 0.3), causal_attention(q, k, v, 0.3))


@cuda
def test_cudnn_attention_matches_reference_forward_and_grad():
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 4, 256, 192, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    k = torch.randn(2, 4, 256, 192, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    v = torch.randn(2, 4, 256, 128, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    out = fast_causal_attention(q, k, v, 192 ** -0.5)
    dout = torch.randn_like(out)
    out.backward(dout)
    qf, kf, vf = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = causal_attention(qf, kf, vf, 192 ** -0.5)
    ref.backward(dout.double())
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(out, ref) < 1e-2
    for a, b in ((q.grad, qf.grad), (k.grad, kf.grad), (v.grad, vf.grad)):
        assert rel(a, b) < 2e-2


@cuda
def test_grouped_experts_on_gpu_match_loop_reference():
    from dsv3.config import preset
    from dsv3.model.moe import MoE
    torch.manual_seed(0)
    cfg = preset("tiny").replace(hidden_size=256, moe_intermediate_size=128)
    moe = MoE(cfg).cuda()
    from dsv3.model.moe import init_moe_
    init_moe_(moe, 0.05)
    x = torch.randn(2, 100, 256, device="cuda", requires_grad=True)
    outs = []
    for loop in (False, True):
        moe.experts.use_loop_reference = loop
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, _ = moe(x)
        grads = torch.autograd.grad(y.float().square().sum(), [x, moe.experts.gate_proj, moe.experts.down_proj])
        outs.append((y.float(), grads))
    (y0, g0), (y1, g1) = outs
    assert ((y0 - y1).norm() / y1.norm()).item() < 1e-2
    for a, b in zip(g0, g1):
        assert ((a - b).norm() / b.norm()).item() < 2e-2


def _router_case(device):
    from dsv3.model.moe import _Bf16RouterLogits
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(2048, 256, device=device, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(64, 256, device=device, generator=g) * 0.05).bfloat16().requires_grad_()
    cot = torch.randn(2048, 64, device=device, generator=g)
    fast = _Bf16RouterLogits.apply(x, w)
    fast_grads = torch.autograd.grad(fast, (x, w), cot)
    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
    ref = F.linear(xr.float(), wr.float())
    ref_grads = torch.autograd.grad(ref, (xr, wr), cot)
    # what the hi/lo split may miss: 2^-16 of each |g| times the other operand, summed (absolute)
    split_bound = (2.0 ** -16 * cot.abs() @ w.detach().float().abs(), 2.0 ** -16 * cot.abs().t() @ x.detach().float().abs())
    return fast, ref, fast_grads, ref_grads, split_bound


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_bf16_router_logits_match_fp32_reference(device):
    """The router's tensor-core path (bf16 x and w, fp32 out; hi/lo-split gradient) against
    F.linear(x.float(), w.float()): identical logits up to fp32 summation order; gradients within one bf16
    rounding of the reference plus the split's bound (2^-16 of |g| against the other operand), and nearly all
    of them bit-identical."""
    fast, ref, (dx, dw), (dxr, dwr), bounds = _router_case(device)
    assert fast.dtype == torch.float32
    assert torch.allclose(fast, ref, rtol=1e-5, atol=1e-5)
    for a, b, split in ((dx, dxr, bounds[0]), (dw, dwr, bounds[1])):
        assert a.dtype == b.dtype == torch.bfloat16
        one_rounding = torch.finfo(torch.bfloat16).eps * b.float().abs()
        assert bool(((a.float() - b.float()).abs() <= one_rounding + 2 * split).all())
        assert (a == b).float().mean().item() > 0.99


def test_cross_entropy_compiles_chunks_only_on_cuda_and_when_allowed(monkeypatch):
    """The default per-chunk function: compiled on CUDA, eager elsewhere, and eager on CUDA too once the trainer
    has set COMPILE_CHUNKS = False (train.compile off). Only selects the function; nothing runs on a GPU."""
    from dsv3.kernels import cross_entropy as ce
    monkeypatch.setattr(ce, "COMPILE_CHUNKS", None)
    assert ce._chunk_fn(torch.device("cpu"), None) is ce.chunk_loss_and_grad
    assert ce._chunk_fn(torch.device("cuda"), None) is not ce.chunk_loss_and_grad
    monkeypatch.setattr(ce, "COMPILE_CHUNKS", False)
    assert ce._chunk_fn(torch.device("cuda"), None) is ce.chunk_loss_and_grad
    assert ce._chunk_fn(torch.device("cuda"), True) is not ce.chunk_loss_and_grad
