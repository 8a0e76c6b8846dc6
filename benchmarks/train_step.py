"""One BF16 training step, side by side: dsv3 vs Hugging Face transformers vs torchtitan 0.2.2, same model.

For each config the three models are built with identical weights (ours exported through the HF layout, then
loaded into transformers and, via torchtitan's own state-dict adapter, into torchtitan), the first losses on
the same batch are compared, then forward+backward+fused-AdamW steps are timed at the same batch and sequence
length. MFU uses the model FLOPs of design.md section 5 against the bf16 GEMM rate measured in the same run.

    PYTHONPATH=src python3 benchmarks/train_step.py --configs small,819m,3b --out results.json

Ours only, BF16 against FP8 (issue #6), each with blocks compiled in the default mode and as CUDA graphs:

    PYTHONPATH=src python3 benchmarks/train_step.py --configs small,v3w --peers none --fp8 --cudagraphs

(``v3w``: V3's own layer widths in three layers, where FP8's GEMMs are as large as in V3.)

torchtitan 0.2.2 needs its wheel (and tomli, tyro, typeguard, docstring_parser, shtab, torchdata) on the path;
its package imports `datasets`, which a stub stands in for when absent. Peers are skipped when missing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from dsv3.config import ModelConfig, preset  # noqa: E402
from dsv3.model import DeepseekV3  # noqa: E402
from dsv3.plan.flops import training_flops_per_token  # noqa: E402

DEVICE = "cuda"  # --device cpu runs a smoke test of the weight plumbing (timings meaningless)
OURS_OPTIMIZER = "dsv3"  # --ours-optimizer
AB_FLAGS: list[str] = []  # --ab
FB_OVERLAP = 0  # --fb-overlap N
COMPILE_OPTIONS: dict = {}  # Inductor options of ours' compiled blocks (an --ab inductor.NAME variant sets one)
CUDAGRAPHS = False  # --cudagraphs: also time ours (BF16 and, with --fp8, FP8) with blocks in 'reduce-overhead'


def sync():
    """The compute stream's work done (every peer runs its step on the one stream; ours with --fb-overlap
    joins its side streams back into it)."""
    if DEVICE == "cuda":
        torch.cuda.current_stream().synchronize()


def bench_configs() -> dict[str, tuple[ModelConfig, int, int]]:
    """name -> (config, batch, seq). MTP off: the peers have none (ours with MTP is timed separately)."""
    small = preset("small").replace(num_nextn_predict_layers=0)
    c819 = ModelConfig(vocab_size=32768, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
                       num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=1,
                       n_routed_experts=64, num_experts_per_tok=6, n_group=1, topk_group=1, first_k_dense_replace=1,
                       q_lora_rank=None, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                       routed_scaling_factor=1.0, rope_scaling=None, max_position_embeddings=2048,
                       num_nextn_predict_layers=0, initializer_range=0.02)
    c3b = ModelConfig(vocab_size=65536, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1024,
                      num_hidden_layers=10, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=1,
                      n_routed_experts=48, num_experts_per_tok=6, n_group=1, topk_group=1, first_k_dense_replace=1,
                      q_lora_rank=512, kv_lora_rank=256, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                      routed_scaling_factor=1.0, rope_scaling=None, max_position_embeddings=4096,
                      num_nextn_predict_layers=0, initializer_range=0.02)
    # V3's own widths (d 7168, experts of 2048 top-8, 128 heads, q/kv LoRA 1536/512, dense FFN 18432) in three
    # layers (one dense, two MoE of 32 experts) that fit one GPU: where FP8's larger GEMMs are (issue #6)
    v3w = preset("v3").replace(num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=32, n_group=1,
                               topk_group=1, num_nextn_predict_layers=0, vocab_size=32768, rope_scaling=None,
                               max_position_embeddings=4096)
    return {"small": (small, 4, 4096), "819m": (c819, 8, 2048), "3b": (c3b, 4, 4096), "v3w": (v3w, 2, 4096)}


def dsv3_switch(flag: str):
    """(module, attribute name) of an ``--ab`` switch: NAME of dsv3.model.moe, or MODULE.NAME of dsv3.MODULE
    (e.g. kernels.cross_entropy.GEMM_ACCUMULATES, fp8.triton_quant.PAIRED_LAUNCH)."""
    import importlib
    module_path, name = flag.rsplit(".", 1) if "." in flag else ("model.moe", flag)
    return importlib.import_module("dsv3." + module_path), name


def set_switches(spec: str, short: bool = False):
    """Apply one ``--ab`` variant: SWITCH (a bool, flipped) or SWITCH=VALUE (True/False or a string such as
    kernels.gather_gemm.B_LOADS=tma), several joined by '+' for one run with all of them. Returns (label, restore);
    ``short`` labels each switch by its attribute name alone."""
    undo, parts = [], []
    for item in spec.split("+"):
        name, has_value, value = item.partition("=")
        module, attr = dsv3_switch(name)
        old = getattr(module, attr)
        new = ({"True": True, "False": False}.get(value, value)) if has_value else not old
        setattr(module, attr, new)
        undo.append((module, attr, old))
        parts.append(f"{attr if short else name}={new}")

    def restore():
        for module, attr, old in reversed(undo):
            setattr(module, attr, old)
    return "+".join(parts), restore


def free_cudagraph_pools() -> None:
    """Give back the memory pools of every CUDA-graph tree (session 20: 21 GiB of them, still held after the
    cudagraphs run, left torchtitan out of memory on 3.2B)."""
    import gc
    torch._dynamo.reset()
    try:
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees
        reset_cudagraph_trees()
    except ImportError:
        pass
    gc.collect()
    torch.cuda.empty_cache()


def measure_gemm_peak() -> float:
    """bf16 8192^3 matmul TFLOP/s on random data (median of 20 after warm-up)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); a @ b; e.record(); torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    return 2 * 8192**3 / times[len(times) // 2] / 1e12


def torch_adamw(params):
    """The peers' optimizer: torch's fused AdamW (bf16 weights keep bf16 moments)."""
    return torch.optim.AdamW(params, lr=1e-5, fused=True)


def dsv3_adamw(params):
    """Ours: the same AdamW update (torch's defaults, bf16 moments as torch keeps for bf16 weights) in one Triton
    pass per tensor (dsv3.kernels.adamw; the trainer's train.bf16_moments optimizer)."""
    from dsv3.train.optim import AdamWLowPrecisionMoments
    return AdamWLowPrecisionMoments(params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                                    moment_dtype=torch.bfloat16)


def time_steps(model, loss_fn, x, steps: int, warmup: int = 3, make_opt=torch_adamw, fwd_bwd=None,
               scope=None) -> dict:
    """Median step time (and the fastest and slowest) over `steps` timed steps of forward+backward+optimizer
    step. ``fwd_bwd(model, x)``, when given, runs the forward and backward itself (e.g. over micro-batches)
    and returns the step's loss.
    ``scope()``: a context around each step's forward and backward (ours in FP8: the trainer's weight cache)."""
    from contextlib import nullcontext
    scope = scope or nullcontext
    opt = make_opt(model.parameters())
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        sync()
        t = time.perf_counter()
        torch.compiler.cudagraph_mark_step_begin()  # a new replay generation per step (no-op without graphs)
        with scope():
            if fwd_bwd is None:
                loss = loss_fn(model, x)
                loss.backward()
            else:
                loss = fwd_bwd(model, x)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    times.sort()
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0
    # the spread of the timed steps beside the median: whether a 1% ratio is signal or step-to-step noise
    return {"step_s": times[len(times) // 2], "step_s_min": times[0], "step_s_max": times[-1], "peak_gib": peak,
            "last_loss": float(loss)}


# ------------------------------------------------------------------------------------------------ ours
def build_ours(cfg: ModelConfig, compile_blocks: bool, recompute: str = "none", fp8: bool = False,
               mode: str = "default"):
    torch.manual_seed(0)
    with torch.device(DEVICE):
        m = DeepseekV3(cfg)
    m = m.to(torch.bfloat16 if DEVICE == "cuda" else torch.float32)
    m.set_recompute(recompute)
    if fp8:  # the paper's recipe: attention projections, MLPs and routed experts in FP8 block scaling
        from dsv3.fp8.recipe import FP8Recipe, convert_to_fp8
        convert_to_fp8(m, FP8Recipe())
    if compile_blocks and mode != "default":  # as dsv3 train's train.compile_mode
        from dsv3.train.compile_blocks import compile_blocks as compile_as_trainer
        compile_as_trainer(list(m.layers) + list(m.mtp), mode)
    elif compile_blocks:
        for layer in list(m.layers) + list(m.mtp):
            layer.compile(options=dict(COMPILE_OPTIONS) or None)
    return m


def fp8_scope(mode: str):
    """The trainer's per-step scope for an FP8 model compiled in ``mode`` (dsv3.fp8.weight_cache.step_scope):
    each weight quantized once per step, except under CUDA graphs."""
    from dsv3.fp8.weight_cache import step_scope
    from dsv3.train.config import CUDAGRAPH_MODES
    return lambda: step_scope("fp8", mode in CUDAGRAPH_MODES)


def ours_loss(model, x):
    labels = torch.roll(x, -1, dims=1)
    labels[:, -1] = -100
    return model(x, labels, return_logits=False).losses["main"]


def ours_loss_mtp(model, x):
    labels = torch.roll(x, -1, dims=1)
    labels[:, -1] = -100
    return model(x, labels, return_logits=False).loss


# ------------------------------------------------------------------------------------------- transformers
def build_hf(cfg: ModelConfig, ours_sd: dict, S: int):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    hf_cfg = DeepseekV3Config(**{k: v for k, v in cfg.to_hf_dict().items()
                                 if k not in ("architectures", "model_type", "rope_scaling")})
    hf_cfg.max_position_embeddings = max(S, cfg.max_position_embeddings)
    impl = "grouped_mm"
    try:
        hf_cfg._experts_implementation = impl
    except Exception:
        impl = "eager"
    hf_cfg._attn_implementation = "sdpa"
    with torch.device(DEVICE):
        m = DeepseekV3ForCausalLM(hf_cfg)
    m = m.to(torch.bfloat16 if DEVICE == "cuda" else torch.float32)
    target = m.state_dict()
    sd = {}
    for k, v in ours_sd.items():
        if k.startswith("mtp."):
            continue
        hk = k if k.startswith("lm_head.") else "model." + k
        if hk.endswith("mlp.experts.gate_proj") and hk.replace("gate_proj", "gate_up_proj") in target:
            up = ours_sd[k.replace("gate_proj", "up_proj")]
            sd[hk.replace("gate_proj", "gate_up_proj")] = torch.cat([v, up], dim=1)
        elif hk.endswith("mlp.experts.up_proj") and hk.replace("up_proj", "gate_up_proj") in target:
            continue
        elif ".mlp.experts." in hk and hk not in target:  # per-expert layout
            proj = hk.rsplit(".", 1)[1]
            base = hk.rsplit(".", 1)[0]
            for e in range(v.shape[0]):
                sd[f"{base}.{e}.{proj}.weight"] = v[e]
        else:
            sd[hk] = v
    missing, unexpected = m.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "rotary" not in k]
    return m, impl, missing, unexpected


def hf_loss(model, x):
    return model(input_ids=x, labels=x).loss


# --------------------------------------------------------------------------------------------- torchtitan
def _stub_datasets():
    if "datasets" in sys.modules:
        return
    try:
        import datasets  # noqa: F401
        return
    except Exception:
        pass
    stub = types.ModuleType("datasets")
    for n in ["Dataset", "IterableDataset", "load_dataset", "interleave_datasets"]:
        setattr(stub, n, type(n, (), {}) if n[0].isupper() else (lambda *a, **k: None))
    dd = types.ModuleType("datasets.distributed")
    dd.split_dataset_by_node = lambda *a, **k: None
    sys.modules["datasets"] = stub
    sys.modules["datasets.distributed"] = dd


def build_titan(cfg: ModelConfig, hf_sd: dict, S: int, compile_blocks: bool):
    _stub_datasets()
    from torchtitan.models.deepseek_v3.model.args import DeepSeekV3ModelArgs
    from torchtitan.models.deepseek_v3.model.model import DeepSeekV3Model
    from torchtitan.models.deepseek_v3.model.state_dict_adapter import DeepSeekV3StateDictAdapter
    from torchtitan.models.moe import MoEArgs

    groups = dict(num_expert_groups=cfg.n_group, num_limited_groups=cfg.topk_group) if cfg.n_group > 1 else {}
    moe = MoEArgs(num_experts=cfg.n_routed_experts, num_shared_experts=cfg.n_shared_experts,
                  top_k=cfg.num_experts_per_tok, score_func="sigmoid", route_norm=True,
                  route_scale=cfg.routed_scaling_factor, use_grouped_mm=True, load_balance_coeff=1e-3,
                  score_before_experts=False, **groups)
    args = DeepSeekV3ModelArgs(vocab_size=cfg.vocab_size, dim=cfg.hidden_size, inter_dim=cfg.intermediate_size,
                               moe_inter_dim=cfg.moe_intermediate_size, n_layers=cfg.num_hidden_layers,
                               n_dense_layers=cfg.first_k_dense_replace, n_heads=cfg.num_attention_heads,
                               moe_args=moe, q_lora_rank=cfg.q_lora_rank or 0, kv_lora_rank=cfg.kv_lora_rank,
                               qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
                               v_head_dim=cfg.v_head_dim, max_seq_len=S, norm_eps=cfg.rms_norm_eps)
    args.moe_impl = "standard"
    with torch.device(DEVICE):
        m = DeepSeekV3Model(args)
    with torch.no_grad():
        m.init_weights(buffer_device=torch.device(DEVICE))
    sd = DeepSeekV3StateDictAdapter(args, None).from_hf(hf_sd)
    missing, unexpected = m.load_state_dict(sd, strict=False)
    m = m.to(torch.bfloat16 if DEVICE == "cuda" else torch.float32)
    if compile_blocks:
        for i, blk in m.layers.items():
            m.layers[i] = torch.compile(blk, fullgraph=False)
    return m, [k for k in missing if "freqs_cis" not in k and "tokens_per_expert" not in k], unexpected


def titan_loss(model, x):
    logits = model(x)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())


