#!/usr/bin/env bash
# Behaviour fingerprint for refactors that must not change results (issue 10, Algorithm API v2):
# every registered algorithm × scenario on the embedded fmnist-mini (3 seeds), one consolidation
# strategy per anchor, and every split-fmnist preset on the full data (seed 0). Prints one line per
# run: `<run> <sha256 of accuracy_matrix.csv> <sha256 of accuracy_matrix_raw.csv or ->`.
# Compare two fingerprints with `diff`; a line that differs names the run whose numbers changed.
# Byte identity holds on one machine and thread count (RAYON_NUM_THREADS is pinned to 1 here).
#
# Usage: scripts/fingerprint.sh [OUT] > fingerprint.txt   (FULL=0 skips the full-data presets;
#        SEQUEL=path uses an existing binary instead of building one)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-$(mktemp -d)}
mkdir -p "$OUT"
export RAYON_NUM_THREADS=1
if [ -z "${SEQUEL:-}" ]; then
  cargo build -q --release -p sequel-bench
  SEQUEL=${CARGO_TARGET_DIR:-target}/release/sequel
fi
ALGOS=$("$SEQUEL" list | awk '/^algorithms/{a=1;next} /^[^ ]/{a=0} a{print $1}')
Q=configs/quickstart.yaml
run() { "$SEQUEL" run "$@" --quiet --out "$OUT" >/dev/null 2>"$OUT/last.err" || { echo "failed: $*" >&2; cat "$OUT/last.err" >&2; }; }
for algo in $ALGOS; do
  for seed in 0 1 2; do
    run $Q --seed "$seed" --set "algorithm.name=$algo" --set "name=mini-class-il-$algo"
    run $Q --seed "$seed" --set "algorithm.name=$algo" --set benchmark.scenario=task-il --set "name=mini-task-il-$algo"
    run $Q --seed "$seed" --set "algorithm.name=$algo" --set benchmark.scenario=task-il \
      --set benchmark.task_il_head=multi --set "name=mini-task-il-multi-$algo"
    run $Q --seed "$seed" --set "algorithm.name=$algo" --set benchmark.kind=permuted \
      --set benchmark.scenario=domain-il --set benchmark.tasks=3 --set "name=mini-perm-domain-il-$algo"
  done
done
for cons in "{name: lines, gamma: 0.5}" "{name: ties}" "{name: ema, anchor: previous}"; do
  for seed in 0 1 2; do
    run $Q --seed "$seed" --set "consolidation=$cons" --set "algorithm.name=er" \
      --set "name=mini-cons-$(echo "$cons" | tr -dc 'a-z')"
  done
done
if [ "${FULL:-1}" != 0 ]; then
  for cfg in configs/split-fmnist/*.yaml; do
    run "$cfg" --seed 0 --set "name=full-$(basename "$cfg" .yaml)"
  done
fi
sum() { if [ -f "$1" ]; then sha256sum "$1" | cut -c1-16; else echo -; fi; }
for d in "$OUT"/*/seed-*; do
  echo "${d#"$OUT"/} $(sum "$d/accuracy_matrix.csv") $(sum "$d/accuracy_matrix_raw.csv")"
done
