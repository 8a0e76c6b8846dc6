"""The model against an independent eager reference written here (naive MLA, per-expert loops, brute-force
routing), the absorbed decode form against the naive one, and the balance bookkeeping."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from dsv3.config import ModelConfig, RopeScaling, preset
from dsv3.infer.cache import KVCache
from dsv3.model import DeepseekV3
from dsv3.model.moe import rank_desc, route, sequence_balance_loss

torch.set_default_dtype(torch.float32)

CFG = dict(vocab_size=61, hidden_size=32, intermediate_size=56, moe_intermediate_size=16, num_hidden_layers=3,
           num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1, n_routed_experts=8, kv_lora_rank=12,
           q_lora_rank=20, qk_rope_head_dim=8, v_head_dim=10, qk_nope_head_dim=6, n_group=4, topk_group=2,
           num_experts_per_tok=3, first_k_dense_replace=1, max_position_embeddings=128, rope_scaling=None,
           num_nextn_predict_layers=1, initializer_range=0.15)


def cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**CFG, **kw}).validate()


def random_model(c: ModelConfig, seed=0) -> DeepseekV3:
    torch.manual_seed(seed)
    m = DeepseekV3(c)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
        for moe in m.moe_layers():
            if moe.gate.e_score_correction_bias is not None:
                moe.gate.e_score_correction_bias.normal_(0, 0.2)  # negative values included
    return m


# ------------------------------------------------------------------ an independent reference, from the formulas
def ref_rms(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def ref_rope(x, pos, theta, dim, rs):
    """Complex-number form of interleaved RoPE: pair (x[2i], x[2i+1]) is the complex number x[2i] + i x[2i+1]."""
    inv = [theta ** (-2 * i / dim) for i in range(dim // 2)]
    mscale = 1.0
    if rs is not None:
        def corr(r):
            return dim * math.log(rs.original_max_position_embeddings / (r * 2 * math.pi)) / (2 * math.log(theta))
        lo, hi = max(math.floor(corr(rs.beta_fast)), 0), min(math.ceil(corr(rs.beta_slow)), dim - 1)
        ramp = [min(max((i - lo) / ((hi - lo) or 0.001), 0.0), 1.0) for i in range(dim // 2)]
        inv = [f / rs.factor * r + f * (1 - r) for f, r in zip(inv, ramp)]
        ms = lambda s, m: 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0  # noqa: E731
        mscale = ms(rs.factor, rs.mscale) / ms(rs.factor, rs.mscale_all_dim)
    ang = torch.tensor(pos, dtype=torch.float64)[:, None] * torch.tensor(inv, dtype=torch.float64)[None]
    rot = torch.polar(torch.full_like(ang, mscale), ang)  # [S, dim/2]
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], dim // 2, 2).contiguous())
    shape = [1] * (xc.dim() - 2) + list(rot.shape)
    if xc.dim() == 4:  # [B,S,H,dim/2]
        rot = rot[:, None, :]
        shape = [1, rot.shape[0], 1, rot.shape[2]]
    out = xc * rot.reshape(shape)
    return torch.view_as_real(out).reshape(x.shape).float()


def ref_forward(m: DeepseekV3, ids: torch.Tensor) -> torch.Tensor:
    """Token-by-token-readable reference: explicit per-head attention, per-token per-expert MoE."""
    c = m.config
    B, S = ids.shape
    pos = list(range(S))
    h = m.embed_tokens.weight[ids]
    H, N, R, V, C = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
    for layer in m.layers:
        a = layer.self_attn
        x = ref_rms(h, layer.input_layernorm.weight, c.rms_norm_eps)
        if c.q_lora_rank is None:
            q = x @ a.q_proj.weight.T
        else:
            q = ref_rms(x @ a.q_a_proj.weight.T, a.q_a_layernorm.weight, 1e-6) @ a.q_b_proj.weight.T
        q = q.view(B, S, H, N + R)
        kv = x @ a.kv_a_proj_with_mqa.weight.T
        latent = ref_rms(kv[..., :C], a.kv_a_layernorm.weight, 1e-6)
        k_pe = ref_rope(kv[..., C:], pos, c.rope_theta, R, c.rope_scaling)  # [B,S,R]
        q_pe = ref_rope(q[..., N:], pos, c.rope_theta, R, c.rope_scaling)
        kvb = (latent @ a.kv_b_proj.weight.T).view(B, S, H, N + V)
        out = torch.zeros(B, S, H, V)
        for b, hh, i in itertools.product(range(B), range(H), range(S)):
            qi = torch.cat([q[b, i, hh, :N], q_pe[b, i, hh]])
            keys = torch.cat([kvb[b, : i + 1, hh, :N], k_pe[b, : i + 1]], dim=-1)
            p = torch.softmax(keys @ qi * c.softmax_scale, dim=0)
            out[b, i, hh] = p @ kvb[b, : i + 1, hh, N:]
        h = h + out.reshape(B, S, H * V) @ a.o_proj.weight.T
        x = ref_rms(h, layer.post_attention_layernorm.weight, c.rms_norm_eps)
        h = h + ref_ffn(layer.mlp, x, c)
    return ref_rms(h, m.norm.weight, c.rms_norm_eps) @ m.lm_head.weight.T


def swiglu(x, wg, wu, wd):
    return (F.silu(x @ wg.T) * (x @ wu.T)) @ wd.T


def ref_ffn(mlp, x, c):
    if not hasattr(mlp, "experts"):
        return swiglu(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    B, S, D = x.shape
    out = swiglu(x, mlp.shared_experts.gate_proj.weight, mlp.shared_experts.up_proj.weight,
                 mlp.shared_experts.down_proj.weight)
    bias = mlp.gate.e_score_correction_bias
    for b, i in itertools.product(range(B), range(S)):
        experts, weights = brute_force_route(x[b, i] @ mlp.gate.weight.T, bias, c)
        for e, w in zip(experts, weights):
            ex = mlp.experts
            out[b, i] += w * swiglu(x[b, i], ex.gate_proj[e], ex.up_proj[e], ex.down_proj[e])
    return out


def brute_force_route(logits, bias, c):
    """Enumerate every allowed set of groups; choose the best experts among them by biased score."""
    s = torch.sigmoid(logits) if c.scoring_func == "sigmoid" else torch.softmax(logits, -1)
    sel = s + (bias if bias is not None else 0)
    E, G = len(s), c.n_group
    per = E // G
    gscore = [sorted(sel[g * per:(g + 1) * per].tolist(), reverse=True)[:2] for g in range(G)]
    gscore = [sum(v) for v in gscore]
    groups = sorted(range(G), key=lambda g: -gscore[g])[: c.topk_group]
    allowed = [e for e in range(E) if e // per in groups]
    chosen = sorted(allowed, key=lambda e: -sel[e].item())[: c.num_experts_per_tok]
    w = torch.stack([s[e] for e in chosen])
    if c.norm_topk_prob:
        w = w / w.sum()
    return chosen, w * c.routed_scaling_factor


# --------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("variant", ["base", "no-q-lora", "yarn"])
def test_model_matches_independent_reference(variant):
    kw = {"base": {}, "no-q-lora": {"q_lora_rank": None},
          "yarn": {"rope_scaling": RopeScaling(factor=4.0, original_max_position_embeddings=16, mscale=1.0,
                                               mscale_all_dim=0.8)}}[variant]
    m = random_model(cfg(**kw)).eval()
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = m(ids).logits
        ref = ref_forward(m, ids)
    err = ((ours - ref).norm() / ref.norm()).item()
    assert err <= 1e-5, err


@pytest.mark.parametrize("by_rank", [False, True], ids=["topk", "rank"])
def test_routing_matches_brute_force_with_negative_biases(by_rank):
    """-inf masking of dropped groups: with negative biased scores a 0-mask (as some references use) would pick
    experts from dropped groups; ours never does (the topk reference and the GPU's rank-count selection)."""
    c = cfg(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 16, generator=g) * 2
    bias = torch.randn(16, generator=g) - 1.5  # many biased scores < 0
    r = route(logits, bias, c, by_rank=by_rank)
    for t in range(64):
        experts, w = brute_force_route(logits[t], bias, c)
        assert sorted(r.idx_TK[t].tolist()) == sorted(experts)
        assert torch.allclose(r.weight_TK[t].sort().values, w.sort().values, atol=1e-6)
    s = torch.sigmoid(logits) + bias
    zero_masked_would_differ = (s < 0).any()
    assert zero_masked_would_differ  # the case this test exists for is really exercised


@pytest.mark.parametrize("method", ["noaux_tc", "group_limited_greedy", "greedy", "softmax"])
def test_rank_selection_equals_topk_reference(method):
    """route(by_rank=True), the default inside torch.compile, picks the same experts in the same order with the same weights
    and weight gradients as the topk reference, at the small preset's routing shape (64 experts, 8 groups keep
    4, top-6), ties included (rank_desc breaks them by position, as a stable sort does)."""
    kw = dict(n_routed_experts=64, n_group=8, topk_group=4, num_experts_per_tok=6)
    if method == "softmax":
        kw.update(scoring_func="softmax", topk_method="group_limited_greedy")
    else:
        kw.update(topk_method=method)
    c = cfg(**kw)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(300, 64, generator=g)
    logits[:5] = logits[:5].round()         # rows with many exact ties
    bias = torch.randn(64, generator=g) * 0.1 if method == "noaux_tc" else None
    out = []
    for by_rank in (False, True):
        x = logits.clone().requires_grad_()
        r = route(x, bias, c, by_rank=by_rank)
        (r.weight_TK * torch.linspace(0.5, 2, 6)).sum().backward()
        out.append((r, x.grad))
    (a, ga), (b, gb) = out
    ties = logits[:5].sort(dim=-1, stable=True, descending=True)
    assert (ties.values[:, :-1] == ties.values[:, 1:]).any()
    assert torch.equal(a.idx_TK[5:], b.idx_TK[5:])
    assert torch.allclose(a.weight_TK[5:], b.weight_TK[5:], rtol=1e-6, atol=0)
    assert torch.allclose(ga[5:], gb[5:], rtol=1e-5, atol=1e-8)
    # on tied rows the two may pick different experts of equal biased score: the chosen values agree
    choice = a.scores_TE[:5] + (0 if bias is None else bias)
    assert torch.equal(choice.gather(1, a.idx_TK[:5]), choice.gather(1, b.idx_TK[:5]))


def test_compiled_route_takes_the_rank_path_and_agrees_with_eager_topk(monkeypatch):
    """By default, route counts ranks only inside torch.compile (where Inductor fuses them) and calls topk
    eagerly: compiled and eager give the same routing (CPU inductor here)."""
    import dsv3.model.moe as moe
    c = cfg(n_routed_experts=64, n_group=8, topk_group=4, num_experts_per_tok=6)
    g = torch.Generator().manual_seed(6)
    logits, bias = torch.randn(128, 64, generator=g), torch.randn(64, generator=g) * 0.1
    calls = []
    counted = moe.rank_desc
    monkeypatch.setattr(moe, "rank_desc", lambda x: calls.append(torch.compiler.is_compiling()) or counted(x))

    def f(x):
        r = route(x, bias, c)
        return r.idx_TK, r.weight_TK

    torch._dynamo.reset()
    idx_c, w_c = torch.compile(f, fullgraph=True)(logits)
    idx_e, w_e = f(logits)
    assert calls and all(calls)          # ranks were counted while tracing, never in the eager call
    assert torch.equal(idx_c, idx_e)
    assert torch.allclose(w_c, w_e, rtol=1e-6, atol=0)


def test_rank_desc_orders_like_a_stable_descending_sort():
    x = torch.tensor([[0.5, 2.0, 0.5, -1.0, 2.0, float("-inf")]])
    assert rank_desc(x).tolist() == [[2, 0, 3, 4, 1, 5]]
    y = torch.randn(7, 3, 9)
    expect = torch.empty_like(y, dtype=torch.long).scatter_(
        -1, y.sort(dim=-1, descending=True, stable=True).indices, torch.arange(9).expand(7, 3, 9).contiguous())
    assert torch.equal(rank_desc(y), expect)


def test_grouped_experts_equal_loop_reference_forward_and_grad():
    m = random_model(cfg())
    ids = torch.randint(0, 61, (3, 11), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 61, (3, 11), generator=torch.Generator().manual_seed(2))
    results = []
    for loop in (False, True):
        for moe in m.moe_layers():
            moe.experts.use_loop_reference = loop
        m.zero_grad()
        out = m(ids, labels)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, rtol=1e-6)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-5, atol=1e-7), n


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_grouped_swiglu_input_one_dgrad_matches_autograd(device):
    """_GroupedSwiGLUInput (gate, up and SiLU product; one input-gradient GEMM) against autograd through two
    grouped_linear calls and F.silu, including an expert with no rows. fp32 on the CPU: equal up to summation
    order. bf16 on CUDA: both against the fp32 per-segment reference, the fused error no larger than autograd's."""
    from dsv3.model import moe
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if not moe._grouped_mm_ok(torch.empty(1, device=device, dtype=dtype)):
        pytest.skip("no torch._grouped_mm for this device/dtype")
    g = torch.Generator().manual_seed(3)
    M, D, F_, E = 96, 64, 32, 4
    ends = torch.tensor([16, 16, 64, 96], dtype=torch.int32, device=device)
    inputs = [torch.randn(M, D, generator=g)] + [torch.randn(*s, generator=g) * 0.2
                                                   for s in ((E, F_, D), (E, F_, D), (E, D, F_))]
    cot = torch.randn(M, D, generator=g).to(device)

    def run(dt, fused):
        leaves = [t.to(device, dt).requires_grad_(True) for t in inputs]
        before, moe.FUSED_GATE_UP_DGRAD = moe.FUSED_GATE_UP_DGRAD, fused
        try:
            y = moe.grouped_swiglu(*leaves, moe.grouped_linear, ends, None)
        finally:
            moe.FUSED_GATE_UP_DGRAD = before
        return [y] + list(torch.autograd.grad(y, leaves, cot.to(dt)))

    fused, plain = run(dtype, True), run(dtype, False)
    names = ["y", "dx", "dwg", "dwu", "dwd"]
    assert fused[1][:16].abs().sum() > 0 and fused[2][1].abs().sum() == 0       # rows seen; the empty expert
    if dtype == torch.float32:
        for name, a, b in zip(names, fused, plain):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
        return
    ref = run(torch.float32, False)            # fp32 on CUDA: grouped_linear's per-segment F.linear loop

    def err(a, r):
        return float((a.float() - r).norm() / r.norm())
    for name, a, b, r in zip(names, fused, plain, ref):
        assert err(a, r) <= 1.5 * err(b, r) + 1e-3 and err(a, r) < 2e-2, (name, err(a, r), err(b, r))


