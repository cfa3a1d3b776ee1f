#!/usr/bin/env bash
# Reproduces the naive/joint tables of docs/RESULTS.md: every baseline config × scenario × 3 seeds,
# then prints mean ± std of the final metrics with `sequel compare`.
# Needs the full Fashion-MNIST (apt-get install dataset-fashion-mnist). Usage: scripts/baselines.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/baselines}
cargo build -q --release -p sequel-bench
SEQUEL=target/release/sequel
for algo in naive joint; do
  for seed in 0 1 2; do
    for scen in class-il task-il; do
      $SEQUEL run configs/split-fmnist/$algo.yaml --seed $seed --quiet --out "$OUT" \
        --set benchmark.scenario=$scen --set name=split-fmnist-$algo-$scen >/dev/null
    done
    for kind in permuted rotated; do
      $SEQUEL run configs/$kind-fmnist/$algo.yaml --seed $seed --quiet --out "$OUT" >/dev/null
    done
  done
done
$SEQUEL compare "$OUT"
