#!/usr/bin/env bash
# Reproduces the tables of docs/CONSOLIDATION.md: naive fine-tuning without consolidation and with
# each strategy, and a LiNeS γ sweep, on split Fashion-MNIST (class-IL and task-IL) and permuted
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
run() { # bench config scenario
  local bench=$1 cfg=$2 scen=$3
  for seed in 0 1 2; do
    for s in "${STRATEGIES[@]}"; do
      local name=${s%%|*} spec=${s#*|}
      local args=(--seed "$seed" --quiet --out "$OUT/$bench" --set "name=$name"
        --set "benchmark.scenario=$scen")
      [ -n "$spec" ] && args+=(--set "consolidation=$spec")
      $SEQUEL run "$cfg" "${args[@]}" >/dev/null
    done
  done
  echo "## $bench"
  $SEQUEL compare "$OUT/$bench"
}
run split-class-il configs/split-fmnist/naive.yaml class-il
run split-task-il configs/split-fmnist/naive.yaml task-il
run permuted-domain-il configs/permuted-fmnist/naive.yaml domain-il
