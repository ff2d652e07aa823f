#!/usr/bin/env bash
# One measurement on an NVIDIA GPU (written for an H100, run on an H200 too) with MLX's CUDA build importable
# (mlx 0.32.4 with mlx-cuda-13 and mlx-lm 0.32.2 were measured), from the repository's root:
#   bash benchmarks/h100.sh e2b decode
# Each JSON records the commit (git rev-parse HEAD); in a copy of the tree without .git, pass it:
#   BENCH_COMMIT=<the commit's hash> bash benchmarks/h100.sh e2b decode
# Steps: prepare (the checkpoint and its bf16 bundles, nothing measured: minutes at full size, so
# it can run in the background while a narrow step uses the machine,
#   (setsid nohup bash benchmarks/h100.sh e4b prepare > /tmp/prepare-e4b.log 2>&1 &)
# and a later call's e4b steps wait for it), decode (runtime eager and compiled vs mlx-lm, same weights), fast (compiled only vs
# mlx-lm), probe / sanitize (where a 4-bit prefill stops being deterministic), coldstart (time to
# first token with empty vs warm kernel caches; coldstart-q4 on 4-bit bundles), profile (device time per kernel class of a step), prefill-q4 (a
# 4-bit prefill's wall time, ours, its variants and mlx-lm's, then each one's kernels), q4 (4-bit bundles, compiled vs mlx-lm on the same 4-bit arrays), graphs / graphs-q4
# (MLX's CUDA graph settings tried on either side vs its defaults, bench_graphs.py), calibrate (GEMV
# layouts), graph (nodes per decode step, bench_graph.py), variants (layout experiments), numeric
# (`runtime verify --numeric --runs RUNS` on the 4-bit and bf16 cuda bundles), ple (the per-layer
# embedding table resident vs mapped, bf16 and 4-bit: memory, TTFT, decode; bench_ple.py), cuda-tests
# (tests/test_cuda_blocks.py), blocks (compiled decode with and without the fused CUDA kernels, alternating), ab
# (this tree's compiled decode against AB_TREE's, another commit's copy, alternating). Sizes: e2b, e4b, and e2b-narrow / e4b-narrow
# (every layer at tiny widths: launch cost alone, made in seconds).
# The random full-size checkpoint and its bundle are made there, in /tmp/bench-data or $BENCH_DATA
# (nothing that big travels).
set -euo pipefail
size=${1:-e2b}
shift || true
steps=${*:-decode}
known="prepare decode fast q4 graphs graphs-q4 sweep variants numeric graph probe sanitize coldstart coldstart-q4 profile prefill-q4 ple calibrate cuda-tests blocks ab"
case $size in e2b|e4b|e2b-narrow|e4b-narrow) ;; *) echo "unknown size '$size': one of e2b, e4b, e2b-narrow, e4b-narrow" >&2; exit 2 ;; esac
for step in $steps; do
  case " $known " in *" $step "*) ;; *) echo "unknown step '$step': one of $known" >&2; exit 2 ;; esac
done
# Counts from the environment: whole numbers from 1 (a typo would run nothing, or pytest would refuse late).
for var in ROUNDS ROUND_FROM TOKENS JOBS RUNS; do
  value=${!var:-}
  [ -z "$value" ] || [[ "$value" =~ ^[1-9][0-9]{0,5}$ ]] || {
    echo "$var='${value:0:40}': a whole number from 1 to 999999" >&2; exit 2; }
done
if [ -n "${ROUND_FROM:-}" ]; then
  [ -n "${ROUNDS:-}" ] && [ "$ROUND_FROM" -le "$ROUNDS" ] || {
    echo "ROUND_FROM=$ROUND_FROM needs ROUNDS, the last round, at least as large" >&2; exit 2; }
fi
case " $steps " in *" ab "*)
  [ -f "${AB_TREE:-}/benchmarks/bench_runtime.py" ] && [ -n "${AB_COMMIT:-}" ] || {
    echo "step ab needs AB_TREE, a copy of another commit's tree (git archive REV runtime convert manifests benchmarks | tar -x -C DIR), and AB_COMMIT, that commit" >&2; exit 2; } ;;
