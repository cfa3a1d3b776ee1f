#!/usr/bin/env bash
# Reproduces the replay table of docs/RESULTS.md: naive, joint and every replay preset (buffers 200
# and 500) on split Fashion-MNIST, class-IL and task-IL, 3 seeds each; then prints mean ± std of the
# final metrics with `sequel compare`. Needs the full Fashion-MNIST (apt-get install
# dataset-fashion-mnist). Usage: scripts/replay.sh [OUT]   (JOBS=2 runs two at a time; results do
# not change; finished runs are skipped, so an interrupted script can be restarted)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/replay}
JOBS=${JOBS:-1}
ALGOS=${ALGOS:-er agem gem der derpp er-ace icarl gdumb}
cargo build -q --release -p sequel-bench
SEQUEL=${CARGO_TARGET_DIR:-target}/release/sequel
{
  for algo in naive joint; do
    for seed in 0 1 2; do
      for scen in class-il task-il; do
        echo "configs/split-fmnist/$algo.yaml --seed $seed --set benchmark.scenario=$scen --set name=split-fmnist-$scen-$algo"
      done
    done
  done
  for algo in $ALGOS; do
    for buffer in 200 500; do
      for seed in 0 1 2; do
        for scen in class-il task-il; do
          echo "configs/split-fmnist/$algo-$buffer.yaml --seed $seed --set benchmark.scenario=$scen --set name=split-fmnist-$scen-$algo-$buffer"
        done
      done
    done
  done
} | while read -r line; do
  name=${line##*name=}; seed=$(echo "$line" | sed 's/.*--seed \([0-9]*\).*/\1/')
  [ -d "$OUT/$name/seed-$seed" ] || echo "$line"
done | xargs -P "$JOBS" -L 1 sh -c "$SEQUEL run \"\$@\" --quiet --out '$OUT' >/dev/null || echo \"failed: \$*\" >&2" sequel
$SEQUEL compare "$OUT"