@pytest.mark.parametrize("kernels", [True, False], ids=["custom-ops", "inductor-exprs"])
def test_combine_copies_matches_gather_then_weighted_sum(kernels, monkeypatch):
    """combine_copies (the un-permute + weighted sum of the grouped path) against autograd through the plain
    gather and sum, forward and both gradients; backward by the custom op and by the plain torch expressions."""
    from dsv3.model import moe
    from dsv3.model.moe import combine_copies, sort_copies
    monkeypatch.setattr(moe, "PERMUTE_KERNELS", kernels)
    g = torch.Generator().manual_seed(4)
    T, K, D, E = 13, 3, 8, 5
    idx = torch.randint(0, E, (T, K), generator=g)
    order, inverse, _ = sort_copies(idx, E)
    y = torch.randn(T * K, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, K, generator=g, dtype=torch.float64, requires_grad=True)
    out = combine_copies(y, inverse, w)
    ref = (y[inverse].view(T, K, D) * w[..., None]).sum(dim=1)
    cot = torch.randn(T, D, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, (y, w), cot)
    want = torch.autograd.grad(ref, (y, w), cot)
    # the sum runs in fp32 whatever y's dtype (as in training), hence fp32 tolerances against float64
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


def test_absorbed_decode_equals_naive():
    c = cfg(rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=16))
    m = random_model(c).eval()
    ids = torch.randint(0, 61, (2, 14), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = m(ids).logits
        outs = {}
        for kind in ("latent", "naive"):
            cache = KVCache(c, 2, 32, kind=kind)
            steps = [m(ids[:, :8], cache=cache).logits]  # prefill
            for t in range(8, 14):                        # incremental decode, one token at a time
                steps.append(m(ids[:, t:t + 1], cache=cache).logits)
            outs[kind] = torch.cat(steps, dim=1)
    for kind, o in outs.items():
        err = ((o - full).norm() / full.norm()).item()
        assert err <= 1e-5, (kind, err)
    assert ((outs["latent"] - outs["naive"]).norm() / outs["naive"].norm()).item() <= 1e-5
    assert KVCache(preset("v3"), 1, 1, kind="latent", device="meta").values_per_token() == 576
    assert KVCache(preset("v3"), 1, 1, kind="naive", device="meta").values_per_token() == 40960


def test_counts_only_in_training_forwards_and_once_under_recompute():
    m = random_model(cfg())
    ids = torch.randint(0, 61, (2, 10))
    m.eval()
    with torch.no_grad():
        out = m(ids)
    assert all(moe.tokens_per_expert.sum() == 0 for moe in m.moe_layers())
    m.train()
    K = m.config.num_experts_per_tok
    for mode in ("none", "full", "selective"):
        for moe in m.moe_layers():
            moe.tokens_per_expert.zero_()
        m.set_recompute(mode)
        out = m(ids, ids)
        out.loss.backward()
        for moe, c in zip(m.moe_layers(), out.expert_counts):
            assert moe.tokens_per_expert.sum().item() == 20 * K, mode  # one count per token copy
            assert torch.equal(moe.tokens_per_expert, c)


def test_recompute_modes_give_identical_gradients():
    m = random_model(cfg())
    ids = torch.randint(0, 61, (2, 10))
    grads = []
    for mode in ("none", "selective", "full"):
        m.set_recompute(mode)
        m.zero_grad()
        m(ids, ids, balance_alpha=1e-2).loss.backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for g in grads[1:]:
        for a, b in zip(grads[0], g):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_mtp_loss_by_hand():
    """Depth 1 predicts t_{i+2} from [enorm(Emb(t_{i+1})) ; hnorm(h_i)]: recompute it outside the model."""
    m = random_model(cfg()).eval()
    toks = torch.randint(0, 61, (2, 13))
    ids, labels = toks[:, :-1], toks[:, 1:]
    with torch.no_grad():
        out = m(ids, labels)
        h0 = out.hidden  # post-norm by default
        layer = m.mtp[0]
        z = layer.eh_proj(torch.cat([layer.enorm(m.embed_tokens(toks[:, 1:12])), layer.hnorm(h0[:, :11])], -1))
        cos, sin = m.rotary(torch.arange(11))
        hk, _, _ = layer(z, cos, sin)
        logits = m.lm_head(layer.shared_head.norm(hk))
        ref = F.cross_entropy(logits.reshape(-1, 61), toks[:, 2:13].reshape(-1))
    # the last position has no t_{i+2}; positions 0..10 see the same causal prefix in both computations
    assert torch.allclose(out.losses["mtp_1"], ref, rtol=1e-5)
    assert torch.allclose(out.loss, out.losses["main"] + 0.3 * out.losses["mtp_1"], rtol=1e-6)


def test_document_mask_isolates_documents_and_mtp_shifts():
    m = random_model(cfg()).eval()
    a = torch.randint(0, 61, (1, 7))
    b = torch.randint(0, 61, (1, 5))
    packed = torch.cat([a, b], 1)
    doc = torch.tensor([[0] * 7 + [1] * 5])
    with torch.no_grad():
        together = m(packed, doc_ids=doc).logits
        alone_b = m(b).logits
    assert torch.allclose(together[:, 7:], alone_b, rtol=1e-5, atol=1e-5)
    from dsv3.model import mtp_shift
    nxt, tgt = mtp_shift(packed, packed, 1, doc)
    assert (tgt[0, 6] == -100) and (tgt[0, 5] != -100) and (tgt[0, 11] == -100)


def test_sequence_balance_loss_formula():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(2, 5, 6, generator=g)
    got = sequence_balance_loss(s, 2)
    total = 0.0
    for b in range(2):
        f = [0.0] * 6
        for t in range(5):
            for e in s[b, t].topk(2).indices.tolist():
                f[e] += 6 / (2 * 5)
        P = [(s[b, :, e] / s[b].sum(-1)).mean().item() for e in range(6)]
        total += sum(fi * pi for fi, pi in zip(f, P))
    assert got.item() == pytest.approx(total / 2, rel=1e-6)


def test_v3_preset_counts_and_meta_construction():
    import tracemalloc
    tracemalloc.start()
    with torch.device("meta"):
        m = DeepseekV3(preset("v3"))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 200 * 2**20  # module objects only: 671B parameters would be >1 TB
    assert all(p.is_meta for p in m.parameters())
    assert m.num_parameters(include_mtp=False) == 671_026_419_200
    assert m.num_parameters(include_mtp=True) == 684_489_845_504
    assert m.num_activated_parameters(include_embedding=True) == 37_552_297_472
    assert m.num_activated_parameters(include_embedding=False) == 36_625_618_432
    with torch.device("meta"):
        lite = DeepseekV3(preset("v2-lite"))
    assert lite.num_parameters() == 15_706_484_224
    assert lite.num_activated_parameters() == 2_661_150_208


def test_padded_labels_never_become_mtp_input_ids():
    """The loader pads with -100; MTP takes its input tokens from labels, so padding must map to a valid id."""
    m = random_model(cfg()).train()
    ids = torch.randint(0, 61, (2, 8))
    labels = ids.roll(-1, 1)
    labels[:, -3:] = -100
    out = m(ids, labels)
    assert torch.isfinite(out.loss)
    from dsv3.model import mtp_shift
    nxt, tgt = mtp_shift(ids, labels, 1, None)
    assert (nxt >= 0).all() and (tgt[:, -4:] == -100).all()


@pytest.mark.parametrize("kernels", [True, False], ids=["custom-ops", "inductor-exprs"])
def test_gather_copies_gradient_is_the_sum_of_each_tokens_copies(kernels, monkeypatch):
    from dsv3.model import moe
    from dsv3.model.moe import _GatherCopies
    monkeypatch.setattr(moe, "PERMUTE_KERNELS", kernels)
    g = torch.Generator().manual_seed(0)
    T, K, D = 7, 3, 5
    x = torch.randn(T, D, generator=g, requires_grad=True)
    order = torch.randperm(T * K, generator=g)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(T * K))
    y = _GatherCopies.apply(x, order, inverse, K)
    assert torch.equal(y, x.detach()[order // K])
    w = torch.randn(T * K, D, generator=g)
    (y * w).sum().backward()
    ref = torch.zeros(T, D).index_add_(0, order // K, w)
    assert torch.allclose(x.grad, ref, atol=1e-6)
