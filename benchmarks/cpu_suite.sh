#!/usr/bin/env bash
# The CPU figures of docs/BENCHMARKS.md in one go (about an hour on 2 cores; ~50 GB of disk at
# the peak). Run it when nothing else uses the machine: every step alternates implementations, so
# ratios survive some noise, absolute times do not.
#   bash benchmarks/cpu_suite.sh [STEP ...]     steps: gemv convert load decode f32 e4b (default: all)
# Data in $DATA (default ~/bench-data); tables and JSON in $DATA/logs-<date>/.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${DATA:-$HOME/bench-data}
logs=$data/logs-$(date -u +%Y%m%d-%H%M)
steps=${*:-gemv convert load decode f32 e4b}
mkdir -p "$logs"
py=${PYTHON:-python}
echo "logs in $logs"
[ -d "$data/e2b-bf16" ] || $py benchmarks/make_checkpoint.py --size e2b "$data/e2b-bf16"
profile=$logs/cpu-calibrated.yaml
for step in $steps; do
  case $step in
    gemv)
      $py benchmarks/bench_gemv.py --profile-out "$profile" 2>"$logs/gemv.err" | tee "$logs/gemv.md" ;;
    convert)
      $py benchmarks/bench_convert.py "$data/e2b-bf16" --work "$data/convout" --runs 3 \
        --json "$logs/convert-e2b.json" | tee "$logs/convert-e2b.md" ;;
    load|decode)
      [ -d "$data/e2b-generic" ] || $py -m convert --target generic --quiet "$data/e2b-bf16" "$data/e2b-generic"
      if [ "$step" = load ]; then
        $py benchmarks/bench_runtime.py load "$data/e2b-generic" --runs 5 --json "$logs/load-e2b.json" | tee "$logs/load-e2b.md"
      else
        # bfloat16 on this CPU runs ~0.4 tok/s: short prompt and few tokens.
        $py benchmarks/bench_runtime.py decode "$data/e2b-generic" --rounds 3 --reps 2 --prompt 8 --tokens 8 \
          --json "$logs/decode-e2b-bf16.json" | tee "$logs/decode-e2b-bf16.md"
      fi ;;
    f32)
      [ -f "$profile" ] || profile=$(ls -t "$data"/logs-*/cpu-calibrated.yaml | head -1)
      rm -rf "$data/e2b-generic"  # disk: two float32 bundles are 37 GB
      $py -m convert --target generic --dtype float32 --quiet "$data/e2b-bf16" "$data/e2b-f32-generic"
      $py -m convert --target-profile "$profile" --dtype float32 --quiet "$data/e2b-bf16" "$data/e2b-f32-cal"
      $py benchmarks/bench_runtime.py decode "$data/e2b-f32-generic" "$data/e2b-f32-cal" --source "$data/e2b-f32-generic" \
        --rounds 3 --reps 2 --prompt 8 --tokens 8 --json "$logs/decode-e2b-f32.json" | tee "$logs/decode-e2b-f32.md"
      rm -rf "$data/e2b-f32-generic" "$data/e2b-f32-cal" ;;
    e4b)
      [ -d "$data/e4b-bf16" ] || $py benchmarks/make_checkpoint.py --size e4b "$data/e4b-bf16"
      $py benchmarks/bench_convert.py "$data/e4b-bf16" --work "$data/convout" --runs 3 \
        --json "$logs/convert-e4b.json" | tee "$logs/convert-e4b.md"
      rm -rf "$data/e4b-bf16" ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
