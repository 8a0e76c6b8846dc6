#!/usr/bin/env bash
# The checks the 2026-11-26 session left for the next GPU session, each phase one device call (<= 10 min).
#
#   benchmarks/next_gpu_session.sh fp8    # one GPU: FP8 GPU tests, then the fixed-batch probe that separates a
#                                         #   kernel defect (fp8 vs fp8-ref) from the recipe (fp8-ref vs bf16)
#                                         #   (ran 2026-11-26 session 4: found the compiled-gradient defect)
#   benchmarks/next_gpu_session.sh dist   # two GPUs: distributed.py (one, dp2, ep2, pp2_dualpipev with trace) with
#                                         #   the measured rates; results copied to $OUT as each run lands
#                                         #   RUNS=one,dp2,dp2_sync: the A/B of the ZeRO-1 levers (session 8: 0.956 vs 0.920)
#                                         #   RUNS=one,ep2,ep2_cg,ep2_fp8d: CUDA graphs and FP8 dispatch against the
#                                         #   default EP=2, same machine (session 9: 0.608 / 0.626 / 0.496); one_cg
#                                         #   still fails on one GPU (tests/test_compile.py's CUDA test is the check)
#                                         #   STEPS (default 20): steps per run, medians over steps 4+
#                                         #   (the profiled step, now the last one, left out: session 10 saw
#                                         #   EP steps slow down after a step-6 profile)
#                                         #   RUNS=one,ep2,ep2_fbo / one,ep2,ep2_gc50: parallel.fb_overlap and
#                                         #   train.gc_every A/Bs (session 10: neither paid; both opt-in)
#                                         #   RUNS=one,ep2,ep2_a2a,ep2_ag_cg: parallel.ep_dispatch (session 11: ep2 =
#                                         #   'auto' = allgather 0.844, alltoall 0.67-0.71, allgather + CUDA graphs 0.877)
#                                         #   RUNS=one:160:120,ep2:160:120 (session 12: ep_scaling 0.954 once the
#                                         #   router has balanced; NAME:STEPS:FROM = a run's own length and medians)
#                                         #   (session 13, H200 pairs: eager steps host-bound; ep2 0.80, ep2_cg 0.942,
#                                         #   dp2 0.882; calls of 3 runs x 110 steps hit the 10-minute limit)
#                                         #   NEXT: RUNS=one:90:50,dp2_cg:90:50 (DP=2 with CUDA graphs, never run
#                                         #   since session 9) then RUNS=one:90:50,dp2:90:50,ep2_cg:90:50 in one call
#                                         #   with DIST_S=560; ep2_fbo (allgather + fb_overlap) never ran on a GPU
#   benchmarks/next_gpu_session.sh exch   # two GPUs (#9): ep_exchange.py, then DualPipeV PP=2 alone with its trace
#   benchmarks/next_gpu_session.sh local  # one GPU (#9): local_slots / ep_allgather GPU tests, ep_local_probe.py
#   benchmarks/next_gpu_session.sh cg1    # one GPU (session 14): the slot-kernel and CUDA-graph GPU tests, then
#                                         #   distributed.py's one-GPU trainer run eager against CUDA graphs
#                                         #   (RUNS, default one:40:20,one_cg:40:20); everything in $OUT/cg1.tar.gz
#                                         #   (session 14, H200: kernels pass; one_cg fails in bf16; one 450.9 ms)
#   benchmarks/next_gpu_session.sh wc1    # one GPU (~6 min): the weight_cast / compile / MoE-compile GPU tests
#                                         #   (TESTS, TEST_K override), compile_parity_probe.py, then distributed.py
#                                         #   RUNS (default one:24:8,one_pu:24:8,one_cg:24:8); $OUT/wc1.tar.gz, re-packed
#                                         #   after each phase (session 16, H100: 15 GPU tests passed; per_step 488.4
#                                         #   vs per_use 518.3 ms; RUNS=one:16:6,one_bm:16:6: bf16 moments 1.0225x)
#   (session 16 also ran CONFIGS=819m,3b,small ... step: all three configs on one H100, 3.2B at 1.29997x)
#   NEXT (two GPUs): RUNS=one_cg:90:50,ep2_cg:90:50,dp2_cg:90:50 dist (one-GPU CUDA graphs train since session 15)
#   NEXT (one GPU, #6; planned in session 18, when no device could be started after call 1):
#     TEST_S=150 STEP_S=160 DIST_S=230 CONFIGS=v3w benchmarks/next_gpu_session.sh cg8
#     = the GPU tests of the grouped custom ops and of the paired quantizer launch (triton_quant.PAIRED_LAUNCH, off
#     until that test passes on a GPU), the FP8 step at V3's widths (BF16 vs FP8, compiled and CUDA graphs), and the
#     trainer's BF16 / FP8 / FP8-as-CUDA-graphs steps (one_cg_fp8 has never logged a step). Then PAIRED_LAUNCH on
#     and CONFIGS=small again, to time it in the default compile mode.
#   benchmarks/next_gpu_session.sh ep2    # two GPUs: corpus + the 10-minute EP=2 real-corpus run in the background
#   benchmarks/next_gpu_session.sh one    # one GPU: the same run on one GPU (the control: today's code, same data)
#   benchmarks/next_gpu_session.sh step   # one GPU (#5): test_moe_compile.py first (the padded-layout compiled-dx
#                                         #   failure left open on 2026-11-26, session 6), the kernel/optimizer GPU
#                                         #   tests, then train_step.py on small, 3b, 819m against both peers with
#                                         #   profiles; everything packed in $OUT/step.tar.gz (needs .whl carried)
#   TESTS=tests/test_fp8_linear.py CONFIGS=small STEP_ARGS="--peers none --fp8" benchmarks/next_gpu_session.sh step
#                                         # one GPU (#6): the FP8 step with the FP8 linear as custom ops (session 7,
#                                         #   not yet timed) against BF16, same run
#                                         # (session 11 measured train.optimizer_overlap here: +-1.3%, compiled
#                                         #   parity not bit-exact; removed)
#   benchmarks/next_gpu_session.sh fp8g   # one GPU (#6, session 17): grouped FP8 kernel variants (TMA) + FP8 step profile
#   benchmarks/next_gpu_session.sh fp8s   # one GPU (#6, session 17): FP8 tests, small step BF16 vs FP8 profiled, trainer FP8 (+CUDA graphs)
#   benchmarks/next_gpu_session.sh fp8cg  # one GPU (#6, session 17): FP8 GPU tests, trainer FP8 eager vs CUDA graphs, cProfile
#   benchmarks/next_gpu_session.sh cg8    # one GPU (#6/#5, session 18): the FP8 GPU tests (grouped custom ops, paired
#                                         #   quantizer launch), train_step.py --fp8 --cudagraphs on CONFIGS (default
#                                         #   small; STEP_ARGS adds e.g. --peers torchtitan): BF16 and FP8, blocks compiled
#                                         #   default and 'reduce-overhead', profiled; then, if DIST_S > 0, distributed.py
#                                         #   RUNS (default one:10:4,one_fp8:10:4,one_cg_fp8:10:4); phases limited by
#                                         #   TEST_S, STEP_S, DIST_S (0 skips); $OUT/cg8.tar.gz after each phase
#   benchmarks/next_gpu_session.sh fp8next # one GPU (#6, session 19's NEXT, ~6 min): GPU tests of the bf16 weight
#                                         #   gradients and joined weight blocks, fp8_grouped.py tma vs tma_defer
#                                         #   (DEFER_PROMOTION), then the small step BF16 vs FP8 (compiled, CUDA graphs)
#                                         #   then, in a call of its own: DIST_S=400 RUNS=one_fp8:10:4,one_cg_fp8:10:4 cg8
#                                         #   with STEP_S=0 TEST_S=0 (the trainer's FP8 as CUDA graphs, never logged)
#   benchmarks/next_gpu_session.sh s20    # one GPU (#5, session 20): head-CE and FP8 GPU tests, then 3b (CONFIGS) vs
#                                         #   torchtitan with the head-gradient A/B and CUDA graphs, profiled
#                                         #   (session 20, H100: all tests pass, session 19's FP8 ones included;
#                                         #   3b 1.313x / 1.305x torchtitan, 1.328x as CUDA graphs; small 1.368x)
#                                         #   AB= and CG= (empty) leave out the A/B and CUDA-graph runs; STEP_S=0
#                                         #   runs the tests alone
#   benchmarks/next_gpu_session.sh gather # one GPU (#5, session 20, ~2 min, never run): gather_gemm_probe.py, whether
#                                         #   a grouped GEMM that gathers its A rows itself beats gather + CUTLASS
#   NEXT (one GPU, after session 21): `gg` first (it runs the gather probe too; decides #5's next lever); then, for #6, fp8next
#   benchmarks/next_gpu_session.sh gg     # one GPU (#5, session 21, ~9 min, never run; no device could be
#                                         #   started in session 21): the gather_gemm GPU tests, the probe
#                                         #   (forward and backward, pointer and TMA weight loads), then
#                                         #   train_step.py on small (and 3b if time is left), no peers: ours, ours
#                                         #   with both switches, and with both + B_LOADS=tma (AB= to choose);
#                                         #   turn a switch on by default only if it wins on both configs
#     (~6 min: its tests again, tma vs tma_defer, the small step BF16 vs FP8), then the cg8 trainer call above
#   benchmarks/next_gpu_session.sh fp8lin # one GPU (#6): FP8 quantizer/linear/grouped GPU tests and the CUDA-graph
#                                         #   block test, fp8_linear.py, fp8_grouped.py, the small FP8 step vs BF16
#   benchmarks/next_gpu_session.sh ep2wait  # (or onewait) the next call: waits for it, returns its records in run_ep2.tar.gz;
#                                         #   compare here with the committed one-GPU run:
#                                         #   compare_runs.py raw/2026-11-25-two-gpu-session/run_one RUN_EP2 ...
# Everything lands in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# torchtitan 0.2.2 and what it imports, from the carried wheels (.whl), for train_step.py's torchtitan peer
install_peers() {
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/torchtitan-*.whl .whl/tomli-*.whl .whl/tyro-*.whl .whl/typeguard-*.whl .whl/docstring_parser-*.whl \
        .whl/shtab-*.whl .whl/torchdata-*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
}
case "${1:-}" in
  fp8)
    nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
    timeout 150 python3 -m pytest -q -s tests/test_fp8_triton.py tests/test_fp8_grouped.py 2>&1 | tail -15
    timeout 420 python3 benchmarks/fp8_probe.py --out "$OUT/fp8_probe.json" --compile --batch 2 \
        --variants bf16,fp8,fp8-ref,fp8-nocache,fp8-experts,fp8-experts-ref 2>&1 | grep -v Warning ;;
  dist)
    # distributed.py (one, dp2, ep2, pp2 DualPipeV with trace) in the background. Each run's metrics, result,
    # profile tables/summaries and pipeline traces are staged as they land and packed into $OUT/dist.tar.gz
    # (the device returns at most 8 files), so a call cut off at its limit still returns what finished.
    nvidia-smi --query-gpu=name --format=csv,noheader
    D=/tmp/dist; S=/tmp/stage; mkdir -p $D $S
    # the simulator's rates: those measured on 2 x H200 on an H200 pair; on H100s the h100 catalogue (session 12:
    # -2.3% on the EP=2 step, against -6% with the H200 rates)
    RATES=""
    nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && \
        RATES="--rates benchmarks/results/raw/2026-11-26-distributed/rates-small-h200x2.json"
    # GPU tests first when asked (TESTS=...), their summary kept with the runs
    [ -n "${TESTS:-}" ] && timeout ${TEST_S:-150} python3 -m pytest -q $TESTS 2>&1 | grep -E "^E  |passed|failed|^FAILED" \
        | head -30 | tee $S/gpu_tests.txt
    (timeout ${DIST_S:-540} python3 benchmarks/distributed.py --out $D --steps ${STEPS:-20} --median-from ${MEDIAN_FROM:-4} \
        --runs ${RUNS:-one,dp2,ep2,pp2_dualpipev} \
        $RATES > $S/distributed.log 2>&1
     echo "rc=$?" >> $S/distributed.log) &
    bg=$!
    save() { for r in one one_cg one_fbo dp2 dp2_cg dp2_fbo dp2_sync dp2_allreduce ep2 ep2_cg ep2_fp8d ep2_cg_fp8d ep2_fbo ep2_fbo_fp8d one_autogc ep2_autogc one_gc50 ep2_gc50 ep2_ag ep2_ag_cg ep2_a2a ep2_a2a_cg pp2_dualpipev; do [ -d $D/$r ] || continue; mkdir -p $S/$r
      cp $D/$r/result.json $D/$r/metrics.jsonl $D/$r/expert_load.jsonl $S/$r/ 2>/dev/null
      [ -d $D/$r/traces ] && cp -r $D/$r/traces $S/$r/
      cp $D/$r/profile/*.txt $D/$r/profile/*.summary.json $S/$r/ 2>/dev/null; done
      cp $D/distributed.json $D/ep_exchange/ep_exchange.json $S/ 2>/dev/null; tar czf $OUT/dist.tar.gz -C $S . ; }
    while kill -0 $bg 2>/dev/null; do sleep 10; save; done
    save
    # the EP=2 step's full Chrome trace (rank 0), if it fits what the device returns
    [ -f $D/ep2/profile/rank0.json ] && gzip -c $D/ep2/profile/rank0.json > $OUT/ep2_rank0_trace.json.gz
    [ -f $OUT/ep2_rank0_trace.json.gz ] && [ $(stat -c %s $OUT/ep2_rank0_trace.json.gz) -gt 16000000 ] && \
        rm $OUT/ep2_rank0_trace.json.gz
    for r in one dp2 ep2 pp2_dualpipev; do echo "== $r"; cat $D/$r/profile/rank0.summary.json 2>/dev/null | head -30; done
    tail -15 $S/distributed.log ;;
  local)
    # one GPU (#9, session 12): the slot kernels' and the allgather layer's GPU tests, then an EP=2 rank's local
    # expert work (slot kernels vs torch expressions) against one GPU's experts
    nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
    timeout ${TEST_S:-240} python3 -m pytest -q tests/test_local_slots.py tests/test_ep_allgather.py \
        tests/test_moe_permute_kernels.py ${TESTS:-} 2>&1 | grep -E "^E  |passed|failed|^FAILED|Error:" | head -40 \
        | tee "$OUT/gpu_tests.txt"
    timeout ${PROBE_S:-200} python3 benchmarks/ep_local_probe.py --out "$OUT" 2>&1 | grep -v Warn | tail -8 ;;
  cg1)
    # the `local` phase (its tests plus test_compile.py's CUDA-graph test, and ep_local_probe.py) into the stage
    S=/tmp/cg1; mkdir -p $S
    OUT=$S TESTS="tests/test_compile.py ${TESTS:-}" TEST_S=${TEST_S:-220} PROBE_S=${PROBE_S:-100} \
        benchmarks/next_gpu_session.sh local
    timeout ${DIST_S:-300} python3 benchmarks/distributed.py --out /tmp/d --runs ${RUNS:-one:40:20,one_cg:40:20} \
        > $S/distributed.log 2>&1; echo "distributed rc=$?"; tail -6 $S/distributed.log
    for r in $(ls /tmp/d 2>/dev/null); do [ -f /tmp/d/$r/metrics.jsonl ] || continue; mkdir -p $S/$r
      cp /tmp/d/$r/result.json /tmp/d/$r/metrics.jsonl $S/$r/ 2>/dev/null
      cp /tmp/d/$r/profile/*.txt /tmp/d/$r/profile/*.summary.json $S/$r/ 2>/dev/null; done
    cp /tmp/d/distributed.json $S/ 2>/dev/null
    tar czf $OUT/cg1.tar.gz -C /tmp cg1 ;;
  wc1)
    # one GPU (session 15's unrun last call, ~8 min): per_step == per_use bit for bit on CUDA; compiled fp32 blocks
    # against eager on torch 2.11 + CUDA (session 16: the no-op-cast fix); the final per_step timed against per_use
    # (and CUDA graphs). $OUT/wc1.tar.gz is re-packed after each phase, so a call cut off returns what finished.
    S=/tmp/wc1; mkdir -p $S
    pack() { tar czf $OUT/wc1.tar.gz -C /tmp wc1; }
    nvidia-smi --query-gpu=name --format=csv,noheader | tee $S/gpu.txt
    timeout ${TEST_S:-200} python3 -m pytest -q -s ${TESTS:-tests/test_weight_cast_gpu.py tests/test_compile.py \
        tests/test_moe_compile.py} -k "${TEST_K:-gpu or fp32}" 2>&1 \
        | grep -E "^E  |passed|failed|^FAILED|worst" | head -30 | tee $S/gpu_tests.txt; pack
    timeout 80 python3 benchmarks/compile_parity_probe.py --top 10 2>&1 | grep -v -i warn | grep -v "total +=" \
        | tee $S/compile_parity.txt; pack
    timeout ${DIST_S:-270} python3 benchmarks/distributed.py --out /tmp/d --runs ${RUNS:-one:24:8,one_pu:24:8,one_cg:24:8} \
        > $S/distributed.log 2>&1; echo "distributed rc=$?"; grep -E "^\[|step_s" $S/distributed.log
    for r in $(ls /tmp/d 2>/dev/null); do [ -f /tmp/d/$r/metrics.jsonl ] || continue; mkdir -p $S/$r
      cp /tmp/d/$r/result.json /tmp/d/$r/metrics.jsonl $S/$r/ 2>/dev/null
      cp /tmp/d/$r/profile/*.txt /tmp/d/$r/profile/*.summary.json $S/$r/ 2>/dev/null; done
    pack ;;
  exch)
    # two GPUs (#9, session 12): ep_exchange.py (EP dispatch+combine vs plain all_to_all_single, compiled, 16
    # layers per graph), then the DualPipeV PP=2 run alone (distributed.py's settings, 20 steps, its trace)
    nvidia-smi --query-gpu=name --format=csv,noheader
    S=/tmp/stage; mkdir -p $S
    timeout 200 python3 benchmarks/ep_exchange.py --out $S 2>&1 | grep -v Warn | tail -8 | tee $S/ep_exchange.log
    if [ "${PP_S:-300}" != 0 ]; then   # PP_S=0: the exchange benchmark alone
    python3 -m dsv3 prepare /usr/lib/python3.12/json /usr/lib/python3.12/email /usr/lib/python3.12/asyncio \
        /usr/lib/python3.12/unittest --ext py --vocab-size 32768 --out /tmp/data --no-progress > /dev/null 2>&1
    timeout ${PP_S:-300} python3 -m torch.distributed.run --nproc_per_node 2 -m dsv3 train --data /tmp/data \
        --out /tmp/pp2 --force --quiet --set model.preset='"small"' --set model.vocab_size=32768 \
        --set train.steps=${STEPS:-20} --set train.seq_len=4096 --set train.micro_batch_size=2 --set train.eval_every=0 \
        --set train.eval_batches=1 --set train.sample_tokens=0 --set train.save_every=100000 --set train.save_final=false \
        --set train.batch_ramp_start=0 --set train.warmup_steps=2 --set train.lr=0.00042 --set train.device='"cuda"' \
        --set train.compile=true --set train.batch_size=16 --set parallel.pp=2 --set parallel.schedule='"dualpipev"' \
        --set parallel.trace=true > $S/pp2.log 2>&1; echo "pp2 rc=$?" | tee -a $S/pp2.log
    fi
    cp /tmp/pp2/metrics.jsonl $S/pp2_metrics.jsonl 2>/dev/null; cp -r /tmp/pp2/traces $S/pp2_traces 2>/dev/null
    tar czf $OUT/exch.tar.gz -C $S . ; tail -3 $S/pp2.log ;;
  ep2|one)
    # corpus, then the 10-minute real-corpus run (EP=2 on two GPUs, or one GPU) in the background;
    # `ep2wait` / `onewait` (the next call, within the idle window) waits for it and returns its records
    W=/tmp/w; mkdir -p "$W"; what=$1
    benchmarks/real_corpus_run.sh prepare "$W/spdata" > "$W/prepare.log" 2>&1 || { tail "$W/prepare.log"; exit 1; }
    tail -3 "$W/prepare.log"
    setsid benchmarks/real_corpus_run.sh $what "$W/spdata" "$W/run_$what" ${MINUTES:-10.2} \
        > "$W/run_$what.log" 2>&1 < /dev/null &
    echo $! > "$W/run_$what.pid"
    sleep ${EP2_WAIT_S:-480}; tail -3 "$W/run_$what.log" ;;
  ep2wait|onewait)
    W=/tmp/w; what=${1%wait}
    pid=$(cat $W/run_$what.pid)
    # the records are complete once the time limit is logged; the stop checkpoint that follows (~30 GB for small,
    # a minute of device time) is not needed here, so the run is ended there
    while kill -0 $pid 2>/dev/null && ! grep -q "time limit of" "$W/run_$what.log"; do sleep 5; done
    sleep 5; kill -- -$pid 2>/dev/null; sleep 2
    tail -c 30000 "$W/run_$what.log" > "$W/run_$what/train.log"; cp "$W/prepare.log" "$W/run_$what/"
    tar czf $OUT/run_$what.tar.gz -C "$W" run_$what/metrics.jsonl run_$what/eval.jsonl run_$what/expert_load.jsonl \
        run_$what/config.json run_$what/train.log run_$what/prepare.log
    tail -5 "$W/run_$what.log" ;;
  step)
    S=/tmp/step; mkdir -p $S
    install_peers
    timeout ${TEST_S:-200} python3 -m pytest -q ${TESTS:-tests/test_moe_permute_kernels.py tests/test_moe_compile.py \
        tests/test_kernels.py tests/test_optim_fused.py tests/test_model.py} 2>&1 \
        | grep -E "^E  |passed|failed|^FAILED" | head -30 | tee $S/gpu_tests.txt
    timeout ${STEP_S:-360} python3 benchmarks/train_step.py --configs ${CONFIGS:-small,3b,819m} --steps 8 \
        --profile-dir $S --out $S/train_step.json ${STEP_ARGS:-} 2>&1 | grep -v Warn > $S/train_step.log
    grep -E "^\[|device" $S/train_step.log
    gzip -f $S/*.trace.json 2>/dev/null; tar czf $OUT/step.tar.gz -C /tmp step ;;
  fp8g)
    # one GPU (#6, session 17): the grouped FP8 kernels' GPU tests (TMA kernels by default on Hopper), every kernel
    # variant of fp8_grouped.py side by side (pointer loads vs TMA, tile order, scale layout), then the small
    # FP8 step against BF16 with both profiled; $OUT/fp8g.tar.gz re-packed after each phase
    S=/tmp/fp8g; mkdir -p $S
    pack() { tar czf $OUT/fp8g.tar.gz -C /tmp fp8g; }
    nvidia-smi --query-gpu=name --format=csv,noheader | tee $S/gpu.txt
    timeout ${TEST_S:-150} python3 -m pytest -q -s ${TESTS:-tests/test_fp8_grouped.py tests/test_fp8_triton.py} 2>&1 \
        | grep -E "^E  |passed|failed|^FAILED|triton grouped" | head -40 | tee $S/gpu_tests.txt; pack
    timeout ${GROUPED_S:-200} python3 benchmarks/fp8_grouped.py --out $S/fp8_grouped.json \
        --variants ${VARIANTS:-pointer_mfast,pointer,tma,tma_mfast,tma_sT} 2>&1 | grep -v Warn > $S/fp8_grouped.log
    tail -8 $S/fp8_grouped.log | cut -c1-600; pack
    if [ "${STEP_S:-240}" != 0 ]; then
    timeout ${STEP_S:-240} python3 benchmarks/train_step.py --configs small --peers none --fp8 --steps ${STEPS:-8} \
        --profile-dir $S --out $S/train_step.json 2>&1 | grep -v Warn > $S/train_step.log
    grep -E "^\[|device|fp8|FP8" $S/train_step.log | head -20
    rm -f $S/*.trace.json; fi
    pack ;;
  fp8s)
    # one GPU (#6, session 17, ~9 min): GPU tests of the FP8 changes, train_step.py's small step BF16 vs FP8 (both
    # profiled), then the trainer's FP8 step eager-launched and as CUDA graphs beside its BF16 step
    # (distributed.py RUNS, default one:12:4,one_fp8:12:4,one_cg_fp8:12:4); $OUT/fp8s.tar.gz after each phase
    S=/tmp/fp8s; mkdir -p $S
    pack() { tar czf $OUT/fp8s.tar.gz -C /tmp fp8s; }
    nvidia-smi --query-gpu=name --format=csv,noheader | tee $S/gpu.txt
    timeout ${TEST_S:-120} python3 -m pytest -q ${TESTS:-tests/test_fp8_grouped.py tests/test_fp8_triton.py \
        tests/test_moe_compile.py} 2>&1 | grep -E "^E  |passed|failed|^FAILED" | head -30 | tee $S/gpu_tests.txt; pack
    if [ "${STEP_S:-200}" != 0 ]; then
    timeout ${STEP_S:-200} python3 benchmarks/train_step.py --configs small --peers none --fp8 --steps ${STEPS:-8} \
        --profile-dir $S --out $S/train_step.json 2>&1 | grep -v Warn > $S/train_step.log
    grep -E "^\[|device" $S/train_step.log | head -12
    rm -f $S/*.trace.json; pack; fi
    timeout ${DIST_S:-300} python3 benchmarks/distributed.py --out /tmp/d --runs ${RUNS:-one:12:4,one_fp8:12:4,one_cg_fp8:12:4} \
        > $S/distributed.log 2>&1; echo "distributed rc=$?"; grep -E "^\[|step_s" $S/distributed.log | tail -12
    for r in $(ls /tmp/d 2>/dev/null); do [ -f /tmp/d/$r/metrics.jsonl ] || continue; mkdir -p $S/$r
      cp /tmp/d/$r/result.json /tmp/d/$r/metrics.jsonl $S/$r/ 2>/dev/null
      cp /tmp/d/$r/profile/*.txt /tmp/d/$r/profile/*.summary.json $S/$r/ 2>/dev/null; done
    cp /tmp/d/distributed.json $S/ 2>/dev/null
    pack ;;
  fp8cg)
    # one GPU (#6, session 17's last call, ~6 min): the FP8 GPU tests (grouped kernels, W^T transpose, padded
    # compiled MoE), the trainer's FP8 step eager against CUDA graphs (the BF16 'one' baseline is read from
    # session 17's H200 run, not re-run), then cProfile of the FP8 step's host time; $OUT/fp8cg.tar.gz
    S=/tmp/fp8cg; mkdir -p $S
    pack() { tar czf $OUT/fp8cg.tar.gz -C /tmp fp8cg; }
    nvidia-smi --query-gpu=name --format=csv,noheader | tee $S/gpu.txt
    # a phase whose time limit is 0 is skipped (timeout 0 would mean no limit)
    [ "${TEST_S:-100}" != 0 ] && timeout ${TEST_S:-100} python3 -m pytest -q tests/test_fp8_grouped.py \
        tests/test_fp8_triton.py 2>&1 | grep -E "^E  |passed|failed|^FAILED" | head -20 | tee $S/gpu_tests.txt
    [ "${TEST2_S:-80}" != 0 ] && timeout ${TEST2_S:-80} python3 -m pytest -q tests/test_moe_compile.py \
        -k "padded or gpu" 2>&1 | grep -E "^E  |passed|failed|^FAILED" | head -20 | tee -a $S/gpu_tests.txt; pack
    mkdir -p /tmp/d/one && cp benchmarks/results/raw/2026-12-07-session17/call2_fp8s/one/result.json /tmp/d/one/
    timeout ${DIST_S:-200} python3 benchmarks/distributed.py --out /tmp/d --runs ${RUNS:-one_fp8:8:3,one_cg_fp8:8:3} \
        > $S/distributed.log 2>&1; echo "distributed rc=$?"; grep -E "^\[|step_s|Error" $S/distributed.log | tail -8
    for r in $(ls /tmp/d 2>/dev/null); do [ -f /tmp/d/$r/metrics.jsonl ] || continue; mkdir -p $S/$r
      cp /tmp/d/$r/result.json /tmp/d/$r/metrics.jsonl $S/$r/ 2>/dev/null
      cp /tmp/d/$r/profile/*.txt /tmp/d/$r/profile/*.summary.json $S/$r/ 2>/dev/null; done
    tail -c 6000 /tmp/d/one_cg_fp8/train.log > $S/one_cg_fp8_train_log_tail.txt 2>/dev/null; pack
    [ "${PROF_S:-90}" != 0 ] && timeout ${PROF_S:-90} python3 benchmarks/fp8_cpu_profile.py \
        --out $S/fp8_cpu_profile.txt 2>&1 | grep -v Warn | head -60 | cut -c1-160; pack ;;
  cg8)
    S=/tmp/cg8; mkdir -p $S
    pack() { tar czf $OUT/cg8.tar.gz -C /tmp cg8; }
    nvidia-smi --query-gpu=name --format=csv,noheader | tee $S/gpu.txt
    # -v: each test's line is written as it ends, so a phase cut by its time limit still shows what passed
    [ "${TEST_S:-150}" != 0 ] && timeout ${TEST_S:-150} python3 -m pytest -v -rf ${TESTS:-tests/test_fp8_grouped.py \
        tests/test_fp8_triton.py tests/test_moe_compile.py} -k "${TEST_K:-op or graph_break or both_axes or gpu or padded}" \
        > $S/gpu_tests.txt 2>&1; echo "tests rc=$? (124: cut by TEST_S)"; grep -cE " PASSED" $S/gpu_tests.txt
    grep -E "^E  |passed|failed| FAILED|SKIPPED" $S/gpu_tests.txt | cut -c1-200 | head; pack
    [ "${STEP_S:-150}" != 0 ] && timeout ${STEP_S:-150} python3 benchmarks/train_step.py --configs ${CONFIGS:-small} --fp8 \
        --cudagraphs --steps ${STEPS:-8} --profile-dir $S --out $S/train_step.json ${STEP_ARGS:---peers none} 2>&1 \
        | grep -v Warn > $S/train_step.log; echo "train_step rc=$?"
    grep -E "^\[|device|Error|error" $S/train_step.log | head -20; rm -f $S/*.trace.json; pack
    # AB_S > 0: the small FP8 step (default compile mode) with fp8.triton_quant.PAIRED_LAUNCH flipped, same run
    if [ "${AB_S:-0}" != 0 ]; then timeout ${AB_S} python3 benchmarks/train_step.py --configs small --fp8 --steps 8 \
        --peers none --ab ${AB_FLAGS:-fp8.triton_quant.PAIRED_LAUNCH} --out $S/train_step_ab.json 2>&1 | grep -v Warn \
        > $S/train_step_ab.log; echo "ab rc=$?"; grep -E "^\[|Error" $S/train_step_ab.log | head; pack; fi
    [ "${DIST_S:-0}" = 0 ] && exit 0
    timeout ${DIST_S} python3 benchmarks/distributed.py --out /tmp/d --runs ${RUNS:-one:10:4,one_fp8:10:4,one_cg_fp8:10:4} \
        > $S/distributed.log 2>&1; echo "distributed rc=$?"; grep -E "^\[|step_s|Error" $S/distributed.log | tail -12
    for r in $(ls /tmp/d 2>/dev/null); do [ -f /tmp/d/$r/metrics.jsonl ] || continue; mkdir -p $S/$r
      cp /tmp/d/$r/result.json /tmp/d/$r/metrics.jsonl $S/$r/ 2>/dev/null
      cp /tmp/d/$r/profile/*.txt /tmp/d/$r/profile/*.summary.json $S/$r/ 2>/dev/null; done
    tail -c 4000 /tmp/d/one_cg_fp8/train.log > $S/one_cg_fp8_train_log_tail.txt 2>/dev/null
    cp /tmp/d/distributed.json $S/ 2>/dev/null; pack ;;
  fp8next)
    # one GPU (#6, planned in session 19 when no device could be started after its calls 1-2; ~6 min): the GPU
    # tests of session 19's changes (bf16 weight gradients straight from the grouped kernel, joined weight blocks
    # by output strides), the grouped kernels with and without DEFER_PROMOTION (flip it on if tma_defer wins at
    # the v3 shapes), then the small step BF16 vs FP8, compiled and as CUDA graphs; $OUT/fp8next.tar.gz
    S=/tmp/fp8next; mkdir -p $S
    pack() { tar czf $OUT/fp8next.tar.gz -C /tmp fp8next; }
    nvidia-smi --query-gpu=name --format=csv,noheader | tee $S/gpu.txt
    timeout ${TEST_S:-90} python3 -m pytest -v -p no:cacheprovider tests/test_fp8_grouped.py tests/test_fp8_triton.py \
        -k "bf16_weights or joined or custom_op or gpu" > $S/gpu_tests.txt 2>&1; echo "tests rc=$?"
    grep -cE " PASSED" $S/gpu_tests.txt; grep -E "FAILED|^E  |passed|failed" $S/gpu_tests.txt | cut -c1-200 | head; pack
    timeout ${GROUPED_S:-120} python3 benchmarks/fp8_grouped.py --out $S/fp8_grouped.json --variants tma,tma_defer \
        --iters 8 2>&1 | grep -v Warn > $S/fp8_grouped.log; echo "grouped rc=$?"
    grep -E "numerics|MISMATCH|kernels_tma" $S/fp8_grouped.log | cut -c1-400 | head -8; pack
    timeout ${STEP_S:-330} python3 benchmarks/train_step.py --configs ${CONFIGS:-small} --fp8 --cudagraphs --steps 8 \
        --peers none --out $S/train_step.json 2>&1 | grep -v Warn > $S/train_step.log; echo "step rc=$?"
    grep -E "^\[|device|Error" $S/train_step.log | head -20; pack ;;
  s20)
    # one GPU (#5, session 20; one config ~7 min): the GPU tests of the head cross-entropy change (fp32 weight
    # gradient summed by the GEMM) and of session 19's FP8 changes (TESTS_K), then train_step.py on CONFIGS
    # (default 3b) against torchtitan: ours, ours with the old head gradient (--ab
    # kernels.cross_entropy.GEMM_ACCUMULATES), ours as CUDA graphs; profiled (summaries keep full kernel names;
    # traces dropped); $OUT/s20.tar.gz after each phase. GROUPED_S > 0 adds fp8_grouped.py tma vs tma_defer.
    S=/tmp/s20; mkdir -p $S
    pack() { tar czf $OUT/s20.tar.gz -C /tmp s20; }
    install_peers
    nvidia-smi --query-gpu=name --format=csv,noheader | tee $S/gpu.txt
    if [ "${TEST_S:-100}" != 0 ]; then
    timeout ${TEST_S:-100} python3 -m pytest -v -p no:cacheprovider ${TESTS:-tests/test_kernels.py \
        tests/test_fp8_grouped.py tests/test_fp8_triton.py} \
        -k "${TESTS_K:-scaled_once or head_weight or on_gpu or bf16_weights or joined or custom_op or gpu}" \
        > $S/gpu_tests.txt 2>&1; echo "tests rc=$?"
    grep -cE " PASSED" $S/gpu_tests.txt; grep -E "FAILED|^E  |passed|failed" $S/gpu_tests.txt | cut -c1-200 | head; pack; fi
    if [ "${GROUPED_S:-0}" != 0 ]; then
    timeout ${GROUPED_S} python3 benchmarks/fp8_grouped.py --out $S/fp8_grouped.json --variants tma,tma_defer \
        --iters 8 2>&1 | grep -v Warn > $S/fp8_grouped.log; echo "grouped rc=$?"
    grep -E "numerics|MISMATCH|kernels_tma" $S/fp8_grouped.log | cut -c1-400 | head -8; pack; fi
    [ "${STEP_S:-440}" = 0 ] && { pack; exit 0; }
    timeout ${STEP_S:-440} python3 benchmarks/train_step.py --configs ${CONFIGS:-3b} --steps ${STEPS:-10} \
        --peers ${PEERS:-torchtitan} ${CG---cudagraphs} --ab "${AB-kernels.cross_entropy.GEMM_ACCUMULATES}" \
        --profile-dir $S --out $S/train_step.json ${STEP_ARGS:-} 2>&1 | grep -v Warn > $S/train_step.log
    echo "step rc=$?"; grep -E "^\[|device" $S/train_step.log | head -30
    rm -f $S/*.trace.json; pack ;;
  gather)
    # one GPU (#5, written in session 20, ~2 min): would a gather-fused grouped GEMM pay? gather_gemm_probe.py at
    # the small and 3b shapes (torch gather + CUTLASS vs our Triton kernel on gathered rows vs gathering itself;
    # forward and weight gradient)
    nvidia-smi --query-gpu=name --format=csv,noheader
    timeout ${PROBE_S:-240} python3 benchmarks/gather_gemm_probe.py --out $OUT/gather_gemm.json 2>&1 | grep -v Warn ;;
  gg)
    # one GPU (#5, written in session 21): moe.GATHER_GEMM / moe.GATHERED_COMBINE (dsv3.kernels.gather_gemm):
    # GPU tests first (kernels never compiled for a GPU yet), the probe, then the step A/B; $OUT/gg.tar.gz
    S=/tmp/gg; mkdir -p $S
    pack() { tar czf $OUT/gg.tar.gz -C /tmp gg; }
    nvidia-smi --query-gpu=name --format=csv,noheader | tee $S/gpu.txt
    timeout ${TEST_S:-80} python3 -m pytest -v -p no:cacheprovider tests/test_gather_gemm.py \
        tests/test_moe_permute_kernels.py > $S/gpu_tests.txt 2>&1; echo "tests rc=$?"
    grep -cE " PASSED" $S/gpu_tests.txt; grep -E "FAILED|^E  |passed|failed" $S/gpu_tests.txt | cut -c1-200 | head; pack
    timeout ${PROBE_S:-200} python3 benchmarks/gather_gemm_probe.py --out $S/gather_gemm.json 2>&1 | grep -v Warn \
        > $S/probe.log; echo "probe rc=$?"; cut -c1-600 $S/probe.log; pack
    timeout ${STEP_S:-280} python3 benchmarks/train_step.py --configs ${CONFIGS:-small,3b} --steps ${STEPS:-10} \
        --peers none --ab "${AB-GATHER_GEMM+GATHERED_COMBINE,GATHER_GEMM+GATHERED_COMBINE+kernels.gather_gemm.B_LOADS=tma}" \
        --out $S/train_step.json 2>&1 | grep -v Warn \
        > $S/train_step.log; echo "step rc=$?"; grep -E "^\[|device|Error" $S/train_step.log | head -30; pack ;;
  fp8lin)
    # one GPU (#6, session 9): the FP8 quantizer and linear GPU tests (+ the CUDA-graph block test of #9), the
    # FP8 linear against the blockwise _scaled_mm GEMMs alone (with and without the per-step weight cache),
    # the grouped expert kernels, and the small FP8 step against BF16; everything packed in $OUT/fp8lin.tar.gz
    S=/tmp/fp8lin; mkdir -p $S
    nvidia-smi --query-gpu=name --format=csv,noheader | tee $S/gpu.txt
    timeout ${TEST_S:-240} python3 -m pytest -q ${TESTS:-tests/test_fp8_triton.py tests/test_fp8_linear.py \
        tests/test_fp8_grouped.py tests/test_compile.py} 2>&1 | grep -E "^E  |passed|failed|^FAILED" | head -30 \
        | tee $S/gpu_tests.txt
    timeout 150 python3 benchmarks/fp8_linear.py --out $S/fp8_linear.json 2>&1 | grep -v Warn | tee $S/fp8_linear.log
    timeout 120 python3 benchmarks/fp8_grouped.py --out $S/fp8_grouped.json 2>&1 | grep -v Warn > $S/fp8_grouped.log
    tail -8 $S/fp8_grouped.log
    timeout ${STEP_S:-200} python3 benchmarks/train_step.py --configs small --peers none --fp8 --steps ${STEPS:-12} \
        --out $S/train_step.json 2>&1 | grep -v Warn > $S/train_step.log
    grep -E "^\[|device|fp8|FP8" $S/train_step.log | head -20
    tar czf $OUT/fp8lin.tar.gz -C /tmp fp8lin ;;
  *)
    echo "usage: $0 fp8|dist|cg1|wc1|local|exch|ep2|ep2wait|one|onewait|step|fp8lin|cg8|fp8next|s20|gather|gg" >&2; exit 2 ;;
esac
