"""`dsv3 train` and `dsv3 eval`.

    dsv3 train                                        embedded default: tiny model on the stdlib corpus
    dsv3 train --config configs/tiny.toml --data DATA_DIR --out RUN_DIR --set train.steps=200
    dsv3 train --resume RUN_DIR [--set train.steps=400]
    dsv3 eval --ckpt RUN_DIR
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from dsv3.errors import UserError
from dsv3.train import checkpoint, rundir
from dsv3.train.config import (CUDAGRAPH_MODES, RunConfig, apply_overrides, config_help, load_toml, resolve,
                               save_json)


def register(subparsers) -> None:
    """Add the `train` and `eval` verbs."""
    p = subparsers.add_parser(
        "train", help="train a model (no arguments: the tiny model on the Python stdlib sources, a few CPU minutes)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a DeepSeek-V3-architecture model. With no arguments: build a corpus from the running "
                    "interpreter's standard library, train the tiny preset for a few minutes, save, evaluate "
                    "and print a sample.",
        epilog="configuration keys (TOML sections; override with --set section.key=value):\n\n" + config_help())
    p.add_argument("--config", metavar="TOML", help="run config file (e.g. configs/tiny.toml)")
    p.add_argument("--data", metavar="DATA_DIR", help="prepared data directory (`dsv3 prepare`); overrides data.path")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (default: runs/default-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run exactly where its last checkpoint stopped")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=200 (repeatable; value is a TOML literal)")
    p.add_argument("--force", action="store_true", help="replace the contents of a non-empty --out")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and exit")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run_train)

    e = subparsers.add_parser("eval", help="evaluate a checkpoint on the validation split",
                              description="Loss, perplexity and expert-load MaxVio of a checkpoint on the "
                                          "validation split of its data (or of --data).")
    e.add_argument("--ckpt", required=True, metavar="RUN_OR_CKPT_DIR", help="run directory (newest checkpoint) "
                   "or one checkpoint directory")
    e.add_argument("--data", metavar="DATA_DIR", help="prepared data directory (default: the run's)")
    e.add_argument("--batches", type=int, default=None, help="validation batches (default: train.eval_batches; "
                   "0 = the whole split)")
    e.add_argument("--device", default=None, help="'cpu', 'cuda', ... (default: the run's train.device)")
    e.set_defaults(func=run_eval)


# ----------------------------------------------------------------------------- data

def resolve_data(path: str, verify: bool) -> Path:
    """The data directory to train on: the given one (checked), or the cached stdlib corpus."""
    from dsv3.data.shards import TokenDataset

    if not path:
        from dsv3.data.default_corpus import prepare_default_corpus

        print("building the default corpus from the Python standard library sources (cached after the first run)")
        return prepare_default_corpus(progress=False).resolve()
    p = Path(path)
    if not p.exists():
        raise UserError(f"data directory {p} does not exist; run `dsv3 prepare DOCS --out {p}` first, or omit "
                        "--data to use the standard-library corpus")
    TokenDataset(p, verify=verify)  # raises UserError on missing/corrupt/truncated files
    return p.resolve()


def check_data_fits(cfg: RunConfig, data: Path) -> None:
    from dsv3.data.shards import TokenDataset

    ds = TokenDataset(data, verify=False)
    if ds.vocab_size > cfg.model.vocab_size:
        raise UserError(f"the data's tokenizer has {ds.vocab_size} tokens but model.vocab_size = "
                        f"{cfg.model.vocab_size}; pass --set model.vocab_size={ds.vocab_size} (or larger)")
    if ds.split("train").n_tokens == 0:
        raise UserError(f"the train split of {data} is empty; prepare more documents")


# ----------------------------------------------------------------------------- train

def _model_diff(a, b) -> str:
    da, db = a.to_dict(), b.to_dict()
    for k in da:
        if da[k] != db.get(k):
            return f"model.{k}: saved {da[k]!r}, now {db.get(k)!r}"
    return "model"


def _resume_config(args) -> tuple[RunConfig, Path, Path]:
    run_dir = Path(args.resume)
    if not run_dir.is_dir():
        raise UserError(f"--resume {run_dir} does not exist; pass the RUN_DIR of an earlier `dsv3 train`")
    ckpt = checkpoint.resolve_checkpoint(run_dir)
    saved = checkpoint.read_run_config(run_dir)
    if args.config:
        raw = load_toml(args.config)
    else:
        raw = {"model": {"preset": saved.model_spec.get("preset", "tiny"), **saved.model.to_dict()},
               "train": json.loads(json.dumps(saved.to_dict()["train"])),
               "data": saved.to_dict()["data"], "parallel": dict(saved.parallel)}
    raw = apply_overrides(raw, args.overrides)
    if args.data:
        raw.setdefault("data", {})["path"] = args.data
    cfg = resolve(raw)
    if cfg.model != saved.model:
        raise UserError(f"cannot resume {run_dir}: its checkpoint was trained with another model config "
                        f"({_model_diff(saved.model, cfg.model)}); drop that change, or start a new run with "
                        "another --out")
    cfg.model_spec = saved.model_spec
    if not cfg.data.path:
        cfg.data.path = saved.data.path
    return cfg, run_dir, ckpt


def run_train(args: argparse.Namespace) -> int:
    if args.help_config:
        print(config_help())
        return 0
    if args.resume and args.out and Path(args.out).resolve() != Path(args.resume).resolve():
        raise UserError("--resume RUN_DIR continues in RUN_DIR itself; drop --out (or pass the same directory)")
    if args.resume:
        cfg, run_dir, ckpt = _resume_config(args)
    else:
        raw = load_toml(args.config) if args.config else {}
        raw = apply_overrides(raw, args.overrides)
        if args.data:
            raw.setdefault("data", {})["path"] = args.data
        cfg = resolve(raw)
        run_dir = Path(args.out) if args.out else rundir.default_out()
        rundir.check_out(run_dir, args.force)
        ckpt = None

    data = resolve_data(cfg.data.path, cfg.data.verify)
    cfg.data.path = str(data)
    check_data_fits(cfg, data)

    from dsv3.train.trainer import Trainer

    trainer = Trainer(cfg, run_dir, data, resume=ckpt, quiet=args.quiet)  # validates before anything is written
    try:
        if trainer.is_main:  # under torchrun only rank 0 writes; the others wait for the directory
            if ckpt is None:
                rundir.create_out(run_dir, args.force)
            save_json(cfg, run_dir / "config.json")
        trainer.layout.barrier()
        return _train_and_report(trainer, cfg, run_dir, data, ckpt, quiet=args.quiet)
    except Exception as e:
        cudagraph_error = _cudagraph_user_error(e, cfg)
        if cudagraph_error is not None:
            raise cudagraph_error from None
        if trainer.layout.distributed and not isinstance(e, UserError):
            # A failure on one rank leaves the others blocked in a collective, and tearing the process group
            # down would then block this rank too, hiding the error: print it now and leave at once
            # (torchrun stops the other ranks).
            import os
            import sys
            import traceback
            print(f"rank {trainer.layout.mesh.rank}: training failed:", file=sys.stderr)
            traceback.print_exc()
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(1)
        raise
    finally:
        trainer.close()


def _cudagraph_user_error(e: Exception, cfg: RunConfig) -> UserError | None:
    """CUDA-graph replay failures of the experimental ``train.compile_mode`` settings, as one clear line. From
    2026-11-26 to 2026-12-07 'reduce-overhead' stopped one-GPU runs in a backward ("accessing tensor output of
    CUDAGraphs that has been overwritten by a subsequent run"): weight gradients kept from a graph's output,
    fixed by ``dsv3.train.cudagraph_grads``. Any other such failure still ends the run with this line."""
    mode = cfg.train.compile_mode
    if isinstance(e, UserError) or mode not in CUDAGRAPH_MODES or "CUDAGraphs" not in str(e):
        return None
    first = str(e).strip().splitlines()[0][:160]
    return UserError(f"train.compile_mode = {mode!r} (CUDA graphs, experimental) failed: {first}; "
                     "set train.compile_mode = 'default'")


def _train_and_report(trainer, cfg: RunConfig, run_dir: Path, data: Path, ckpt, quiet: bool) -> int:
    from dsv3.data.stats import unigram_entropy

    say = trainer.progress.print
    m = trainer.model
    if trainer.compute is not None:   # per_step runs under autocast on every device (the CPU included)
        cw = trainer.compute
        compute = (f"bf16 autocast compute, its weight casts done once per step (train.weight_cast = 'per_step': "
                   f"bf16 copies of the {len(cw.masters)} GEMM weight tensors this rank holds, "
                   f"{sum(p.numel() for p in cw.masters) / 1e6:.2f}M parameters)")
    else:
        compute = (f"{'bf16 autocast' if trainer.autocast else 'fp32'} compute"
                   + (" (bf16 requested; CPU runs fp32)" if cfg.train.precision == "bf16" and not trainer.autocast
                      else ""))
    say(f"run {run_dir}: {m.num_parameters() / 1e6:.2f}M parameters ({m.num_activated_parameters() / 1e6:.2f}M "
        f"activated incl. embedding), device {trainer.device}, {compute}")
    say(f"MFU peak: {trainer.peak_flops / 1e12:.3f} TFLOP/s ({trainer.peak_desc}); "
        f"{trainer.flops_per_token / 1e6:.2f} MFLOP/token")
    if ckpt is not None:
        say(f"resuming from {ckpt} (step {trainer.step})")
    start = time.perf_counter()
    code = trainer.train()
    if code != 0 or not trainer.is_main:
        return code
    wall = time.perf_counter() - start
    result = trainer.final_eval
    from dsv3.train.metrics import read_jsonl

    recent = [r["loss_main"] for r in read_jsonl(run_dir / "metrics.jsonl")[-10:]
              if isinstance(r.get("loss_main"), float)]
    train_loss = sum(recent) / len(recent) if recent else float("nan")
    entropy = unigram_entropy(data, "train")
    saved = f"saved {trainer.last_checkpoint}" if trainer.last_checkpoint else "no checkpoint (train.save_final = false)"
    print(f"done: {trainer.step} steps, {trainer.tokens:,} tokens in {wall:.0f}s; {saved}")
    eval_txt = f", validation loss {result['loss']:.3f} (ppl {result['ppl']:.1f})" if result.get("tokens") else ""
    print(f"train loss {train_loss:.3f} nats/token (main, last 10 steps){eval_txt}; corpus unigram entropy "
          f"{entropy:.3f} nats/token")
    if cfg.train.sample_tokens > 0 and trainer.layout.distributed:
        print(f"sample: run `dsv3 generate --ckpt {run_dir}` (this run's experts are spread over processes)")
    elif cfg.train.sample_tokens > 0:
        import torch

        from dsv3.train.sample import greedy_sample

        # Eager: decoding one token at a time would recompile the training-shaped blocks at every new shape
        # (on torch 2.11 + CUDA it failed inside the MoE's dynamic-shape path after a 10-minute run).
        with torch.compiler.set_stance("force_eager"):
            text = greedy_sample(m, data, max_new_tokens=cfg.train.sample_tokens)
        print("greedy sample:\n" + text)
    return 0


# ----------------------------------------------------------------------------- eval

def run_eval(args: argparse.Namespace) -> int:
    import torch

    from dsv3.train.evaluate import evaluate
    from dsv3.train.trainer import pick_device

    ckpt = checkpoint.resolve_checkpoint(args.ckpt)
    cfg = checkpoint.read_run_config(ckpt)
    data = resolve_data(args.data or cfg.data.path, verify=cfg.data.verify)
    device = pick_device(args.device or cfg.train.device)
    model, cfg = checkpoint.load_model_from_run(ckpt, device=device)
    t = cfg.train
    batches = t.eval_batches if args.batches is None else (args.batches or None)
    autocast = torch.bfloat16 if (t.precision == "bf16" and device.type == "cuda") else None
    result = evaluate(model, data, seq_len=t.seq_len, batch_size=t.micro_batch_size or t.batch_size,
                      max_batches=batches, device=device, autocast_dtype=autocast,
                      document_mask=cfg.data.document_mask)
    if not result.get("tokens"):
        raise UserError(f"the validation split of {data} is empty; prepare the data with --val-fraction > 0")
    parts = " ".join(f"{k} {v:.4f}" for k, v in result.items() if k.startswith("loss_"))
    print(f"{ckpt}: validation loss {result['loss']:.4f} ppl {result['ppl']:.2f} {parts} "
          f"maxvio {result.get('maxvio', 0.0):.3f} over {result['tokens']:,} tokens")
    print(json.dumps({"checkpoint": str(ckpt), **{k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                                                  for k, v in result.items()}}))
    return 0
