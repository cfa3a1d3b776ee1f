#!/usr/bin/env bash
# Reproduces the latency-aware evaluation table of docs/EXTENSIONS.md: every online split
# Fashion-MNIST preset (1 epoch, batch 10; the *-200 memories) under ordinary online evaluation
# (`training.realtime.cost: 1`, every batch trained) and under real-time evaluation with the
# counted step cost (`cost: counted`), 3 seeds each; prints mean ± std from each run's summary.json,
# ranked by real-time online accuracy. Needs the full Fashion-MNIST (apt-get install
# dataset-fashion-mnist).
# Usage: scripts/realtime.sh [OUT]   (JOBS=2 runs two at a time; the accuracy columns do not change,
# the wall-clock column does)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/realtime}
JOBS=${JOBS:-1}
SEEDS=${SEEDS:-0 1 2}
PRESETS=${PRESETS:-naive ewc ewc-online si rwalk mas lwf lwf-mc er-200 der-200 derpp-200 xder-200 er-ace-200 er-aml-200 mir-200 agem-200 gem-200 cls-er-200}
cargo build -q --release -p sequel-bench
SEQUEL=${CARGO_TARGET_DIR:-target}/release/sequel
for p in $PRESETS; do
  for seed in $SEEDS; do
    echo "configs/split-fmnist/$p.yaml --seed $seed --set training.realtime.cost=1 --set name=online-$p"
    echo "configs/split-fmnist/$p.yaml --seed $seed --set training.realtime.cost=counted --set name=realtime-$p"
  done
done | while read -r line; do
  name=${line##*name=}; seed=$(echo "$line" | sed 's/.*--seed \([0-9]*\).*/\1/')
  [ -d "$OUT/$name/seed-$seed" ] || echo "$line"
done | xargs -P "$JOBS" -L 1 sh -c "$SEQUEL run \"\$@\" --quiet --out '$OUT' >/dev/null || echo \"failed: \$*\" >&2" sequel
python3 - "$OUT" $PRESETS <<'PY'
import json, pathlib, statistics, sys
root, presets = pathlib.Path(sys.argv[1]), sys.argv[2:]
def runs(name):
    rows = [json.loads((s / "summary.json").read_text()) for s in sorted((root / name).glob("seed-*"))]
    bad = [r["seed"] for r in rows if r["status"] != "completed"]
    if bad:
        sys.exit(f"{name}: failed seeds {bad}: see their summary.json")
    return rows
def ms(vals, scale=100.0):
    vals = [v * scale for v in vals]
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.2f} ± {sd:.2f}"
table = []
naive_ms = statistics.mean(r["realtime"]["step_ms"] for r in runs("online-naive")) if "naive" in presets else None
for p in presets:
    on, rt = runs(f"online-{p}"), runs(f"realtime-{p}")
    key = statistics.mean(r["realtime"]["online_acc"] for r in rt)
    cost = statistics.mean(r["realtime"]["step_cost"] for r in rt)
    wall = statistics.mean(r["realtime"]["step_ms"] for r in on)
    frac = statistics.mean(r["realtime"]["trained"] / r["realtime"]["batches"] for r in rt)
    table.append((key, p, on, rt, cost, wall, frac))
table.sort(key=lambda t: -t[0])
on_rank = {p: i + 1 for i, (_, p, *_ ) in enumerate(sorted(table, key=lambda t: -statistics.mean(r["realtime"]["online_acc"] for r in t[2])))}
print("| rank (real-time) | rank (online) | method | online acc, every batch (%) | real-time online acc (%) | final avg acc, every batch (%) | final avg acc, real-time (%) | counted cost C | batches trained | wall ms/step (× naive) |")
print("|---|---|---|---|---|---|---|---|---|---|")
for i, (_, p, on, rt, cost, wall, frac) in enumerate(table):
    rel = f" ({wall / naive_ms:.1f}×)" if naive_ms else ""
    print(f"| {i + 1} | {on_rank[p]} | {p} | {ms([r['realtime']['online_acc'] for r in on])} | "
          f"{ms([r['realtime']['online_acc'] for r in rt])} | {ms([r['final']['avg_acc'] for r in on])} | "
          f"{ms([r['final']['avg_acc'] for r in rt])} | {cost:.2f} | {100 * frac:.0f} % | {wall:.2f}{rel} |")
PY
