#!/usr/bin/env bash
# Reproduces the tables of docs/CONSOLIDATION.md: naive fine-tuning and ER without consolidation and
# with each strategy, and a LiNeS γ sweep, on split Fashion-MNIST (class-IL and task-IL) and permuted
# Fashion-MNIST (domain-IL), 3 seeds each; prints one `sequel compare` table per benchmark.
# Needs the full Fashion-MNIST (apt-get install dataset-fashion-mnist).
# Usage: scripts/consolidation.sh [OUT]   (SEQUEL=path/to/sequel skips the release build)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/consolidation}
if [ -z "${SEQUEL:-}" ]; then
  cargo build -q --release -p sequel-bench
  SEQUEL=target/release/sequel
fi
STRATEGIES=(
  "none|"
  "lines-0.5|{name: lines, gamma: 0.5}"
  "average|{name: average}"
  "ties|{name: ties}"
  "magmax|{name: magmax}"
  "ema|{name: ema}"
  "task-arithmetic|{name: task-arithmetic}"
  "dare|{name: dare}"
  "ties-initial|{name: ties, anchor: initial}"
  "lines-0.0|{name: lines, gamma: 0.0}"
  "lines-0.25|{name: lines, gamma: 0.25}"
  "lines-0.75|{name: lines, gamma: 0.75}"
)
run() { # bench config scenario [extra run arguments...]
  local bench=$1 cfg=$2 scen=$3
  shift 3
  for seed in 0 1 2; do
    for s in "${STRATEGIES[@]}"; do
      local name=${s%%|*} spec=${s#*|}
      # Finished runs are kept, so an interrupted script continues.
      [ -d "$OUT/$bench/$name/seed-$seed" ] && continue
      local args=(--seed "$seed" --quiet --out "$OUT/$bench" --set "name=$name"
        --set "benchmark.scenario=$scen" "$@")
      [ -n "$spec" ] && args+=(--set "consolidation=$spec")
      $SEQUEL run "$cfg" "${args[@]}" >/dev/null
    done
  done
  echo "## $bench"
  $SEQUEL compare "$OUT/$bench"
}
# PART=naive or PART=er runs one half (default: both).
if [ "${PART:-all}" != er ]; then
  run split-class-il configs/split-fmnist/naive.yaml class-il
  run split-task-il configs/split-fmnist/naive.yaml task-il
  run permuted-domain-il configs/permuted-fmnist/naive.yaml domain-il
fi
if [ "${PART:-all}" != naive ]; then
  # ER with a 200-sample reservoir memory: the split preset (lr 0.01), and on permuted FMNIST the
  # naive protocol (lr 0.2, batch 128) with as many replayed samples as incoming ones.
  STRATEGIES=("none|" "lines-0.5|{name: lines, gamma: 0.5}" "average|{name: average}"
    "ties|{name: ties}" "magmax|{name: magmax}")
  run er-split-class-il configs/split-fmnist/er-200.yaml class-il
  run er-split-task-il configs/split-fmnist/er-200.yaml task-il
  run er-permuted-domain-il configs/permuted-fmnist/naive.yaml domain-il \
    --set 'algorithm={name: er, buffer_size: 200, replay_batch_size: 128}'
fi