# ----------------------------------------------------------------------------------------------- driver
def overlapped_fwd_bwd(n: int, streams):
    """The step's batch as ``n`` equal micro-batches, each forward beside the previous backward on two CUDA
    streams (``dsv3.train.overlap``, the trainer's ``parallel.fb_overlap``); the loss is the same token mean."""
    from dsv3.train import overlap

    def step(model, x):
        losses = []

        def backward(i, mb, loss):
            (loss / n).backward()
            losses.append(loss.detach())

        overlap.accumulate(list(x.chunk(n)), lambda i, mb: ours_loss(model, mb), backward, streams)
        return torch.stack(losses).mean()
    return step


def run_config(name: str, cfg: ModelConfig, B: int, S: int, peak: float, steps: int, peers: list[str],
               profile_dir: str | None, fp8: bool = False) -> dict:
    from dsv3.hf import to_hf_state_dict

    flops_tok = training_flops_per_token(cfg, S, causal=True).total
    x = torch.randint(0, cfg.vocab_size, (B, S), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    res = {"config": name, "batch": B, "seq": S, "model_gflop_per_token": flops_tok / 1e9, "runs": {}}

    def record(label, out, first_loss):
        tok_s = B * S / out["step_s"]
        out.update(tokens_per_s=tok_s, mfu=tok_s * flops_tok / (peak * 1e12), first_loss=first_loss)
        res["runs"][label] = out
        print(f"[{name}] {label:28s} {tok_s:>10,.0f} tok/s  MFU {out['mfu']*100:5.1f}%  step {out['step_s']*1e3:7.1f} ms"
              f"  peak {out['peak_gib']:5.1f} GiB  first loss {first_loss:.4f}", flush=True)

    # ours, eager weights kept for the peers
    ours = build_ours(cfg, compile_blocks=False)
    ours_sd = {k: v.detach().clone() for k, v in ours.state_dict().items()}
    # torchtitan loads the HF layout (transformers takes ours' own state dict); not kept without it (v3w's weights)
    hf_sd = {k: v for k, v in to_hf_state_dict(ours).items()} if "torchtitan" in peers else None
    with torch.no_grad():
        ours_first = float(ours_loss(ours, x))
    del ours
    torch.cuda.empty_cache()
    for compiled in (DEVICE == "cuda",):
        m = build_ours(cfg, compile_blocks=compiled)
        m.load_state_dict(ours_sd)
        ours_opt = dsv3_adamw if (DEVICE == "cuda" and OURS_OPTIMIZER == "dsv3") else torch_adamw
        out = time_steps(m, ours_loss, x, steps, make_opt=ours_opt)
        out["optimizer"] = OURS_OPTIMIZER if DEVICE == "cuda" else "torch"
        record("ours" + (" compiled" if compiled else " eager"), out, ours_first)
        res["runs"]["ours compiled"] = res["runs"].pop(list(res["runs"])[-1])
        if DEVICE == "cuda" and OURS_OPTIMIZER == "dsv3":
            # the same compiled model with the peers' optimizer: what the Triton AdamW alone is worth
            m.load_state_dict(ours_sd)
            out = time_steps(m, ours_loss, x, steps, make_opt=torch_adamw)
            out["optimizer"] = "torch"
            record("ours compiled + torch AdamW", out, ours_first)
        if profile_dir and compiled:
            profile(m, ours_loss, x, os.path.join(profile_dir, f"profile-{name}.txt"), make_opt=ours_opt)
        if FB_OVERLAP > 1 and B % FB_OVERLAP == 0:
            # the same batch as FB_OVERLAP micro-batches with forward/backward overlap (same tokens per step;
            # on the CPU smoke test the plain loop)
            m.load_state_dict(ours_sd)
            streams = (torch.cuda.Stream(), torch.cuda.Stream()) if DEVICE == "cuda" else None
            out = time_steps(m, ours_loss, x, steps, make_opt=ours_opt,
                             fwd_bwd=overlapped_fwd_bwd(FB_OVERLAP, streams))
            out["optimizer"] = OURS_OPTIMIZER
            record(f"ours compiled, fb_overlap x{FB_OVERLAP}", out, ours_first)
        del m
        torch.cuda.empty_cache()
        for flag in ([f for f in AB_FLAGS if not f.startswith("fp8.")] if compiled else ()):
            # the same step with one of moe's switches flipped (e.g. PERMUTE_KERNELS off: the MoE's backward
            # passes over the token copies left to Inductor): what that piece is worth, same run
            if flag.startswith("inductor."):     # an Inductor option of ours' blocks, e.g. coordinate_descent_tuning
                import torch._inductor.config as inductor_config
                option = flag.split(".", 1)[1]
                default = bool(getattr(inductor_config, option))
                COMPILE_OPTIONS[option] = not default
                label = f"{flag}={not default}"
            else:
                label, restore = set_switches(flag)
            torch._dynamo.reset()
            try:
                m = build_ours(cfg, compile_blocks=True)
                m.load_state_dict(ours_sd)
                out = time_steps(m, ours_loss, x, steps, make_opt=ours_opt)
                out["optimizer"] = OURS_OPTIMIZER
                record(f"ours compiled, {label}", out, ours_first)
                del m
                torch.cuda.empty_cache()
            except Exception as e:  # a switch's failure (a kernel new to the GPU) must not end the other runs
                import traceback
                traceback.print_exc(limit=6)
                res["runs"][f"ab_error {flag}"] = repr(e)[:400]
                m = None    # noqa: F841 (its memory back before the next run)
                torch.cuda.empty_cache()
            finally:
                if flag.startswith("inductor."):
                    COMPILE_OPTIONS.clear()
                else:
                    restore()
                torch._dynamo.reset()

    if CUDAGRAPHS and DEVICE == "cuda":
        # the same step with every block a CUDA graph (dsv3 train's compile_mode = 'reduce-overhead'): what the
        # host's launch time costs the default mode
        torch._dynamo.reset()
        try:
            m = build_ours(cfg, compile_blocks=True, mode="reduce-overhead")
            m.load_state_dict(ours_sd)
            out = time_steps(m, ours_loss, x, steps, make_opt=ours_opt)
            out["optimizer"] = OURS_OPTIMIZER
            record("ours compiled, cudagraphs", out, ours_first)
            del m
        except Exception as e:
            import traceback
            traceback.print_exc(limit=6)
            res["runs"]["cudagraphs_error"] = repr(e)[:400]
        free_cudagraph_pools()
    if fp8:  # the same model and weights with the FP8 recipe (issue #6's full-step speedup)
        # (compiled, mode, BF16 run compared with, switch flipped); eager only if the compiled default fails.
        # A switch is an --ab fp8.MODULE.NAME of dsv3.fp8 (e.g. fp8.triton_quant.PAIRED_LAUNCH), flipped for one
        # more compiled run: what it is worth, same run, same BF16 step to divide by
        variants = [(True, "default", "ours compiled", None)] if DEVICE == "cuda" else \
            [(False, "default", "ours eager", None)]
        if CUDAGRAPHS and DEVICE == "cuda":
            variants.append((True, "reduce-overhead", "ours compiled, cudagraphs", None))
        if DEVICE == "cuda":
            variants += [(True, "default", "ours compiled", f) for f in AB_FLAGS if f.startswith("fp8.")]
        for compiled, mode, bf16_label, flag in variants:
            label = "ours fp8" + (" compiled" if compiled else " eager") + (", cudagraphs" if mode != "default" else "")
            if flag:
                switched, restore = set_switches(flag, short=True)
                label += f", {switched}"
            torch._dynamo.reset()
            try:
                m = build_ours(cfg, compile_blocks=compiled, fp8=True, mode=mode)
                m.load_state_dict(ours_sd, strict=False)
                with torch.no_grad():
                    first = float(ours_loss(m, x))
                out = time_steps(m, ours_loss, x, steps, make_opt=ours_opt, scope=fp8_scope(mode))
                bf16 = res["runs"].get(bf16_label) or res["runs"].get("ours compiled") or res["runs"]["ours eager"]
                out["fp8_speedup"] = bf16["step_s"] / out["step_s"]
                out["fp8_speedup_over"] = bf16_label
                record(label, out, first)
                print(f"[{name}] {label}: step speedup over {bf16_label}: {out['fp8_speedup']:.3f}x", flush=True)
                if profile_dir and compiled and not flag:  # where the FP8 step's time goes, beside the BF16 profile
                    tag = "-fp8" + ("-cudagraphs" if mode != "default" else "")
                    profile(m, ours_loss, x, os.path.join(profile_dir, f"profile-{name}{tag}.txt"), make_opt=ours_opt,
                            scope=fp8_scope(mode))
                del m
                if mode != "default":
                    free_cudagraph_pools()
                else:
                    torch.cuda.empty_cache()
            except Exception as e:
                import traceback
                traceback.print_exc(limit=6)
                res["runs"][f"fp8_error {label}"] = repr(e)[:400]
                torch.cuda.empty_cache()
                if compiled and mode == "default" and not flag:
                    variants.append((False, "default", "ours compiled", None))
            finally:
                if flag:
                    restore()
                    torch._dynamo.reset()
    if "transformers" in peers:
        try:
            m, impl, missing, unexpected = build_hf(cfg, ours_sd, S)
            assert not missing and not unexpected, (missing[:3], unexpected[:3])
            with torch.no_grad():
                first = float(hf_loss(m, x))
            out = time_steps(m, hf_loss, x, steps)
            out["experts_implementation"] = impl
            record(f"transformers ({impl})", out, first)
            del m
        except Exception as e:  # a peer failing must not hide the others
            print(f"[{name}] transformers failed: {e!r}"[:400], flush=True)
            res["runs"]["transformers_error"] = repr(e)[:400]
        torch.cuda.empty_cache()
    if "torchtitan" in peers:
        for compiled in (DEVICE == "cuda",):
            try:
                m, missing, unexpected = build_titan(cfg, hf_sd, S, compiled)
                assert not missing, missing[:3]
                with torch.no_grad():
                    first = float(titan_loss(m, x))
                out = time_steps(m, titan_loss, x, steps)
                record("torchtitan" + (" compiled" if compiled else " eager"), out, first)
                del m
            except Exception as e:
                import traceback
                traceback.print_exc(limit=4)
                res["runs"]["torchtitan_error"] = repr(e)[:400]
            torch.cuda.empty_cache()
    ours_tok = res["runs"]["ours compiled"]["tokens_per_s"]
    # ours' opt-in variants (fb_overlap) against each peer too, beside the headline ratio
    variants = {label: r["tokens_per_s"] for label, r in res["runs"].items()
                if isinstance(r, dict) and label.startswith("ours compiled, ")
                and ("overlap" in label or "cudagraphs" in label)}
    for label, r in res["runs"].items():
        if isinstance(r, dict) and label != "ours compiled" and not label.startswith("ours fp8"):
            r["ours_over_peer"] = ours_tok / r["tokens_per_s"]
            r["first_loss_rel_diff"] = abs(r["first_loss"] - ours_first) / ours_first
            line = f"[{name}] ours / {label}: {r['ours_over_peer']:.2f}x"
            if variants and not label.startswith("ours"):
                r["ours_variants_over_peer"] = {v: tok / r["tokens_per_s"] for v, tok in variants.items()}
                line += "".join(f" ({v.removeprefix('ours compiled, ')}: {x:.2f}x)"
                                for v, x in r["ours_variants_over_peer"].items())
            print(f"{line}   first-loss rel diff {r['first_loss_rel_diff']:.2e}", flush=True)
    return res


def profile(model, loss_fn, x, path, make_opt=torch_adamw, scope=None):
    from contextlib import nullcontext

    from torch.profiler import ProfilerActivity, profile as prof
    opt = make_opt(model.parameters())
    torch.compiler.cudagraph_mark_step_begin()
    with (scope or nullcontext)():
        loss_fn(model, x).backward()     # one step outside the window: the optimizer's state exists before it
    opt.step()
    opt.zero_grad(set_to_none=True)
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(2):
            torch.compiler.cudagraph_mark_step_begin()
            with (scope or nullcontext)():
                loss_fn(model, x).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    table = p.key_averages().table(sort_by="cuda_time_total", row_limit=60)
    with open(path, "w") as f:
        f.write(table)
    print(table[:6000], flush=True)
    # the GPU timeline of the same two steps: busy/idle and kernel time by kind (dsv3.train.profiling)
    from dsv3.train.profiling import summarize_trace
    trace = path.rsplit(".", 1)[0] + ".trace.json"
    p.export_chrome_trace(trace)
    summary = summarize_trace(trace)
    with open(path.rsplit(".", 1)[0] + ".summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: summary[k] for k in ("window_ms", "busy_ms", "idle_ms", "kernel_ms")}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="small,819m,3b")
    ap.add_argument("--peers", default="transformers,torchtitan")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default=None, help="JSON file for the results")
    ap.add_argument("--profile-dir", default=None)
    ap.add_argument("--batch", type=int, default=None, help="override the batch of every config")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seq", type=int, default=None, help="override the sequence length of every config")
    ap.add_argument("--fp8", action="store_true", help="also time ours with the FP8 recipe (same weights)")
    ap.add_argument("--cudagraphs", action="store_true",
                    help="also time ours (and ours in FP8 with --fp8) with its blocks compiled in 'reduce-overhead' "
                         "(CUDA graphs), as dsv3 train's compile_mode = 'reduce-overhead'")
    ap.add_argument("--ours-optimizer", choices=("dsv3", "torch"), default="dsv3",
                    help="ours with dsv3's Triton AdamW (default; also timed with torch's) or torch's fused AdamW")
    ap.add_argument("--ab", default="", help="comma-separated switches of dsv3.model.moe (PERMUTE_KERNELS, "
                    "FUSED_GATE_UP_DGRAD), MODULE.NAME of another dsv3 module (e.g. kernels.cross_entropy.GEMM_ACCUMULATES) "
                    "or NAME=VALUE (e.g. kernels.gather_gemm.B_LOADS=tma), several joined by '+' for one run, "
                    "or inductor.OPTION (e.g. inductor.coordinate_descent_tuning): also time "
                    "ours with each one flipped from its default, same run; with --fp8, fp8.MODULE.NAME (e.g. "
                    "fp8.triton_quant.PAIRED_LAUNCH) flips a switch of dsv3.fp8 in an extra compiled FP8 run")
    ap.add_argument("--fb-overlap", type=int, default=0, metavar="N",
                    help="also time ours with the batch as N micro-batches, each forward beside the previous "
                         "backward on two CUDA streams (dsv3 train's parallel.fb_overlap); same tokens per step")
    args = ap.parse_args()
    global DEVICE, OURS_OPTIMIZER, AB_FLAGS, FB_OVERLAP, CUDAGRAPHS
    CUDAGRAPHS = args.cudagraphs
    FB_OVERLAP = args.fb_overlap
    AB_FLAGS = [f for f in args.ab.split(",") if f]
    DEVICE = args.device
    OURS_OPTIMIZER = args.ours_optimizer
    torch._dynamo.config.cache_size_limit = 64
    peak = measure_gemm_peak() if DEVICE == "cuda" else 1.0
    dev_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"device {dev_name}  torch {torch.__version__}  bf16 GEMM peak {peak:.0f} TFLOP/s", flush=True)
    results = {"device": dev_name, "torch": torch.__version__, "peak_tflops_measured": peak,
               "configs": []}
    for name in args.configs.split(","):
        cfg, B, S = bench_configs()[name]
        B = args.batch or B
        S = args.seq or S
        results["configs"].append(run_config(name, cfg, B, S, peak, args.steps, args.peers.split(","),
                                             args.profile_dir, args.fp8))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
