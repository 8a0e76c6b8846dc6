"""Compare the loss curves of training runs at equal tokens (e.g. one GPU vs EP=2, or BF16 vs FP8).

    python3 benchmarks/compare_runs.py RUN_A RUN_B [RUN_C ...] --labels "1 GPU,EP=2" --out results/NAME

The first run is the reference. Each run's training loss (from `metrics.jsonl`) is smoothed with a moving mean
over `--window` logged points, and the reference's smoothed curve is interpolated at the other run's token
counts, over the tokens both runs covered. Writes NAME.png (curves and relative difference) and NAME.json, and
prints a markdown table: tokens compared, mean and final relative difference (final = mean over the last
10% of the shared tokens), and validation losses logged at the same step by both runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from dsv3.train.metrics import read_jsonl  # noqa: E402


def load(run: Path) -> tuple[dict, list[dict]]:
    """(train series {tokens, loss, step, tokens_per_s}, eval records) of one run directory."""
    train = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r and "tokens" in r and not r.get("skipped")]
    if not train:
        raise SystemExit(f"{run}: no training steps in metrics.jsonl (is it a `dsv3 train` run directory?)")
    evals = read_jsonl(run / "eval.jsonl")
    series = {k: np.array([r.get(k, np.nan) for r in train], dtype=float)
              for k in ("tokens", "loss", "step", "tokens_per_s")}
    return series, evals


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving mean (the first points average what exists)."""
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def compare(ref: dict, other: dict, window: int, skip_frac: float = 0.1) -> dict:
    """Relative difference (other - ref) / ref of the smoothed losses over the shared tokens."""
    rs, os_ = smooth(ref["loss"], window), smooth(other["loss"], window)
    hi = min(ref["tokens"][-1], other["tokens"][-1])
    lo = skip_frac * hi  # skip the first steps, where the loss falls too fast for any alignment to mean much
    mask = (other["tokens"] >= lo) & (other["tokens"] <= hi)
    t = other["tokens"][mask]
    rel = (os_[mask] - np.interp(t, ref["tokens"], rs)) / np.interp(t, ref["tokens"], rs)
    tail = t >= 0.9 * hi
    return {"tokens_compared": float(hi), "points": int(mask.sum()),
            "mean_abs_rel_diff": float(np.mean(np.abs(rel))) if len(rel) else None,
            "final_rel_diff": float(np.mean(rel[tail])) if tail.any() else None,
            "tokens": t.tolist(), "rel": rel.tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--labels", default=None, help="comma-separated, one per run")
    ap.add_argument("--out", required=True, help="output prefix: writes PREFIX.png and PREFIX.json")
    ap.add_argument("--window", type=int, default=10, help="moving-mean window in logged points")
    ap.add_argument("--title", default="training loss at equal tokens")
    args = ap.parse_args()
    if len(args.runs) < 2:
        raise SystemExit("give at least two run directories (the first is the reference)")
    labels = args.labels.split(",") if args.labels else [r.name for r in args.runs]
    data = [load(r) for r in args.runs]
    ref = data[0][0]
    out: dict = {"reference": labels[0], "window": args.window, "runs": {}}
    rows = []
    for label, (series, evals), run in zip(labels, data, args.runs):
        med_tps = float(np.nanmedian(series["tokens_per_s"][len(series["tokens_per_s"]) // 5:]))
        entry = {"dir": str(run), "steps": int(series["step"][-1]), "tokens": float(series["tokens"][-1]),
                 "median_tokens_per_s": med_tps, "last_loss_smoothed": float(smooth(series["loss"], args.window)[-1]),
                 "eval": [{k: e[k] for k in e if k in ("step", "tokens_seen", "loss", "ppl", "maxvio")}
                          for e in evals]}
        if series is not ref:
            c = compare(ref, series, args.window)
            entry.update({k: c[k] for k in ("tokens_compared", "points", "mean_abs_rel_diff", "final_rel_diff")})
            entry["_curve"] = (c["tokens"], c["rel"])
            # validation at the same steps in both runs
            ref_eval = {e["step"]: e for e in data[0][1]}
            pairs = [(e, ref_eval[e["step"]]) for e in evals if e["step"] in ref_eval]
            if pairs:
                entry["eval_rel_diff"] = [{"step": e["step"], "ref": r["loss"], "run": e["loss"],
                                           "rel": (e["loss"] - r["loss"]) / r["loss"]} for e, r in pairs]
        out["runs"][label] = entry
        rows.append((label, entry))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    for label, (series, _) in zip(labels, data):
        a1.plot(series["tokens"] / 1e6, series["loss"], alpha=0.25, lw=0.8)
        a1.plot(series["tokens"] / 1e6, smooth(series["loss"], args.window), lw=1.6, label=label,
                color=a1.lines[-1].get_color())
    a1.set_ylabel("training loss")
    a1.set_title(args.title)
    a1.legend()
    a1.grid(alpha=0.3)
    colors = [line.get_color() for line in a1.lines[1::2]]  # each run's smoothed curve, in run order
    for (label, entry), color in zip(rows[1:], colors[1:]):
        t, rel = entry.pop("_curve")
        a2.plot(np.array(t) / 1e6, 100 * np.array(rel), label=f"{label} vs {labels[0]}", color=color)
    a2.axhline(0, color="k", lw=0.6)
    a2.set_xlabel("tokens (millions)")
    a2.set_ylabel("relative diff (%)")
    a2.grid(alpha=0.3)
    a2.legend()
    fig.tight_layout()
    prefix = Path(args.out)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(prefix.with_suffix(".png"), dpi=110)
    prefix.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")

    print("| run | steps | tokens | median tokens/s | smoothed last loss | tokens compared | mean abs rel diff "
          "| final rel diff |")
    print("|---|---|---|---|---|---|---|---|")
    for label, e in rows:
        cmp = (f"{e['tokens_compared'] / 1e6:.1f}M | {100 * e['mean_abs_rel_diff']:.2f}% | "
               f"{100 * e['final_rel_diff']:+.2f}%") if "final_rel_diff" in e and e["final_rel_diff"] is not None \
            else "reference | | "
        print(f"| {label} | {e['steps']} | {e['tokens'] / 1e6:.1f}M | {e['median_tokens_per_s']:,.0f} | "
              f"{e['last_loss_smoothed']:.4f} | {cmp} |")
    for label, e in rows[1:]:
        for r in e.get("eval_rel_diff", []):
            print(f"eval step {r['step']}: {labels[0]} {r['ref']:.4f}  {label} {r['run']:.4f}  rel {100 * r['rel']:+.2f}%")


if __name__ == "__main__":
    main()
