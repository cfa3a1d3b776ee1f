#!/usr/bin/env bash
# Reproduces the regularization table of docs/RESULTS.md: naive and every regularizer preset on
# split Fashion-MNIST (class-IL, task-IL) and permuted Fashion-MNIST (domain-IL, task-IL multi-head,
# class-IL), 3 seeds each, then prints mean ± std of the final metrics from each run's summary.json.
# Needs the full Fashion-MNIST (apt-get install dataset-fashion-mnist).
# Usage: scripts/regularization.sh [OUT]   (JOBS=2 runs two at a time; results do not change)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/regularization}
JOBS=${JOBS:-1}
ALGOS=${ALGOS:-naive ewc ewc-online si mas lwf}
cargo build -q --release -p sequel-bench
SEQUEL=${CARGO_TARGET_DIR:-target}/release/sequel
for algo in $ALGOS; do
  for seed in 0 1 2; do
    for scen in class-il task-il; do
      echo "configs/split-fmnist/$algo.yaml --seed $seed --set benchmark.scenario=$scen --set name=split-fmnist-$scen-$algo"
    done
    for scen in domain-il task-il class-il; do
      head=masked; [ "$scen" = task-il ] && head=multi
      echo "configs/permuted-fmnist/$algo.yaml --seed $seed --set benchmark.scenario=$scen --set benchmark.task_il_head=$head --set name=permuted-fmnist-$scen-$algo"
    done
  done
done | while read -r line; do
  # Skip runs that already finished (the run directory is renamed from .partial only at the end).
  name=${line##*name=}; seed=$(echo "$line" | sed 's/.*--seed \([0-9]*\).*/\1/')
  [ -d "$OUT/$name/seed-$seed" ] || echo "$line"
done | xargs -P "$JOBS" -L 1 sh -c "$SEQUEL run \"\$@\" --quiet --out '$OUT' >/dev/null || echo \"failed: \$*\" >&2" sequel
python3 - "$OUT" <<'PY'
import json, pathlib, statistics, sys
root = pathlib.Path(sys.argv[1])
print("| run | n | avg acc (%) | forgetting (%) | BWT (%) | train s |")
print("|---|---|---|---|---|---|")
for exp in sorted(p for p in root.iterdir() if p.is_dir()):
    rows = [json.loads((s / "summary.json").read_text()) for s in sorted(exp.glob("seed-*"))]
    failed = [r["seed"] for r in rows if r["status"] != "completed"]
    if failed:
        print(f"| {exp.name} | failed seeds {failed}: see their summary.json | | | | |")
        continue
    def ms(key, scale=100.0):
        xs = [r["final"][key] * scale for r in rows if r["final"].get(key) is not None]
        if not xs:
            return "n/a"
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return f"{statistics.mean(xs):.2f} ± {sd:.2f}"
    train = statistics.mean(r["train_s"] for r in rows)
    print(f"| {exp.name} | {len(rows)} | {ms('avg_acc')} | {ms('forgetting')} | {ms('bwt')} | {train:.1f} |")
PY
