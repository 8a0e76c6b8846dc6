#!/usr/bin/env bash
# The two-GPU measurement session of 2026-11-25 (issues #4, #5, #6, #9), in three calls of at most 10 minutes
# on one held machine (the device tool's per-call limit), with long runs in the background between calls.
#
#   benchmarks/two_gpu_session.sh 1   # corpus; NCCL smoke tests of every layout (tiny); then in the background:
#                                     #   GPU0: 1-GPU `small` run on the real corpus (10.2 min, issue #4 / #9)
#                                     #   GPU1: distributed.py's 1-GPU baseline, FP8 vs BF16 step, 819m/3b vs peers
#   benchmarks/two_gpu_session.sh 2   # wait for GPU0's run; plot it; DP2/EP2/PP2 measurements; start EP=2 run
#   benchmarks/two_gpu_session.sh 3   # wait for the EP=2 run; plot; compare the two curves at equal tokens
#
# Everything lands in $OUT (logs, metrics, PNGs, JSON); work files in $W (default /tmp/w).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
W=${W:-/tmp/w}
OUT=${OUT:-/tmp/out}
LIMIT=${LIMIT:-570}          # seconds this call may take (the tool's limit is 600)
mkdir -p "$W" "$OUT"
phase=$1

copy_run() {  # run dir -> $OUT/name (metrics, evals, config, plots; no checkpoints)
  local run=$1 name=$2
  mkdir -p "$OUT/$name"
  for f in metrics.jsonl eval.jsonl expert_load.jsonl config.toml config.json loss.png expert_load.png; do
    [ -f "$run/$f" ] && cp "$run/$f" "$OUT/$name/"
  done
  cp "$run"/*.png "$OUT/$name/" 2>/dev/null || true
}

monitor() {  # until LIMIT: copy the logs' tails every 30 s
  while [ "$SECONDS" -lt "$LIMIT" ]; do
    sleep 20
    for f in "$W"/*.log; do tail -c 20000 "$f" > "$OUT/$(basename "$f")"; done
    "$@" 2>/dev/null && break
  done
}

alive() { local pid; pid=$(cat "$W/$1.pid" 2>/dev/null) && kill -0 "$pid" 2>/dev/null; }  # job NAME still running
export -f alive
launch() {  # launch NAME CMD...: CMD in a new session (outlives this call), log $W/NAME.log, pid $W/NAME.pid
  local name=$1; shift
  setsid bash -c 'echo $$ > "$0"; exec "$@"' "$W/$name.pid" "$@" > "$W/$name.log" 2>&1 < /dev/null &
  sleep 1
}
export W

case "$phase" in
1)
  nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpus.txt"
  python3 -c 'import torch; print(torch.__version__, torch.cuda.device_count())' | tee -a "$OUT/gpus.txt"
  (benchmarks/real_corpus_run.sh prepare "$W/spdata" > "$W/prepare.log" 2>&1; echo $? > "$W/prepare.rc") &
  # NCCL smoke tests of the layouts on the tiny preset (seconds each; a hang prints every stack after 40 s),
  # beside the corpus preparation and the start of the long run
  smoke() {
    std=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
    python3 -m dsv3 prepare "$std/json" "$std/email" --vocab-size 512 --out "$W/smoke_data" --no-progress > /dev/null
    base=(-m dsv3 train --config configs/tiny.toml --data "$W/smoke_data" --set train.steps=6 --force
          --set model.vocab_size=512 --set train.sample_tokens=0 --set train.eval_batches=2 --set train.log_every=1)
    for layout in "ep2::parallel.ep=2" \
                  "pp2_1f1b::parallel.pp=2 parallel.schedule=\"1f1b\" train.micro_batch_size=4" \
                  "pp2_1f1b_eager_la0:CUDA_MODULE_LOADING=EAGER:parallel.pp=2 parallel.schedule=\"1f1b\" train.micro_batch_size=4 parallel.p2p_lookahead=0" \
                  "pp2_dualpipev_eager_la0:CUDA_MODULE_LOADING=EAGER:parallel.pp=2 parallel.schedule=\"dualpipev\" train.micro_batch_size=4 parallel.p2p_lookahead=0"; do
      name=${layout%%:*}; rest=${layout#*:}; envs=${rest%%:*}; sets=()
      for kv in ${rest#*:}; do sets+=(--set "$kv"); done
      env $envs DSV3_STACK_DUMP_S=40 timeout 60 python3 -m torch.distributed.run --nproc_per_node 2 \
          --master_port 29530 "${base[@]}" --out "$W/smoke_$name" "${sets[@]}" > "$W/smoke_$name.log" 2>&1
      echo "smoke $name rc=$? $(grep -c '^step' "$W/smoke_$name.log") step lines" | tee -a "$OUT/smoke.txt"
    done
  }
  smoke &
  smoke_pid=$!
  while [ ! -f "$W/prepare.rc" ]; do sleep 2; done
  echo "prepare rc=$(cat "$W/prepare.rc") after ${SECONDS}s"; tail -n 3 "$W/prepare.log"
  [ "$(cat "$W/prepare.rc")" = 0 ] || exit 1
  launch run_one env CUDA_VISIBLE_DEVICES=0 benchmarks/real_corpus_run.sh one "$W/spdata" "$W/run_one" 10.05
  wait "$smoke_pid"
  for f in "$W"/smoke_*.log; do tail -c 15000 "$f" > "$OUT/$(basename "$f")"; done
  launch gpu1 env CUDA_VISIBLE_DEVICES=1 W="$W" GPU1_BUDGET="${GPU1_BUDGET:-640}" benchmarks/two_gpu_session.sh gpu1
  monitor false
  ;;
gpu1)  # the GPU1 queue of phase 1, ended by a deadline so that phase 2 finds the GPU free
  start=$SECONDS; deadline=$((start + ${GPU1_BUDGET:-620}))
  left() { echo $((deadline - SECONDS)); }
  timeout "$(left)" python3 benchmarks/distributed.py --out "$W/dist" --data "$W/spdata" --runs one
  timeout "$(left)" python3 benchmarks/train_step.py --configs small --peers none --fp8 --steps 8 \
      --out "$W/train_step_fp8.json"
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/torchtitan-*.whl .whl/tomli-*.whl .whl/tyro-*.whl .whl/typeguard-*.whl .whl/docstring_parser-*.whl \
        .whl/shtab-*.whl .whl/torchdata-*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  timeout "$(left)" python3 benchmarks/train_step.py --configs 819m,3b --steps 8 --out "$W/train_step_peers.json"
  echo "gpu1 queue done"
  ;;
2)
  monitor bash -c '! alive run_one && ! alive gpu1'
  alive gpu1 && { kill -- -"$(cat "$W/gpu1.pid")"; sleep 3; }   # past its deadline: free GPU1
  alive run_one && echo "run_one still running at the end of its wait"
  python3 -m dsv3 plot "$W/run_one" | tail -n 3
  copy_run "$W/run_one" run_one
  cp "$W"/train_step_*.json "$OUT/" 2>/dev/null
  for f in "$W"/*.log; do tail -c 20000 "$f" > "$OUT/$(basename "$f")"; done
  ls -la "$W/run_one/checkpoints" > "$OUT/run_one/checkpoints.txt" 2>&1
  rm -rf "$W/run_one/checkpoints"
  timeout $((LIMIT - SECONDS - 40)) python3 benchmarks/distributed.py --out "$W/dist" --data "$W/spdata" \
      --runs "${DIST_RUNS:-dp2,ep2}" > "$W/dist.log" 2>&1
  echo "distributed rc=$?"; tail -n 8 "$W/dist.log"
  mkdir -p "$OUT/dist"; cp "$W/dist/distributed.json" "$OUT/dist/" 2>/dev/null
  for r in one dp2 ep2 pp2_dualpipev; do
    [ -d "$W/dist/$r" ] && { mkdir -p "$OUT/dist/$r"; cp "$W/dist/$r"/metrics.jsonl "$W/dist/$r"/result.json "$OUT/dist/$r/" 2>/dev/null; }
  done
  cp -r "$W/dist/pp2_dualpipev/traces" "$OUT/dist/pp2_dualpipev/" 2>/dev/null
  [ -n "${EP2_RUN:-}" ] && { launch run_ep2 benchmarks/real_corpus_run.sh ep2 "$W/spdata" "$W/run_ep2" 10.2; monitor false; }
  ;;
3)
  monitor bash -c '! alive run_ep2'
  python3 -m dsv3 plot "$W/run_ep2" | tail -n 3
  copy_run "$W/run_ep2" run_ep2
  python3 benchmarks/compare_runs.py "$W/run_one" "$W/run_ep2" --labels "1 GPU,EP=2 (2 GPUs)" \
      --out "$OUT/compare_one_ep2" --title "small preset, same batch/seed: 1 GPU vs EP=2" | tee "$OUT/compare.md"
  for f in "$W"/*.log; do tail -c 20000 "$f" > "$OUT/$(basename "$f")"; done
  ;;
*)
  echo "usage: $0 1|2|3" >&2; exit 2 ;;
esac