esac
data=${BENCH_DATA:-/tmp/bench-data}
out=${OUT:-/tmp}
# Fail before minutes of checkpoint writing when the machine was handed back and came up bare.
python3 -c "import mlx.core" 2>/dev/null || { echo "MLX is not importable here: install MLX's CUDA build (or activate its environment) first" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# A measurement needs the GPU to itself: a run cut off by a time limit may leave its processes
# decoding on (docs/BENCHMARKS.md, "a disturbed machine"). BUSY_OK=1 measures anyway.
mkdir -p "$data"
# The data (checkpoint, bundles) is made under a lock: one per narrow size, one for the full sizes
# (one full model at a time: the disk holds about 64 GB). `prepare` makes the checkpoint and the
# bf16 bundles and nothing else, so it can run in the background while a call measures something
# else; a step that needs the same data waits for it instead of writing the same directories,
# and finds only whole ones (the checkpoint and each bundle are renamed into place when done).
case $size in *-narrow) lock=$data/.lock-$size ;; *) lock=$data/.lock-full ;; esac
locked() {  # run "$@" holding the data lock (where flock exists)
  ( if command -v flock >/dev/null; then flock 9; fi; "$@" ) 9>"$lock"
}
locked true  # a prepare of this data in flight finishes before the GPU is looked at
# A measurement needs the GPU to itself: a run cut off by a time limit may leave its processes
# decoding on (docs/BENCHMARKS.md, "a disturbed machine"). BUSY_OK=1 measures anyway; `prepare`
# alone measures nothing and does not ask.
busy=$(nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader 2>/dev/null || true)
if [ -n "$busy" ] && [ "${BUSY_OK:-0}" != 1 ] && [ "$steps" != prepare ]; then
  echo "the GPU is busy with other processes (left over from an earlier run?); stop them, or BUSY_OK=1:" >&2
  echo "$busy" >&2
  exit 2
