#!/usr/bin/env bash
# FP8 vs BF16 on a real corpus for >= 100M tokens each (issue #6): same model (configs/fp8_accuracy.toml), data,
# seed and batch order; only train.precision differs. Both runs share one GPU, side by side (the comparison is
# of losses; throughput comes from benchmarks/train_step.py --fp8).
#
#   benchmarks/fp8_accuracy.sh prepare DATA        # corpus: every Python source of this machine's site-packages
#   benchmarks/fp8_accuracy.sh launch DATA RUNS    # both runs in new sessions (outlive the shell); RUNS/{bf16,fp8}
#   benchmarks/fp8_accuracy.sh status RUNS         # last logged step of each, and whether it still runs
#   benchmarks/fp8_accuracy.sh compare RUNS PREFIX # PREFIX.png / PREFIX.json / markdown table (compare_runs.py)
#
# MIN (default 30) caps each run's minutes (train.time_limit_min); SETS adds `--set k=v` overrides to both;
# PRECS="fp8" launches one of them (e.g. to rerun FP8 against a committed BF16 run of the same config and data).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
what=$1
case "$what" in
  prepare)
    sp=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    python3 -m dsv3 prepare "$sp" --ext py --vocab-size 32768 --encoding-errors replace --out "$2" --no-progress ;;
  launch)
    data=$2; runs=$3; mkdir -p "$runs"
    read -r -a more <<< "${SETS:-}"
    for prec in ${PRECS:-bf16 fp8}; do
      setsid python3 -m dsv3 train --config configs/fp8_accuracy.toml --data "$data" --out "$runs/$prec" --force \
          --set "train.precision=\"$prec\"" --set "train.time_limit_min=${MIN:-30}" --set train.sample_tokens=0 \
          "${more[@]}" > "$runs/$prec.log" 2>&1 < /dev/null &
      echo $! > "$runs/$prec.pid"
    done ;;
  status)
    for prec in bf16 fp8; do
      pid=$(cat "$2/$prec.pid" 2>/dev/null); state=done
      [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && state=running
      echo "$prec: $state; $(tail -n 1 "$2/$prec/metrics.jsonl" 2>/dev/null | cut -c1-200)"
    done ;;
  compare)
    python3 benchmarks/compare_runs.py "$2/bf16" "$2/fp8" --labels "BF16,FP8 (1x128 / 128x128 E4M3)" --out "$3" \
        --title "configs/fp8_accuracy.toml: BF16 vs FP8, same data and seed" ;;
  *)
    echo "usage: $0 prepare DATA | launch DATA RUNS | status RUNS | compare RUNS PREFIX" >&2; exit 2 ;;
esac
