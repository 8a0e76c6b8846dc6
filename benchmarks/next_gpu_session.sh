#!/usr/bin/env bash
# The checks the 2026-11-26 session left for the next GPU session, each phase one device call (<= 10 min).
#
#   benchmarks/next_gpu_session.sh fp8    # one GPU: FP8 GPU tests, then the fixed-batch probe that separates a
#                                         #   kernel defect (fp8 vs fp8-ref) from the recipe (fp8-ref vs bf16)
#   benchmarks/next_gpu_session.sh dist   # two GPUs: DualPipeV smoke (eager + compiled), rates, distributed.py
#                                         #   (one, dp2, ep2, pp2_dualpipev with trace), simulator with measured rates
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
    timeout 420 python3 benchmarks/fp8_probe.py --out "$OUT/fp8_probe.json" --compile \
        --variants bf16,fp8,fp8-ref,fp8-nocache,fp8-experts,fp8-experts-ref 2>&1 | grep -v Warning ;;
  dist)
    std=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
    python3 -m dsv3 prepare "$std/json" "$std/email" --vocab-size 512 --out /tmp/sd --no-progress > /dev/null
    for c in false true; do
      DSV3_STACK_DUMP_S=40 timeout 90 python3 -m torch.distributed.run --nproc_per_node 2 --master_port 29530 \
          -m dsv3 train --config configs/tiny.toml --data /tmp/sd --out /tmp/smoke_dpv_$c --force \
          --set model.vocab_size=512 --set train.steps=4 --set train.sample_tokens=0 --set train.eval_batches=1 \
          --set parallel.pp=2 --set 'parallel.schedule="dualpipev"' --set train.micro_batch_size=4 \
          --set train.compile=$c > "$OUT/smoke_dpv_compile_$c.log" 2>&1
      echo "dualpipev compile=$c rc=$? steps=$(grep -c '^step' "$OUT/smoke_dpv_compile_$c.log")"
    done
    timeout 90 python3 benchmarks/measure_rates.py --out "$OUT/rates.json" 2>&1 | tail -22
    timeout 330 python3 benchmarks/distributed.py --out /tmp/dist --rates "$OUT/rates.json" --steps 8 2>&1 | tail -12
    cp /tmp/dist/distributed.json "$OUT/" 2>/dev/null
    tar czf "$OUT/dist.tgz" -C /tmp dist --exclude=checkpoints --exclude=data 2>/dev/null ;;
  ep2)
    W=/tmp/w; mkdir -p "$W"
    benchmarks/real_corpus_run.sh prepare "$W/spdata" > "$W/prepare.log" 2>&1 || { tail "$W/prepare.log"; exit 1; }
    setsid benchmarks/real_corpus_run.sh ep2 "$W/spdata" "$W/run_ep2" 10.2 > "$W/run_ep2.log" 2>&1 < /dev/null &
    echo $! > "$W/run_ep2.pid"
    sleep 420; tail -3 "$W/run_ep2.log" ;;
  *)
    echo "usage: $0 fp8|dist|ep2" >&2; exit 2 ;;
esac
