"""`dsv3 plan`: the cost calculator's command line.

`dsv3 plan MODEL` (parameters, FLOPs, KV cache) is the default sub-verb; `memory`, `decode`, `pipeline`,
`network` and `cost` answer the other questions. Each sub-verb is one ``_add_*`` function (its parser) and one
``_run_*`` function (its computation -> sections); a new one (e.g. a step-time simulator `step`) is one more
pair and one line in ``SUBVERBS``.
"""
from __future__ import annotations

import argparse
import dataclasses

from dsv3.errors import UserError
from dsv3.plan import comm, flops, kvcache, memory, network, pipeline, throughput
from dsv3.plan.models import is_dense, load_model
from dsv3.plan.params import COMPONENTS, count_params
from dsv3.plan.report import Section, emit

MODEL_HELP = ("a preset (tiny, small, v2-lite, v3, moonlight-16b-a3b), a TOML run config with a [model] table, "
              "or a Hugging Face config.json (DeepSeek, or dense Llama/Qwen GQA) or its directory")


class _DefaultVerbAction(argparse._SubParsersAction):
    """Sub-parsers where an unknown first word is the MODEL of the default sub-verb (`dsv3 plan v3`)."""

    default_verb = "model"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse checks the first word against ``choices`` before calling us; accept anything and route here.
        self.choices = None

    def __call__(self, parser, namespace, values, option_string=None):
        if values and values[0] not in self._name_parser_map:
            values = [self.default_verb, *values]
        super().__call__(parser, namespace, values, option_string)


def _positive(kind):
    def parse(text: str):
        try:
            v = kind(float(text)) if kind is int and "e" in text.lower() else kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
        return v
    return parse


POS_INT, POS_FLOAT = _positive(int), _positive(float)


def register(subparsers) -> None:
    """Add `plan` and its sub-verbs to the `dsv3` parser."""
    p = subparsers.add_parser(
        "plan", help="cost calculator: parameters, FLOPs, KV cache, memory, pipeline, decode limit, network, cost",
        description="Answer sizing questions on paper. `dsv3 plan MODEL` prints parameters, training FLOPs and KV "
                    "cache; the sub-verbs below take their own flags (`dsv3 plan SUBVERB --help`). MODEL is "
                    + MODEL_HELP + ".",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_epilog())
    p.register("action", "parsers", _DefaultVerbAction)
    sub = p.add_subparsers(dest="plan_verb", metavar="{MODEL," + ",".join(n for n, _ in SUBVERBS if n != "model") + "}")
    for name, add in SUBVERBS:
        add(sub)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _epilog() -> str:
    return "\n".join([
        "examples:",
        "  dsv3 plan v3 --seq-len 4096                      parameters, FLOPs/token, KV cache",
        "  dsv3 plan v3 --compare tests/data/qwen2.5-72b.json  KV-cache ratio against a dense model",
        "  dsv3 plan memory v3 --gpus 2048 --pp 16 --ep 64 --schedule dualpipe --gpu-mem 80",
        "  dsv3 plan pipeline --pp 16 --f 1 --b 2 --w 1",
        "  dsv3 plan decode v3 --bandwidth 50 --hidden 7000",
        "  dsv3 plan network --ports 64",
        "  dsv3 plan cost --gpus 2048 --tokens-per-day 272.8e9 --flops-per-token 250e9 --table1",
        "every sub-verb takes --json for machine-readable output.",
    ])


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def _wrap(run):
    """Run a sub-verb; library ValueErrors are user errors (bad flag combinations)."""
    def func(args: argparse.Namespace) -> int:
        try:
            sections = run(args)
        except ValueError as e:
            raise UserError(f"dsv3 plan {args.plan_verb}: {e}") from None
        emit(sections, args.json)
        return 0
    return func


# --------------------------------------------------------------------------------------------- model
def _add_model(sub) -> None:
    p = sub.add_parser("model", help="(default) parameters, training FLOPs per token and KV cache of MODEL",
                       description="Parameters (per component, with the convention printed), training FLOPs per "
                                   "token (causal and non-causal) and KV cache of MODEL.")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--seq-len", type=POS_INT, default=4096, help="sequence length for attention FLOPs (default 4096)")
    p.add_argument("--context", type=POS_INT, default=32768, help="tokens per request for the KV-cache total "
                   "(default 32768)")
    p.add_argument("--compare", nargs="*", default=[], metavar="MODEL",
                   help="other models whose KV cache per token is shown as a multiple of MODEL's")
    _common(p)
    p.set_defaults(func=_wrap(_run_model))


