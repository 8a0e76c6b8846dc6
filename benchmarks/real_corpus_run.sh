#!/usr/bin/env bash
# Real-corpus training runs of the `small` preset (issues #4 and #9), the same recipe on one GPU and on two.
#
#   benchmarks/real_corpus_run.sh prepare DATA_DIR            # corpus: Python sources of this machine's site-packages
#   benchmarks/real_corpus_run.sh one DATA_DIR RUN_DIR [MIN]  # one GPU (the first visible one), MIN minutes (10.5)
#   benchmarks/real_corpus_run.sh ep2 DATA_DIR RUN_DIR [MIN]  # two GPUs, expert parallel EP=2 (dp=2), torchrun
#
# Both layouts use the same global batch (64 x 2048 tokens), seed, schedule and data order, so their loss
# curves can be compared step for step (benchmarks/compare_runs.py). The LR schedule spans train.steps=1000;
# the time limit ends each run earlier, with a checkpoint (resume continues it). MICRO overrides the
# per-GPU micro-batch (default 8 sequences); SETS adds more `--set key=value` overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
what=$1
data=$2
sp=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
common=(--config configs/small.toml --data "$data"
        --set train.steps=1000 --set train.warmup_steps=30 --set train.batch_size=64
        --set "train.micro_batch_size=${MICRO:-8}" --set train.batch_ramp_start=0
        --set train.eval_every=100 --set train.eval_batches=8 --set train.save_every=100000
        --set train.log_every=10 --set train.expert_load_every=10)
read -r -a more <<< "${SETS:-}"   # SETS="--set k=v ...": more overrides (e.g. a CPU dry run of this script)
common+=("${more[@]}")
case "$what" in
  prepare)
    dirs=()
    for d in transformers torch sympy scipy jax sklearn pandas numpy matplotlib networkx; do  # ~200 MB of Python
      [ -d "$sp/$d" ] && dirs+=("$sp/$d")
    done
    python3 -m dsv3 prepare "${dirs[@]}" --ext py --vocab-size 32768 --encoding-errors replace \
        --out "$data" --no-progress ;;
  one|ep2)
    if [ "$what" = one ]; then launcher=(python3); extra=()
    else launcher=(python3 -m torch.distributed.run --nproc_per_node 2 --master_port 29511); extra=(--set parallel.ep=2)
    fi
    "${launcher[@]}" -m dsv3 train "${common[@]}" "${extra[@]}" --out "$3" --force \
        --set "train.time_limit_min=${4:-10.5}" && exit 0
    # A failure in the first steps (e.g. out of memory, or a compile problem on this torch) gets one retry
    # with the same math and a lighter setup: no recomputation wrappers, half the micro-batch.
    steps=$(wc -l < "$3/metrics.jsonl" 2>/dev/null || echo 0)
    [ "$steps" -ge 5 ] && exit 1
    echo "retrying without recomputation and with micro-batch 4 (failed after $steps steps)" >&2
    "${launcher[@]}" -m dsv3 train "${common[@]}" "${extra[@]}" --out "$3" --force \
        --set "train.time_limit_min=${4:-10.5}" --set 'train.recompute="none"' --set train.micro_batch_size=4 ;;
  *)
    echo "usage: $0 prepare|one|ep2 DATA_DIR [RUN_DIR [MINUTES]]" >&2; exit 2 ;;
esac
