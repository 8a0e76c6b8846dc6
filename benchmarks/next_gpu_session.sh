#!/usr/bin/env bash
# The checks the 2026-11-26 session left for the next GPU session, each phase one device call (<= 10 min).
#
#   benchmarks/next_gpu_session.sh fp8    # one GPU: FP8 GPU tests, then the fixed-batch probe that separates a
#                                         #   kernel defect (fp8 vs fp8-ref) from the recipe (fp8-ref vs bf16)
#                                         #   (ran 2026-11-26 session 4: found the compiled-gradient defect)
#   benchmarks/next_gpu_session.sh dist   # two GPUs: distributed.py (one, dp2, ep2, pp2_dualpipev with trace) with
#                                         #   the measured rates; results copied to $OUT as each run lands
#   benchmarks/next_gpu_session.sh ep2    # two GPUs: corpus + the 10-minute EP=2 real-corpus run in the background;
#                                         #   then `two_gpu_session.sh 3` (W=/tmp/w) compares it with the committed
#                                         #   one-GPU run (copy benchmarks/results/raw/2026-11-25-two-gpu-session/run_one
#                                         #   to /tmp/w/run_one first)
# Everything lands in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
case "${1:-}" in
  fp8)
    nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
    timeout 150 python3 -m pytest -q -s tests/test_fp8_triton.py tests/test_fp8_grouped.py 2>&1 | tail -15
    timeout 420 python3 benchmarks/fp8_probe.py --out "$OUT/fp8_probe.json" --compile --batch 2 \
        --variants bf16,fp8,fp8-ref,fp8-nocache,fp8-experts,fp8-experts-ref 2>&1 | grep -v Warning ;;
  dist)
    # distributed.py (one, dp2, ep2, pp2 DualPipeV with trace) in the background; each run's metrics, result and
    # Chrome traces are copied to $OUT as they land, so a call cut off at its limit still returns what finished
    nvidia-smi --query-gpu=name --format=csv,noheader
    D=/tmp/dist; mkdir -p $D
    (timeout ${DIST_S:-540} python3 benchmarks/distributed.py --out $D --steps 8 \
        --rates benchmarks/results/raw/2026-11-26-distributed/rates-small-h200x2.json > $OUT/distributed.log 2>&1
     echo "rc=$?" >> $OUT/distributed.log) &
    bg=$!
    save() { for r in one dp2 ep2 pp2_dualpipev; do [ -d $D/$r ] || continue; mkdir -p $OUT/dist/$r
      cp $D/$r/result.json $D/$r/metrics.jsonl $D/$r/expert_load.jsonl $OUT/dist/$r/ 2>/dev/null
      [ -d $D/$r/traces ] && cp -r $D/$r/traces $OUT/dist/$r/
      cp $D/$r/profile/*.txt $OUT/dist/$r/ 2>/dev/null; done
      cp $D/distributed.json $OUT/ 2>/dev/null; }
    while kill -0 $bg 2>/dev/null; do sleep 10; save; done
    save; tail -15 $OUT/distributed.log ;;
  ep2)
    W=/tmp/w; mkdir -p "$W"
    benchmarks/real_corpus_run.sh prepare "$W/spdata" > "$W/prepare.log" 2>&1 || { tail "$W/prepare.log"; exit 1; }
    setsid benchmarks/real_corpus_run.sh ep2 "$W/spdata" "$W/run_ep2" 10.2 > "$W/run_ep2.log" 2>&1 < /dev/null &
    echo $! > "$W/run_ep2.pid"
    sleep 420; tail -3 "$W/run_ep2.log" ;;
  *)
    echo "usage: $0 fp8|dist|ep2" >&2; exit 2 ;;
esac