def _run_model(args) -> list[Section]:
    cfg, label = load_model(args.model)
    pc = count_params(cfg)
    params = [(k, v) for k, v in pc.conventions().items()]
    params += [(f"component {c} (total / activated)", f"{pc.total[c]:,} / {pc.activated[c]:,}") for c in COMPONENTS]
    fl = []
    for conv, note in (("matmul", "6 x activated matmul params"), ("params", "6 x activated params w/o input emb")):
        for causal in (True, False):
            t = flops.training_flops_per_token(cfg, args.seq_len, causal, conv)
            fl.append((f"GFLOPs/token, {'causal' if causal else 'non-causal'}, {note}", t.total / 1e9))
    t = flops.training_flops_per_token(cfg, args.seq_len, True)
    fl += [("  of which matmul GFLOPs", t.matmul / 1e9), ("  of which attention GFLOPs (causal)", t.attention / 1e9),
           ("sequence length", args.seq_len)]
    kv = []
    forms = ("absorbed",) if is_dense(cfg) else kvcache.FORMS
    for form in forms:
        for dt in ("bf16", "fp8"):
            name = "GQA/MHA" if is_dense(cfg) else f"MLA {form}"
            kv.append((f"{name} {dt.upper()} bytes/token", kvcache.kv_bytes_per_token(cfg, dt, form)))
    kv.append((f"BF16 bytes/request at {args.context:,} tokens", kvcache.kv_bytes_per_request(cfg, args.context)))
    base = kvcache.kv_bytes_per_token(cfg)
    for other in args.compare:
        ocfg, olabel = load_model(other)
        ob = kvcache.kv_bytes_per_token(ocfg)
        kv.append((f"{olabel} BF16 bytes/token (x {label})", f"{ob:,} ({ob / base:.2f}x)"))
    return [(f"{label}: parameters", params), (f"{label}: training FLOPs per token (forward+backward)", fl),
            (f"{label}: KV cache (main-model layers)", kv)]


# -------------------------------------------------------------------------------------------- memory
def _add_memory(sub) -> None:
    p = sub.add_parser("memory", help="memory per GPU for a training layout; what fits a GPU",
                       description="Memory per GPU of the worst pipeline stage for a training layout "
                                   "(no tensor parallelism; EP inside the data-parallel group; ZeRO-1).")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--gpus", type=POS_INT, default=1, help="total GPUs (default 1)")
    p.add_argument("--pp", type=POS_INT, default=1, help="pipeline stages (default 1)")
    p.add_argument("--ep", type=POS_INT, default=1, help="expert-parallel ranks, dividing gpus/pp (default 1)")
    p.add_argument("--micro-batch", type=POS_INT, default=1, help="sequences per micro-batch (default 1)")
    p.add_argument("--seq-len", type=POS_INT, default=4096, help="tokens per sequence (default 4096)")
    p.add_argument("--schedule", choices=pipeline.SCHEDULES, default="dualpipe",
                   help="pipeline schedule: sets parameter and activation multiples (default dualpipe)")
    p.add_argument("--recompute", choices=memory.RECOMPUTE, default="selective",
                   help="none; selective (V3: norms and MLA up-projections); full (layer inputs only)")
    p.add_argument("--recipe", choices=("v3", "bf16", "fp32"), default="v3",
                   help="v3: FP32 master, BF16 weights, FP32 grads, BF16 moments, FP8 Linear inputs; "
                        "bf16: FP32 moments and BF16 activations; fp32: everything FP32 (default v3)")
    p.add_argument("--weights", choices=("bf16", "fp8", "fp32"), help="override the recipe's weight dtype")
    p.add_argument("--no-zero1", action="store_true", help="do not shard optimizer state over data parallel")
    p.add_argument("--attention", choices=memory.ATTENTION, default="flash",
                   help="flash keeps O(seq) per head; eager keeps the seq x seq probabilities (default flash)")
    p.add_argument("--gpu-mem", type=POS_FLOAT, metavar="GIB",
                   help="GPU memory in GiB: also report the largest micro-batch and depth that fit")
    _common(p)
    p.set_defaults(func=_wrap(_run_memory))


