"""`dsv3 plot RUN_DIR`: loss curves and an expert-load heatmap as PNGs in the run directory.

* ``loss.png``: train main loss and MTP loss per step, validation loss points (main + MTP).
* ``expert_load.png``: layers x experts, each count divided by its layer's mean (1 = balanced), from
  ``expert_load.jsonl``: the whole run summed, and the last logged step.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dsv3.errors import UserError
from dsv3.train.metrics import read_jsonl


def register(subparsers) -> None:
    p = subparsers.add_parser("plot", help="render loss curves and the expert-load heatmap of a run as PNGs",
                              description="Write loss.png and expert_load.png into RUN_DIR from its metrics.jsonl, "
                                          "eval.jsonl and expert_load.jsonl.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by `dsv3 train`")
    p.set_defaults(func=run_plot)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("plotting needs matplotlib; install it with `pip install 'dsv3[plot]'`") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(records: list[dict], key: str) -> tuple[list, list]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def plot_losses(run_dir: Path, plt) -> Path:
    train = [r for r in read_jsonl(run_dir / "metrics.jsonl") if not r.get("skipped")]
    evals = read_jsonl(run_dir / "eval.jsonl")
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, label in (("loss_main", "train main"), ("loss_mtp_1", "train MTP depth 1")):
        xs, ys = _series(train, key)
        if xs:
            ax.plot(xs, ys, label=label, linewidth=1)
    for key, label, marker in (("loss", "validation main", "o"), ("loss_mtp_1", "validation MTP depth 1", "s")):
        xs, ys = _series(evals, key)
        if xs:
            ax.plot(xs, ys, marker=marker, linestyle="--", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"loss: {run_dir.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    out = run_dir / "loss.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _moe_layer_names(run_dir: Path, n: int) -> list[str]:
    """'layer 3', ..., 'MTP 1' from the run's config (plain indices if it cannot be read)."""
    import json

    try:
        m = json.loads((run_dir / "config.json").read_text())["model"]
        names = [f"layer {l}" for l in range(m["first_k_dense_replace"], m["num_hidden_layers"])]
        names += [f"MTP {k}" for k in range(1, m["num_nextn_predict_layers"] + 1)]
        if len(names) == n:
            return names
    except (OSError, KeyError, ValueError):
        pass
    return [str(i) for i in range(n)]


def plot_expert_load(run_dir: Path, plt) -> Path | None:
    import numpy as np

    records = [r for r in read_jsonl(run_dir / "expert_load.jsonl") if r.get("counts")]
    if not records:
        return None
    total = np.sum([np.asarray(r["counts"], dtype=np.float64) for r in records], axis=0)
    last = np.asarray(records[-1]["counts"], dtype=np.float64)

    def relative(c):
        return c / np.maximum(c.mean(axis=1, keepdims=True), 1e-9)

    labels = _moe_layer_names(run_dir, total.shape[0])
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.6 * total.shape[0] + 2.5), squeeze=False)
    for ax, c, title in ((axes[0, 0], total, f"all logged steps ({len(records)})"),
                         (axes[0, 1], last, f"step {records[-1]['step']}")):
        im = ax.imshow(relative(c), aspect="auto", cmap="coolwarm", vmin=0.0, vmax=2.0)
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_ylabel("MoE layer")
        ax.set_title(f"load / mean: {title}")
        fig.colorbar(im, ax=ax)
    out = run_dir / "expert_load.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def run_plot(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} does not exist; pass a RUN_DIR written by `dsv3 train`")
    if not read_jsonl(run_dir / "metrics.jsonl"):
        raise UserError(f"{run_dir} has no metrics.jsonl records; train first (`dsv3 train --out {run_dir}`)")
    plt = _pyplot()
    written = [plot_losses(run_dir, plt), plot_expert_load(run_dir, plt)]
    for p in written:
        if p is not None:
            print(f"wrote {p}")
    return 0
