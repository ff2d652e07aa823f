#!/usr/bin/env bash
# The compiled decode step of two source trees (e.g. a commit and the one before it) on the same
# random checkpoint, each converted by its own tree, fresh processes alternating; medians per tree:
#   git archive OLD | tar -x -C /tmp/old && bash benchmarks/ab_trees.sh /tmp/old . [SIZE] [ROUNDS]
# SIZE e2b-narrow (default: every layer of E2B at tiny widths, made in seconds) shows what a
# change does to the step's launch-bound cost; TARGET (default cuda) is the bundles' target.
set -euo pipefail
old=$(cd "$1" && pwd)
new=$(cd "$2" && pwd)
size=${3:-e2b-narrow} rounds=${4:-3} target=${TARGET:-cuda}
data=${AB_DATA:-/tmp/ab-data}
mkdir -p "$data"
[ -d "$data/$size" ] || python3 "$new/benchmarks/make_checkpoint.py" --size "$size" --quiet "$data/$size"
for t in old new; do
  tree=${!t}
  rm -rf "$data/$size-$t"
  (cd "$tree" && python3 -m convert --target "$target" --quiet "$data/$size" "$data/$size-$t")
done
for r in $(seq "$rounds"); do
  for t in old new; do
    tree=${!t}
    (cd "$tree" && python3 benchmarks/bench_runtime.py worker decode ours-compiled "$data/$size-$t" --prompt 64 \
      --tokens "${TOKENS:-64}" --reps 3 --warmup 1) | tail -1 > "$data/$t-$r.json"
  done
done
python3 - "$data" "$rounds" "$old" "$new" <<'PY'
import json, statistics, sys
data, rounds = sys.argv[1], int(sys.argv[2])
tps = {t: [x for r in range(1, rounds + 1) for x in json.load(open(f"{data}/{t}-{r}.json"))["decode_tps"]] for t in ("old", "new")}
for t, tree in zip(("old", "new"), sys.argv[3:]):
    print(f"{t} {tree}: median {statistics.median(tps[t]):.1f} tok/s (min {min(tps[t]):.1f}, max {max(tps[t]):.1f}, n {len(tps[t])})")
print(f"new / old: {statistics.median(tps['new']) / statistics.median(tps['old']):.3f}")
PY