fi
checkpoint() {
  [ ! -d "$data/$size" ] || return 0
  # a full size replaces the other one, and what a killed run left of either (hidden, partial)
  case $size in *-narrow) ;; *) rm -rf "$data"/e?b "$data"/e?b-* "$data"/.e?b*.partial-* ;; esac
  python3 benchmarks/make_checkpoint.py --size "$size" --quiet "$data/$size"
}
bundles() {  # the bf16 bundles (the q4 and calibrate steps need neither)
  [ -d "$data/$size-cuda" ] || python3 -m convert --target cuda --quiet "$data/$size" "$data/$size-cuda"
  # mlx-lm runs the generic bundle's arrays (the cuda profile fuses q/k/v and gate/up, which mlx-lm cannot load)
  [ -d "$data/$size-generic" ] || python3 -m convert --target generic --quiet "$data/$size" "$data/$size-generic"
}
q4_bundles() {  # the 4-bit bundles of the targets named (generic for mlx-lm, cuda for ours)
  for t in "$@"; do
    [ -d "$data/$size-$t-q4" ] || python3 -m convert --target "$t" --quantize 4 --quiet "$data/$size" "$data/$size-$t-q4"
  done
}
locked checkpoint
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1 || true)  # profile steps only
for step in $steps; do
  case $step in q4|graphs-q4|prefill-q4|coldstart-q4|calibrate|probe|sanitize|ple|cuda-tests) ;; *) locked bundles ;; esac
  case $step in
    prepare)
      echo "prepared: $data/$size, $data/$size-cuda, $data/$size-generic" ;;
    cuda-tests)
      # The fused CUDA kernels' tests (skipped on machines without CUDA); pytest from the wheels
      # benchmarks/stage_test_wheels.sh adds to the staged build (copied to /root/mlxw by its stage.sh).
      if ! python3 -c "import pytest" 2>/dev/null; then
        ls /root/mlxw/pytest-*.whl >/dev/null 2>&1 || {
          echo "no pytest here: run benchmarks/stage_test_wheels.sh before staging's first call" >&2; exit 2; }
        python3 -m pip install -q --no-index --no-deps --target /tmp/mlxsite /root/mlxw/pytest-*.whl \
          /root/mlxw/pluggy-*.whl /root/mlxw/iniconfig-*.whl /root/mlxw/packaging-*.whl /root/mlxw/pygments-*.whl
      fi
      # JOBS=N spreads the tests over N processes where pytest-xdist is importable (each process
      # compiles the kernels its tests use: MLX keeps no custom kernel on disk); default one.
      jobs=(); if [ "${JOBS:-1}" != 1 ] && python3 -c "import xdist" 2>/dev/null; then jobs=(-n "$JOBS"); fi
      MLX_ENABLE_TF32=0 python3 -m pytest -q -p no:cacheprovider "${jobs[@]}" tests/test_cuda_blocks.py 2>&1 | tee "$out/cuda-tests.txt" ;;
    blocks)
      # The compiled step with the fused CUDA kernels (runtime/cuda_blocks.py, the default) and
      # without (MLXP_CUDA_BLOCKS=0), each against mlx-lm in its own run, alternating for ROUNDS
      # rounds (default 1), the order swapped every round: on one machine a process's speed can
      # move by as much as the kernels do (docs/BENCHMARKS.md, the H200's pairs). ROUND_FROM=R
      # starts at round R (a later call on the same machine continues where one left off).
      for r in $(seq "${ROUND_FROM:-1}" "${ROUNDS:-1}"); do
        order="1 0"; [ $((r % 2)) = 0 ] && order="0 1"
        for on in $order; do
          MLXP_CUDA_BLOCKS=$on python3 benchmarks/bench_runtime.py decode "$data/$size-cuda" --source "$data/$size-generic" \
            --no-eager --rounds 1 --reps 3 --prompt 64 --tokens "${TOKENS:-128}" --json "$out/blocks$on-$size-$r.json"
        done
      done ;;
    ab)
      # This tree's compiled decode and AB_TREE's (another commit's runtime and benchmarks), each
      # against mlx-lm in its own run, alternating for ROUNDS rounds (default 2), the order
      # swapped every round: an A/B of two commits on one machine (AB_COMMIT names AB_TREE's in
      # its JSON: inside this repository git would name this tree's).
      for r in $(seq "${ROUND_FROM:-1}" "${ROUNDS:-2}"); do  # ROUND_FROM as in blocks
        order="this that"; [ $((r % 2)) = 0 ] && order="that this"
        for side in $order; do
          tree=.; commit=${BENCH_COMMIT:-}; [ "$side" = that ] && tree=$AB_TREE && commit=$AB_COMMIT
          BENCH_COMMIT=$commit python3 "$tree/benchmarks/bench_runtime.py" decode "$data/$size-cuda" \
            --source "$data/$size-generic" --no-eager --rounds 1 --reps 3 --prompt 64 --tokens "${TOKENS:-128}" \
            --json "$out/ab-$side-$size-$r.json"
        done
      done ;;
    decode)
      python3 benchmarks/bench_runtime.py decode "$data/$size-cuda" --source "$data/$size-generic" --compiled \
        --rounds "${ROUNDS:-3}" --prompt 64 --tokens "${TOKENS:-64}" --json "$out/decode-$size.json" ;;
    fast)
      python3 benchmarks/bench_runtime.py decode "$data/$size-cuda" --source "$data/$size-generic" --no-eager \
        --rounds "${ROUNDS:-2}" --reps 3 --prompt 64 --tokens "${TOKENS:-64}" --json "$out/fast-$size.json" ;;
    q4)
      locked q4_bundles generic cuda
      python3 benchmarks/bench_quantized.py decode "$data/$size-generic-q4" --ours "$data/$size-cuda-q4" --compiled \
        --rounds "${ROUNDS:-2}" --reps 3 --prompt 64 --tokens "${TOKENS:-64}" --json "$out/q4-$size.json" ;;
    graphs|graphs-q4)
      # MLX's CUDA graph settings (bench_graphs.py --try, default ours:2000/2000 and 2000/2000) vs its defaults;
      # TRIES="nographs ours:nographs" tries those instead.
      tries=(); for t in ${TRIES:-}; do tries+=(--try "$t"); done
      if [ "$step" = graphs-q4 ]; then
        locked q4_bundles generic cuda
        python3 benchmarks/bench_graphs.py "$data/$size-cuda-q4" "$data/$size-generic-q4" --quantized \
          --rounds "${ROUNDS:-3}" --tokens "${TOKENS:-64}" "${tries[@]}" --json "$out/graphs-q4-$size.json"
      else
        python3 benchmarks/bench_graphs.py "$data/$size-cuda" "$data/$size-generic" \
          --rounds "${ROUNDS:-3}" --tokens "${TOKENS:-64}" "${tries[@]}" --json "$out/graphs-$size.json"
      fi ;;
    sweep)
      # MLX's CUDA backend records up to MLX_MAX_OPS_PER_BUFFER ops per CUDA graph and keeps
      # MLX_CUDA_GRAPH_CACHE_SIZE graphs: a decode step of ~1000 ops may not fit the defaults.
      for ops in 20 100 250; do for cache in 100 2000; do
        echo "== MLX_MAX_OPS_PER_BUFFER=$ops MLX_CUDA_GRAPH_CACHE_SIZE=$cache"
        MLX_MAX_OPS_PER_BUFFER=$ops MLX_CUDA_GRAPH_CACHE_SIZE=$cache python3 benchmarks/bench_runtime.py decode \
          "$data/$size-cuda" --source "$data/$size-generic" --compiled --rounds 1 --reps 2 --prompt 64 \
          --tokens "${TOKENS:-64}" --json "$out/sweep-$size-$ops-$cache.json" | tail -4
      done; done ;;
    variants)
      # The same weights in three layouts (benchmarks/profiles/), compiled decode only, vs mlx-lm.
      for v in small-pretransposed all-pretransposed; do
        [ -d "$data/$size-$v" ] || python3 -m convert --target-profile "benchmarks/profiles/cuda-$v.yaml" --quiet \
          "$data/$size" "$data/$size-$v"
      done
      python3 benchmarks/bench_runtime.py decode "$data/$size-generic" "$data/$size-cuda" "$data/$size-small-pretransposed" \
        "$data/$size-all-pretransposed" --source "$data/$size-generic" --no-eager --rounds "${ROUNDS:-2}" --reps 3 \
        --prompt 64 --tokens "${TOKENS:-64}" --json "$out/variants-$size.json" ;;
    numeric)
      # verify --numeric on the 4-bit and the bf16 cuda bundle: known answers (numpy, this machine's CPU) if
      # absent, then each path RUNS times here (every run after the first bit for bit against it).
      locked q4_bundles cuda
      for b in "$data/$size-cuda-q4" "$data/$size-cuda"; do
        grep -q '^known_answers:' "$b/manifest.yaml" || python3 -m convert known-answers "$b"
        python3 -m runtime verify --numeric --runs "${RUNS:-10}" "$b" | tee -a "$out/numeric-$size.txt" || true
      done ;;
    graph)
      python3 benchmarks/bench_graph.py "$data/$size-generic" --top 20
      python3 benchmarks/bench_graph.py "$data/$size-cuda" --no-mlx-lm --top 20 ;;
    probe)
      # Where a 4-bit prefill stops being deterministic (cuda_q4_probe.py: the culprit module, alone,
      # fresh and with a poisoned buffer cache), then MLX's quantized matmul shape by shape.
      locked q4_bundles generic
      python3 benchmarks/cuda_q4_probe.py "$data/$size-generic-q4" --mlx-lm --repeats "${REPEATS:-8}" \
        --phases "${PHASES:-repeat,stages,ops,memory,isolate}" --json "$out/probe-$size.json" --save-npz "$out/probe-$size-op.npz"
      python3 benchmarks/cuda_qmm_sweep.py --json "$out/qmm-sweep.json" | grep -v "^ok " || true ;;
    sanitize)
      # compute-sanitizer over the smallest repro (initcheck: reads of memory nothing wrote; racecheck:
      # shared-memory races) and over one 4-token prefill of the model.
      cs=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
      locked q4_bundles generic
      for tool in initcheck racecheck; do
        timeout 150 "$cs" --tool $tool --print-limit 3 python3 benchmarks/cuda_qmm_repro.py --repeats 1 2>&1 | head -40 || true
      done
      timeout 240 "$cs" --tool initcheck --print-limit 3 python3 benchmarks/cuda_q4_probe.py "$data/$size-generic-q4" \
        --phases repeat --lengths 4 --repeats 2 2>&1 | head -40 || true ;;
    coldstart)
      # Time to first token from a process start with MLX's kernel caches empty vs warm, vs mlx-lm.
      # IMPLS: any of ours (background compile, as runtime generate), ours-foreground, mlx-lm
      python3 benchmarks/bench_coldstart.py "$data/$size-cuda" "$data/$size-generic" --rounds "${ROUNDS:-1}" \
        --impls "${IMPLS:-ours,ours-foreground,mlx-lm}" --tokens "${TOKENS:-16}" --json "$out/coldstart-$size.json" ;;
    coldstart-q4)
      # The same on the 4-bit bundles (mlx-lm on the generic 4-bit bundle's arrays): a 4-bit prefill compiles
      # MLX's quantized kernels too, on both sides.
      locked q4_bundles generic cuda
      python3 benchmarks/bench_coldstart.py "$data/$size-cuda-q4" "$data/$size-generic-q4" --rounds "${ROUNDS:-1}" \
        --impls "${IMPLS:-ours,mlx-lm}" --tokens "${TOKENS:-16}" --json "$out/coldstart-q4-$size.json" ;;
    profile)
      # Device time per kernel class of one compiled decode step (Nsight Compute) against its wall time.
      wall=$(python3 benchmarks/profile_step.py time "$data/$size-cuda" | tee /dev/stderr | awk '/wall ms/{print $5}')
      timeout 300 "$ncu" --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \
        --log-file "$out/ncu-$size.csv" python3 benchmarks/profile_step.py kernels "$data/$size-cuda" --steps 1 || true
      python3 benchmarks/profile_step.py parse "$out/ncu-$size.csv" --wall-ms "$wall" --steps 1 | tee "$out/profile-$size.txt" ;;
    prefill-q4)
      # A 4-bit prefill of PROMPT tokens (default 64): wall time of ours (as it runs, and the variants
      # profile_step.py names), of mlx-lm on the same arrays, then Nsight Compute's kernels of ours and mlx-lm's.
      locked q4_bundles generic cuda
      p=${PROMPT:-64}
      for r in 1 2; do
        for v in default kernel whole; do
          python3 benchmarks/profile_step.py prefill-time "$data/$size-cuda-q4" --variant $v --prompt "$p" | tee -a "$out/prefill-q4-$size.txt"
        done
        python3 benchmarks/profile_step.py prefill-time "$data/$size-generic-q4" --impl mlx-lm --prompt "$p" | tee -a "$out/prefill-q4-$size.txt"
      done
      for impl in ours mlx-lm; do
        b="$data/$size-cuda-q4"; [ $impl = mlx-lm ] && b="$data/$size-generic-q4"
        timeout 200 "$ncu" --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \
          --log-file "$out/ncu-prefill-q4-$size-$impl.csv" python3 benchmarks/profile_step.py prefill-kernels "$b" \
          --impl $impl --prompt "$p" || true
        echo "== $impl" | tee -a "$out/prefill-q4-$size.txt"
        python3 benchmarks/profile_step.py parse "$out/ncu-prefill-q4-$size-$impl.csv" --top 30 | tee -a "$out/prefill-q4-$size.txt" || true
      done ;;
    ple)
      # One conversion per dtype (--ple mapped) and its resident twin (bench_ple.py twin: hard links, the
      # same bytes, the table loaded as a shard); then both placements side by side, alternating children.
      for q in ${PLE_DTYPES:-bf16 q4}; do  # PLE_DTYPES=q4 (or bf16) runs one of them
        m="$data/$size-cuda-$q-mapped"
        [ -d "$m" ] || python3 -m convert --target cuda --ple mapped $([ $q = q4 ] && echo --quantize 4) --quiet \
          "$data/$size" "$m"
        [ -d "$data/$size-cuda-$q-resident" ] || python3 benchmarks/bench_ple.py twin "$m" "$data/$size-cuda-$q-resident"
        python3 benchmarks/bench_ple.py decode "$data/$size-cuda-$q-resident" "$m" --rounds "${ROUNDS:-2}" --reps 3 \
          --prompt 64 --tokens "${TOKENS:-128}" --json "$out/ple-$size-$q.json"
      done ;;
    calibrate)
      python3 -m runtime calibrate --config "$data/$size/config.json" --dtype bfloat16 --dtype float32 \
        --out "$out/cuda-$size.yaml" ;;
  esac
done