def _run_memory(args) -> list[Section]:
    cfg, label = load_model(args.model)
    if is_dense(cfg):
        raise ValueError("memory plans need a DeepSeek-family (MLA/MoE) model, not a dense config")
    layout = memory.Layout(gpus=args.gpus, pp=args.pp, ep=args.ep, micro_batch=args.micro_batch,
                           seq_len=args.seq_len, zero1=not args.no_zero1, recompute=args.recompute,
                           schedule=args.schedule, attention=args.attention)
    recipe = memory.Recipe.named(args.recipe)
    if args.weights:
        recipe = dataclasses.replace(recipe, weights=args.weights)
    stages = memory.memory_per_gpu(cfg, layout, recipe)
    worst = max(stages, key=lambda s: s.total)
    rows = [("layout", f"{args.gpus} GPUs = PP {args.pp} x DP {layout.dp}; EP {args.ep}; ZeRO-1 {layout.zero1}"),
            ("worst stage", f"{worst.stage} ({worst.layers} layers)"), ("parameters on the GPU", worst.params)]
    rows += [(f"{k} GiB", memory.gib(v)) for k, v in worst.parts.items()]
    rows.append(("total GiB", memory.gib(worst.total)))
    rows += [(f"stage {s.stage} total GiB", memory.gib(s.total)) for s in stages] if len(stages) <= 16 else []
    if args.gpu_mem:
        budget = args.gpu_mem * memory.GIB
        rows += [(f"fits {args.gpu_mem:g} GiB", worst.total <= budget),
                 ("largest micro-batch that fits", memory.max_micro_batch(cfg, layout, recipe, budget)),
                 ("deepest model that fits (layers)", memory.max_layers(cfg, layout, recipe, budget))]
    return [(f"{label}: memory per GPU ({args.schedule}, recompute {args.recompute}, recipe {args.recipe})", rows)]


# ------------------------------------------------------------------------------------------ pipeline
def _add_pipeline(sub) -> None:
    p = sub.add_parser("pipeline", help="bubble and memory multiples of 1F1B, ZB1P, DualPipe (V3 Table 2)",
                       description="Pipeline bubbles and per-device parameter/activation multiples (V3 report, "
                                   "Table 2). Times are in any unit; F forward chunk, B full backward chunk, "
                                   "W weight-backward chunk, F&B an overlapped forward+backward pair.")
    p.add_argument("--pp", type=POS_INT, required=True, help="pipeline stages")
    p.add_argument("--f", type=POS_FLOAT, default=1.0, help="forward chunk time (default 1)")
    p.add_argument("--b", type=POS_FLOAT, default=2.0, help="full backward chunk time (default 2)")
    p.add_argument("--w", type=float, default=1.0, help="weight-backward chunk time, <= B (default 1)")
    p.add_argument("--fb", type=POS_FLOAT, help="overlapped forward+backward pair time (default F+B)")
    p.add_argument("--micro-batches", type=POS_INT, help="micro-batches per step, for the bubble fraction")
    _common(p)
    p.set_defaults(func=_wrap(_run_pipeline))


def _run_pipeline(args) -> list[Section]:
    out = []
    for s in pipeline.SCHEDULES:
        if s == "dualpipe" and args.pp % 2:
            out.append((f"{s}, PP {args.pp}", [("available", "no: DualPipe needs an even PP")]))
            continue
        c = pipeline.schedule_cost(s, args.pp, args.f, args.b, args.w, args.fb)
        m = args.micro_batches or c.min_micro_batches
        out.append((f"{s}, PP {args.pp}", [("bubble", c.bubble), ("parameters per device (x)", c.param_multiple),
                                           ("activations held (micro-batches of a stage)", c.activation_multiple),
                                           ("micro-batches needed", c.micro_batch_rule),
                                           (f"bubble fraction at {m} micro-batches", c.bubble_fraction(m, args.f, args.b))]))
    return out


