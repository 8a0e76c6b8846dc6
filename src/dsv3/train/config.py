"""Run configuration: the [model], [train], [data] (and reserved [parallel]) sections of a TOML file.

Every key has a default and a one-line doc (the comment after it in the dataclass, collected by
``config_help``), so ``dsv3 train --help-config`` is generated from this file and can never drift from it.
The defaults ARE the embedded default run: the tiny preset on the stdlib corpus, a few CPU minutes.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dsv3.config import ModelConfig, preset
from dsv3.errors import UserError

FP8_FAMILIES = {"attention", "mlp", "experts"}
PRECISIONS = ("bf16", "fp32", "fp8")
WEIGHT_CASTS = ("auto", "per_step", "per_use")   # train.weight_cast (dsv3.train.compute_weights)
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")   # torch.compile modes that replay CUDA graphs
COMPILE_MODES = ("default", *CUDAGRAPH_MODES, "max-autotune-no-cudagraphs")
DEVICES_HINT = "'auto', 'cpu', 'cuda' or 'cuda:N'"
SECTIONS = ("model", "train", "data", "parallel")


@dataclass
class TrainConfig:
    """Optimization, schedules, logging and checkpointing."""

    steps: int = 240                      # optimizer steps of the whole run (schedules are fractions of it)
    seq_len: int = 256                    # tokens per sequence
    batch_size: int = 16                  # global sequences per optimizer step (after the ramp)
    micro_batch_size: int = 0             # sequences per forward/backward; 0 = batch_size (no accumulation)
    batch_ramp_start: int = 0             # first batch size of the ramp (b0); 0 = no ramp
    batch_ramp_steps: int = 0             # ramp b0 -> batch_size linearly over this many steps ...
    batch_ramp_tokens: int = 0            # ... or over this many tokens (used when > 0)
    lr: float = 2e-3                      # peak learning rate
    min_lr_ratio: float = 0.1             # end of cosine decay and constant tail, as a fraction of lr
    warmup_steps: int = 20                # linear warmup from lr/warmup_steps to lr
    decay_start: float = 0.6              # fraction of steps where the cosine decay starts (constant before)
    decay_end: float = 0.9                # fraction of steps where it ends (constant tail after)
    beta1: float = 0.9                    # AdamW beta1
    beta2: float = 0.95                   # AdamW beta2
    eps: float = 1e-8                     # AdamW epsilon
    weight_decay: float = 0.1             # AdamW decoupled weight decay
    decay_norms: bool = False             # also decay norm weights and biases
    decay_embeddings: bool = False        # also decay the input embedding
    bf16_moments: bool = False            # keep AdamW exp_avg / exp_avg_sq in bf16 (master weights stay fp32)
    grad_clip: float = 1.0                # clip the global grad norm to this; 0 = off
    mtp_lambda: float = 0.3               # MTP loss weight early in training
    mtp_lambda_late: float = 0.1          # MTP loss weight after mtp_lambda_switch
    mtp_lambda_switch: float = 0.7        # fraction of steps after which mtp_lambda_late applies
    bias_gamma: float = 0.001             # aux-loss-free balance bias update speed
    bias_gamma_off: float = 0.95          # fraction of steps after which the bias is frozen (gamma = 0)
    balance_alpha: float = 1e-4           # sequence-wise balance loss weight; 0 = off
    precision: str = "bf16"               # 'bf16' (autocast on CUDA; on CPU fp32, or bf16 autocast with weight_cast 'per_step'), 'fp32', or 'fp8' (V3's block-scaled FP8 GEMMs, bf16 elsewhere)
    weight_cast: str = "auto"             # with precision 'bf16': 'per_step' (autocast's weight casts done once per optimizer step into bf16 copies of the GEMM weights and head; same numerics as per_use; embedding, norms, router and masters stay fp32; runs under bf16 autocast on the CPU too), 'per_use' (autocast casts at every use), 'auto' (per_step on CUDA, else per_use)
    fp8_modules: str = "attention,mlp,experts"  # with precision 'fp8': which GEMM families run in FP8 (comma-separated)
    fp8_backend: str = "auto"             # FP8 GEMM kernels: 'auto' (fastest available), 'reference' (dequantize + fp32 matmul, for checking)
    device: str = "auto"                  # 'auto' (cuda if available), 'cpu', 'cuda', 'cuda:N'
    compile: bool = False                 # torch.compile each transformer block
    compile_mode: str = "default"         # with compile: torch.compile's mode; 'reduce-overhead' (CUDA graphs) is experimental (dsv3.train.compile_blocks)
    recompute: str = "none"               # activation recomputation: 'none', 'selective', 'full'
    seed: int = 0                         # seeds weights, data order and every RNG
    deterministic: bool = True            # on the CPU, use deterministic kernels (bit-reproducible runs)
    log_every: int = 10                   # print a progress line every N steps (metrics.jsonl gets every step)
    eval_every: int = 0                   # evaluate every N steps; 0 = only at the end
    eval_batches: int = 8                 # validation batches per evaluation
    save_every: int = 100                 # checkpoint every N steps (and always at the end)
    save_final: bool = True               # checkpoint a run that completed train.steps (false: benchmarks that need no checkpoint; a stopped run still saves)
    keep_checkpoints: int = 2             # keep the last N checkpoints
    expert_load_every: int = 10           # log per-layer expert counts to expert_load.jsonl every N steps
    max_nan_skips: int = 5                # stop after this many non-finite losses in a row
    stop_at: int = 0                 # end this invocation after this step, with a checkpoint (0 = run to steps); schedules still span steps
    time_limit_min: float = 0.0           # end this invocation after the step that passes N minutes of training, with a checkpoint (0 = none)
    peak_tflops: float = 0.0              # MFU denominator; 0 = measure a GEMM at start
    tensorboard: bool = True              # write TensorBoard events to RUN_DIR/tb (if installed)
    profile_step: int = 0                 # run this step under torch.profiler on every rank: RUN_DIR/profile/rank{r}.txt (top kernels) and .json (Chrome trace); 0 = off
    sample_tokens: int = 64               # tokens of the greedy sample printed at the end; 0 = none
    gc_every: int = 0                     # N > 0: Python's automatic garbage collection off while training, one collection every N steps at the same step on every rank (experimental: not faster on 2 x H200 EP=2); 0 = automatic

    def fp8_families(self) -> set[str]:
        """The GEMM families ``fp8_modules`` names (validated in ``RunConfig.check``)."""
        return {f.strip() for f in self.fp8_modules.split(",") if f.strip()}


@dataclass
class DataConfig:
    """Where the tokens come from."""

    path: str = ""                        # prepared data dir (`dsv3 prepare`); '' = build the stdlib corpus
    document_mask: bool = False           # block-diagonal attention per document (paper: off)
    prefetch: int = 2                     # batches built ahead by a background thread
    verify: bool = True                   # hash every shard when opening (catches corruption)


@dataclass
class RunConfig:
    """A resolved run: model config (preset + overrides applied), train and data sections."""

    model: ModelConfig = field(default_factory=lambda: preset("tiny"))
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: dict = field(default_factory=dict)   # the [parallel] table (dsv3.parallel.mesh.ParallelConfig)
    model_spec: dict = field(default_factory=lambda: {"preset": "tiny"})  # as written: preset + overrides

    def to_dict(self) -> dict:
        return {"model": self.model.to_dict(), "model_spec": self.model_spec,
                "train": dataclasses.asdict(self.train), "data": dataclasses.asdict(self.data),
                "parallel": self.parallel}

    @classmethod
    def from_saved(cls, d: dict) -> "RunConfig":
        """Read the resolved form written by ``to_dict`` (a run's config.json). Runs written by earlier versions
        still resume: keys since retired are dropped (``RETIRED_TRAIN_KEYS``), and a run saved before
        ``parallel.ep_dispatch`` existed keeps the dispatch it trained with ("alltoall"), and one saved before
        ``train.weight_cast`` existed the weight casts it trained with ("per_use"), so that its resume is
        exact; new runs save the keys (``resolve``, the TrainConfig default)."""
        train = {k: v for k, v in d.get("train", {}).items() if k not in RETIRED_TRAIN_KEYS}
        train.setdefault("weight_cast", "per_use")   # saved before it existed: trained with autocast's casts
        parallel = dict(d.get("parallel", {}))
        parallel.setdefault("ep_dispatch", "alltoall")
        return cls(model=ModelConfig.from_dict(d["model"], strict=True, where="model"),
                   train=_section(TrainConfig, train, "train"),
                   data=_section(DataConfig, d.get("data", {}), "data"),
                   parallel=parallel, model_spec=dict(d.get("model_spec", {})))

    def validate(self) -> "RunConfig":
        t = self.train
        for name in ("steps", "seq_len", "batch_size"):
            if getattr(t, name) < 1:
                raise UserError(f"train.{name} = {getattr(t, name)} is invalid: it must be >= 1")
        for name in ("micro_batch_size", "batch_ramp_start", "batch_ramp_steps", "batch_ramp_tokens",
                     "warmup_steps", "eval_every", "eval_batches", "expert_load_every", "sample_tokens",
                     "profile_step", "gc_every"):
            if getattr(t, name) < 0:
                raise UserError(f"train.{name} = {getattr(t, name)} is invalid: it must be >= 0")
        for name in ("log_every", "save_every", "keep_checkpoints", "max_nan_skips"):
            if getattr(t, name) < 1:
                raise UserError(f"train.{name} = {getattr(t, name)} is invalid: it must be >= 1")
        mb = t.micro_batch_size or t.batch_size
        if t.batch_size % mb:
            raise UserError(f"train.batch_size = {t.batch_size} is not a multiple of train.micro_batch_size = "
                            f"{mb}; change one of them")
        if t.batch_ramp_start and (t.batch_ramp_start > t.batch_size or t.batch_ramp_start % mb):
            raise UserError(f"train.batch_ramp_start = {t.batch_ramp_start} must be <= batch_size and a multiple "
                            f"of micro_batch_size ({mb}); change it or set 0 for no ramp")
        if not 0.0 <= t.decay_start <= t.decay_end <= 1.0:
            raise UserError(f"train.decay_start = {t.decay_start} and train.decay_end = {t.decay_end} must satisfy "
                            "0 <= decay_start <= decay_end <= 1 (fractions of train.steps)")
        for name in ("mtp_lambda_switch", "bias_gamma_off", "min_lr_ratio"):
            if not 0.0 <= getattr(t, name) <= 1.0:
                raise UserError(f"train.{name} = {getattr(t, name)} is invalid: it must be in [0, 1]")
        for name in ("lr", "eps"):
            if getattr(t, name) <= 0:
                raise UserError(f"train.{name} = {getattr(t, name)} is invalid: it must be > 0")
        for name in ("weight_decay", "grad_clip", "mtp_lambda", "mtp_lambda_late", "bias_gamma", "balance_alpha",
                     "peak_tflops"):
            if getattr(t, name) < 0:
                raise UserError(f"train.{name} = {getattr(t, name)} is invalid: it must be >= 0")
        if not (0 <= t.beta1 < 1 and 0 <= t.beta2 < 1):
            raise UserError(f"train.beta1/beta2 = {t.beta1}/{t.beta2} are invalid: each must be in [0, 1)")
        if t.precision not in PRECISIONS:
            hint = ""
            raise UserError(f"train.precision = {t.precision!r} is invalid{hint}: use one of "
                            f"{', '.join(repr(p) for p in PRECISIONS)}")
        if t.weight_cast not in WEIGHT_CASTS:
            raise UserError(f"train.weight_cast = {t.weight_cast!r} is invalid: use one of "
                            f"{', '.join(repr(w) for w in WEIGHT_CASTS)}")
        if t.weight_cast == "per_step" and t.precision != "bf16":
            why = ("FP8 quantizes the fp32 master weights once per step itself" if t.precision == "fp8"
                   else "fp32 computes with the fp32 weights")
            raise UserError(f"train.weight_cast = 'per_step' needs train.precision = 'bf16', not {t.precision!r} "
                            f"({why}); set train.weight_cast = 'auto' or 'per_use'")
        fams = t.fp8_families()
        if not fams or fams - FP8_FAMILIES:
            raise UserError(f"train.fp8_modules = {t.fp8_modules!r} is invalid: use a comma-separated subset of "
                            f"{', '.join(sorted(FP8_FAMILIES))}")
        if t.fp8_backend not in ("auto", "reference"):
            raise UserError(f"train.fp8_backend = {t.fp8_backend!r} is invalid: use 'auto' or 'reference'")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device):
            raise UserError(f"train.device = {t.device!r} is invalid: use {DEVICES_HINT}")
        if t.compile_mode not in COMPILE_MODES:
            raise UserError(f"train.compile_mode = {t.compile_mode!r} is invalid: use one of "
                            f"{', '.join(repr(m) for m in COMPILE_MODES)}")
        if t.recompute not in ("none", "selective", "full"):
            raise UserError(f"train.recompute = {t.recompute!r} is invalid: use 'none', 'selective' or 'full'")
        if t.seq_len > self.model.max_position_embeddings:
            raise UserError(f"train.seq_len = {t.seq_len} exceeds model.max_position_embeddings = "
                            f"{self.model.max_position_embeddings}; lower seq_len or raise the model's limit")
        if self.data.prefetch < 0:
            raise UserError(f"data.prefetch = {self.data.prefetch} is invalid: it must be >= 0")
        if self.parallel.get("ep_dispatch") == "allgather" and t.precision == "fp8" and "experts" in fams:
            from dsv3.parallel.expert_parallel import allgather_unsupported
            raise UserError(allgather_unsupported(False, 1, True))   # before any process group starts
        return self


# ----------------------------------------------------------------------------- parsing

def _type_name(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else f.type.__name__


def _coerce(value: Any, type_name: str, where: str) -> Any:
    """Check a TOML value against a field type (ints are accepted for floats)."""
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "bool": isinstance(value, bool),
          "str": isinstance(value, str)}.get(type_name, True)
    if not ok:
        example = {"int": "200", "float": "0.001", "bool": "true", "str": '"text"'}[type_name]
        raise UserError(f"{where} = {value!r} has the wrong type: expected {type_name} (e.g. {where.split('.')[-1]} "
                        f"= {example})")
    return float(value) if type_name == "float" else value


# train keys that config.json files of earlier versions hold and this one no longer has (dropped on resume):
# optimizer_overlap (2026-11-26, sessions 10-11; removed: no gain measured)
RETIRED_TRAIN_KEYS = ("optimizer_overlap",)


def _section(cls, d: dict, where: str):
    """Build a section dataclass from a dict, rejecting unknown keys and wrong types."""
    if not isinstance(d, dict):
        raise UserError(f"[{where}] must be a table of key = value pairs")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for k, v in d.items():
        if k not in known:
            raise UserError(f"unknown key {where}.{k}: valid keys are {', '.join(known)} "
                            "(see `dsv3 train --help-config`)")
        kwargs[k] = _coerce(v, _type_name(known[k]), f"{where}.{k}")
    return cls(**kwargs)


def _model(spec: dict) -> ModelConfig:
    spec = dict(spec)
    name = spec.pop("preset", "tiny")
    if not isinstance(name, str):
        raise UserError(f"model.preset = {name!r} has the wrong type: expected a preset name such as \"tiny\"")
    base = preset(name).to_dict()
    base.update(spec)
    return ModelConfig.from_dict(base, strict=True, where="model")


def parse_value(text: str) -> Any:
    """A --set value as a TOML literal (200, 0.1, true, "x", [1, 2]); bare words are taken as strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings to a raw (TOML-shaped) config dict, in order."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r} is not of the form section.key=value (e.g. --set train.steps=200)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or parts[0] not in SECTIONS:
            raise UserError(f"--set {item!r}: the key must start with a section, one of {', '.join(SECTIONS)} "
                            "(e.g. --set train.steps=200)")
        node = raw.setdefault(parts[0], {})
        for p in parts[1:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = parse_value(text.strip())
    return raw


def load_toml(path: str | Path) -> dict:
    """Read a config file; a missing or malformed file is a UserError naming it."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist; pass an existing file (e.g. configs/tiny.toml)") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path} is not valid TOML ({e}); fix the syntax") from None


def resolve(raw: dict) -> RunConfig:
    """Turn a TOML-shaped dict (sections of key = value) into a validated RunConfig."""
    unknown = [k for k in raw if k not in SECTIONS]
    if unknown:
        raise UserError(f"unknown section [{unknown[0]}]: valid sections are {', '.join(SECTIONS)}")
    model_spec = dict(raw.get("model", {}) or {})
    if "preset" not in model_spec:
        model_spec = {"preset": "tiny", **model_spec}
    from dsv3.parallel.mesh import ParallelConfig

    parallel = dict(raw.get("parallel", {}) or {})
    ParallelConfig.from_dict(parallel)  # unknown keys and wrong types fail here, naming the key
    # saved in config.json, so a resume keeps the dispatch a run started with (RunConfig.from_saved)
    parallel.setdefault("ep_dispatch", ParallelConfig.ep_dispatch)
    cfg = RunConfig(model=_model(model_spec), train=_section(TrainConfig, raw.get("train", {}), "train"),
                    data=_section(DataConfig, raw.get("data", {}), "data"), parallel=parallel,
                    model_spec=model_spec)
    return cfg.validate()


def save_json(cfg: RunConfig, path: Path) -> None:
    path.write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- help

def _field_docs(cls) -> dict[str, str]:
    """The trailing ``# comment`` of each field in the class source: its one-line doc."""
    docs = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+):\s*[^=]+=.*?#\s*(.*)$", line)
        if m:
            docs[m.group(1)] = m.group(2).strip()
    return docs


def config_help() -> str:
    """Every config key with its default and doc, generated from the dataclasses."""
    lines = ["[model]", f"  {'preset':<22} = \"tiny\"   # one of tiny, small, v2-lite, v3, moonlight-16b-a3b;",
             "  any ModelConfig field (Hugging Face names) overrides the preset, e.g. hidden_size = 256"]
    from dsv3.parallel.mesh import ParallelConfig

    headers = {"parallel": "[parallel]  layout under torchrun (world size = pp x dp; ep divides dp)"}
    for section, cls in (("train", TrainConfig), ("data", DataConfig), ("parallel", ParallelConfig)):
        docs = _field_docs(cls)
        lines += ["", headers.get(section, f"[{section}]")]
        for f in fields(cls):
            default = json.dumps(f.default) if isinstance(f.default, str) else repr(f.default).lower() \
                if isinstance(f.default, bool) else repr(f.default)
            lines.append(f"  {f.name:<22} = {default:<8} # {docs.get(f.name, '')}")
    lines += ["", "Override any key with --set section.key=value (value as a TOML literal), e.g. "
              "--set train.steps=400 --set model.num_hidden_layers=2"]
    return "\n".join(lines)
