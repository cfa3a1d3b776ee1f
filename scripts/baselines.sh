#!/usr/bin/env bash
# Reproduces the naive/joint tables of docs/RESULTS.md: every baseline config × scenario × 3 seeds,
# then prints mean ± std of the final metrics from each run's summary.json.
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
python3 - "$OUT" <<'PY'
import json, pathlib, statistics, sys
root = pathlib.Path(sys.argv[1])
print("| run | n | avg acc (%) | forgetting (%) | BWT (%) | FWT (%) | train s |")
print("|---|---|---|---|---|---|---|")
for exp in sorted(p for p in root.iterdir() if p.is_dir()):
    rows = [json.loads((s / "summary.json").read_text()) for s in sorted(exp.glob("seed-*"))]
    failed = [r["seed"] for r in rows if r["status"] != "completed"]
    if failed:
        print(f"| {exp.name} | failed seeds {failed}: see their summary.json | | | | | |")
        continue
    def ms(key, scale=100.0):
        xs = [r["final"][key] * scale for r in rows if r["final"].get(key) is not None]
        if not xs:
            return "n/a"
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return f"{statistics.mean(xs):.2f} ± {sd:.2f}"
    train = statistics.mean(r["train_s"] for r in rows)
    print(f"| {exp.name} | {len(rows)} | {ms('avg_acc')} | {ms('forgetting')} | {ms('bwt')} | {ms('fwt')} | {train:.1f} |")
PY