# -------------------------------------------------------------------------------------------- decode
def _add_decode(sub) -> None:
    p = sub.add_parser("decode", help="EP traffic per token and the decode speed limit for a link bandwidth",
                       description="Expert-parallel bytes per token per MoE layer and the communication-bound "
                                   "time per output token (Insights paper 2.3.2: dual micro-batch overlap, "
                                   "computation hidden, latency ignored).")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--bandwidth", type=POS_FLOAT, required=True, metavar="GBPS",
                   help="per-device EP bandwidth in GB/s (CX7 400G IB ~ 50; NVL72 ~ 900)")
    p.add_argument("--tokens-per-device", type=POS_INT, default=32, help="tokens each device processes (default 32)")
    p.add_argument("--experts-per-token", type=POS_INT, help="destinations per token (default routed top-k + shared)")
    p.add_argument("--hidden", type=POS_INT, help="values per token sent (default hidden_size; the paper uses 7000)")
    p.add_argument("--layers", type=POS_INT, help="layers per token (default num_hidden_layers)")
    p.add_argument("--dispatch-bytes", type=POS_FLOAT, default=1.0, help="bytes per dispatched value (FP8: 1)")
    p.add_argument("--combine-bytes", type=POS_FLOAT, default=2.0, help="bytes per combined value (BF16: 2)")
    p.add_argument("--nodes", type=POS_INT, default=8, help="nodes in the EP group, for node-limited traffic "
                   "(default 8)")
    _common(p)
    p.set_defaults(func=_wrap(_run_decode))


def _run_decode(args) -> list[Section]:
    cfg, label = load_model(args.model)
    if is_dense(cfg):
        raise ValueError("decode limits need an MoE model, not a dense config")
    hidden = args.hidden or cfg.hidden_size
    k = args.experts_per_token or cfg.num_experts_per_tok + cfg.n_shared_experts
    lim = comm.decode_limit(hidden, args.layers or cfg.num_hidden_layers, args.bandwidth, args.tokens_per_device, k,
                            args.dispatch_bytes, args.combine_bytes)
    tr = comm.ep_traffic(dataclasses.replace(cfg, hidden_size=hidden), args.nodes, True, args.dispatch_bytes,
                         args.combine_bytes)
    return [(f"{label}: decode speed limit at {args.bandwidth:g} GB/s", [
        ("EP step (dispatch+combine) us", lim.ep_step_s * 1e6), ("per layer (2 micro-batches) us", lim.layer_s * 1e6),
        ("time per output token ms", lim.token_s * 1e3), ("tokens/s upper bound", lim.tokens_per_s)]),
        (f"{label}: EP traffic per token per MoE layer ({args.nodes} nodes, node-limited)", [
            ("nodes reached over IB", tr.nodes_reached), ("IB bytes", tr.scale_out_bytes),
            ("NVLink bytes (forwarded to experts)", tr.scale_up_bytes)])]


# ------------------------------------------------------------------------------------------- network
def _add_network(sub) -> None:
    p = sub.add_parser("network", help="endpoints, switches, links and cost of FT2, MPFT, FT3, Slim Fly, Dragonfly",
                       description="Topologies built from k-port switches (Insights paper, Table 3). Links are "
                                   "switch-to-switch cables.")
    p.add_argument("--ports", type=POS_INT, default=64, help="ports per switch (default 64)")
    p.add_argument("--planes", type=POS_INT, default=8, help="planes of the multi-plane fat tree (default 8)")
    p.add_argument("--dragonfly-groups", type=POS_INT, help="groups (default a*h+1; the paper's table used 511)")
    p.add_argument("--switch-price", type=float, default=network.DEFAULT_SWITCH_PRICE, help="$ per switch")
    p.add_argument("--link-price", type=float, default=network.DEFAULT_LINK_PRICE, help="$ per link")
    _common(p)
    p.set_defaults(func=_wrap(_run_network))


def _run_network(args) -> list[Section]:
    if args.switch_price < 0 or args.link_price < 0:
        raise ValueError("prices must be >= 0")
    out = []
    for t in network.all_topologies(args.ports, args.planes, args.dragonfly_groups):
        rows = [("endpoints", t.endpoints), ("switches", t.switches), ("links", t.links),
                ("cost $M", t.cost(args.switch_price, args.link_price) / 1e6),
                ("cost per endpoint $k", t.cost_per_endpoint(args.switch_price, args.link_price) / 1e3)]
        if t.note:
            rows.append(("note", t.note))
        out.append((f"{t.name} ({args.ports}-port switches)", rows))
    return out


# ---------------------------------------------------------------------------------------------- cost
def _add_cost(sub) -> None:
    p = sub.add_parser("cost", help="tokens/day <-> tokens/s/GPU <-> TFLOPS <-> MFU <-> GPU hours <-> $",
                       description="Convert one measured rate into the others, and GPU hours into money. Give "
                                   "exactly one of --tokens-per-day, --tokens-per-s, --mfu (or none with --table1).")
    p.add_argument("model", metavar="MODEL", nargs="?", help="for FLOPs/token (or give --flops-per-token); " + MODEL_HELP)
    p.add_argument("--gpus", type=POS_INT, default=2048, help="GPUs (default 2048)")
    p.add_argument("--seq-len", type=POS_INT, default=4096, help="sequence length for FLOPs/token (default 4096)")
    p.add_argument("--non-causal", action="store_true", help="count the full attention matrix (Megatron convention)")
    p.add_argument("--flops-per-token", type=POS_FLOAT, help="training FLOPs per token (overrides MODEL)")
    p.add_argument("--peak-tflops", type=POS_FLOAT, default=989.0, help="dense BF16 peak per GPU (H800/H100: 989)")
    p.add_argument("--tokens-per-day", type=POS_FLOAT, help="cluster tokens per day")
    p.add_argument("--tokens-per-s", type=POS_FLOAT, help="tokens per second per GPU")
    p.add_argument("--mfu", type=POS_FLOAT, help="model FLOPs utilization, a fraction (0.39) or percent (39)")
    p.add_argument("--train-tokens", type=POS_FLOAT, help="tokens to train: adds GPU hours, days and cost")
    p.add_argument("--price", type=float, default=2.0, help="$ per GPU hour (default 2, the V3 report's)")
    p.add_argument("--table1", action="store_true", help="add the V3 report's Table 1 GPU-hour budget")
    _common(p)
    p.set_defaults(func=_wrap(_run_cost))


def _run_cost(args) -> list[Section]:
    if args.price < 0:
        raise ValueError("--price must be >= 0")
    out: list[Section] = []
    given = [x for x in (args.tokens_per_day, args.tokens_per_s, args.mfu) if x is not None]
    if len(given) > 1:
        raise ValueError("give only one of --tokens-per-day, --tokens-per-s, --mfu")
    if given:
        fpt = args.flops_per_token
        if fpt is None:
            if not args.model:
                raise ValueError("pass MODEL or --flops-per-token to convert a rate")
            cfg, _ = load_model(args.model)
            fpt = flops.training_flops_per_token(cfg, args.seq_len, not args.non_causal).total
        if args.tokens_per_day:
            tp = throughput.from_tokens_per_day(args.tokens_per_day, args.gpus, fpt, args.peak_tflops)
        elif args.tokens_per_s:
            tp = throughput.Throughput(args.tokens_per_s, fpt, args.gpus, args.peak_tflops)
        else:
            tp = throughput.from_mfu(args.mfu / 100 if args.mfu > 1 else args.mfu, args.gpus, fpt, args.peak_tflops)
        rows = [("GPUs", args.gpus), ("GFLOPs per token", fpt / 1e9), ("tokens/day (B)", tp.tokens_per_day / 1e9),
                ("tokens/s/GPU", tp.tokens_per_s_per_gpu), ("TFLOPS per GPU", tp.tflops_per_gpu),
                (f"MFU of {args.peak_tflops:g} TFLOPS (%)", 100 * tp.mfu)]
        if args.train_tokens:
            hours = tp.gpu_hours(args.train_tokens)
            rows += [("GPU hours", hours), ("days", tp.days(args.train_tokens)), ("cost $", hours * args.price)]
        out.append(("throughput", rows))
    if args.table1:
        lines = throughput.budget(throughput.V3_TABLE1_GPU_HOURS, args.price)
        rows = [(f"{l.stage}: GPU hours / $", f"{l.gpu_hours:,.0f} / {l.cost:,.0f}") for l in lines]
        rows += [("total GPU hours", sum(l.gpu_hours for l in lines)), ("total $", sum(l.cost for l in lines))]
        out.append((f"DeepSeek-V3 report Table 1 at ${args.price:g}/GPU hour", rows))
    if not out:
        raise ValueError("nothing to compute: give --tokens-per-day, --tokens-per-s or --mfu, or --table1")
    return out


from dsv3.plan import step as _step  # noqa: E402  (the step simulator's sub-verb lives in step.py)

SUBVERBS = [("model", _add_model), ("memory", _add_memory), ("pipeline", _add_pipeline), ("decode", _add_decode),
            ("network", _add_network), ("cost", _add_cost), ("step", _step.add_parser)]
