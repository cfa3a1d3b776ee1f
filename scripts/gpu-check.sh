#!/usr/bin/env bash
# The device check of the CUDA backend, for a GPU machine that has no Rust (issue 12):
#
#   scripts/gpu-check.sh [BIN] [OUT]     # BIN: a `--features cuda` build (scripts/build-cuda.sh),
#                                        # default target/cuda/release/sequel; OUT: results folder
#
# 1. finds the machine's CUDA libraries (driver, cudart, cuBLAS(Lt), cuRAND; never the link stub)
#    and puts their folders on LD_LIBRARY_PATH;
# 2. parity: the same short run on the CPU and on cuda:0 — final average accuracy within 0.5
#    points (each task's final accuracy is printed too: one test image of fmnist-mini is 0.5
#    points of a task), the first 20 logged losses within 1e-3 relative — and two GPU runs compared byte for byte
#    (reported, not required: docs/architecture.md says what a GPU can promise);
# 3. speed: `sequel bench --device cuda` beside PyTorch eager on the same GPU
#    (scripts/torch_gpu_reference.py) for MLP 784-100-100-10 at batch 10 and 128, reduced ResNet-18
#    (nf 20) and ResNet-18 (nf 64) at batch 32, printed as a ratio table.
# Runs in well under 8 minutes on an H200. Exit status: non-zero if parity fails.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=$(realpath -m "${1:-target/cuda/release/sequel}")
[ -x "$BIN" ] || { echo "error: $BIN is not an executable; build it with scripts/build-cuda.sh" >&2; exit 2; }
OUT=$(realpath -m "${2:-${OUT:-/tmp/gpu-check}}")
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-check.log") 2>&1

# --- 1. libraries -----------------------------------------------------------------------------
libdir() {   # folder holding $1, from the loader cache, then the usual places; never a stub
  local p
  p=$(ldconfig -p 2>/dev/null | awk -v l="$1" '$1 == l { print $NF; exit }')
  if [ -z "$p" ]; then
    p=$(find /usr /opt /lib /usr/local "$HOME" -name "$1" -not -path '*/stubs/*' 2>/dev/null | head -1)
  fi
  [ -n "$p" ] && dirname "$(realpath "$p")"
}
dirs=""
for lib in libcuda.so.1 libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10; do
  d=$(libdir "$lib") || true
  if [ -z "$d" ]; then echo "error: $lib not found on this machine" >&2; exit 2; fi
  echo "$lib: $d"
  case ":$dirs:" in *":$d:"*) ;; *) dirs="${dirs:+$dirs:}$d" ;; esac
done
export LD_LIBRARY_PATH="$dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
uptime

# --- 2. parity --------------------------------------------------------------------------------
cat > "$OUT/parity.yaml" <<'EOF'
name: parity
benchmark: { dataset: fmnist-mini, kind: split, tasks: 5, scenario: class-il, train_subset: 200 }
model: { kind: mlp, hidden: [100, 100] }
training: { epochs: 1, batch_size: 10, log_every: 1 }
algorithm: { name: derpp, buffer_size: 100 }
EOF
status=0
: > "$OUT/parity-runs.txt"     # a rerun into the same OUT starts afresh
for d in cpu cuda:0 cuda:0; do
  run="$OUT/runs-$d-$RANDOM"
  "$BIN" run "$OUT/parity.yaml" --quiet --device "$d" --out "$run" || { echo "run on $d failed"; status=1; }
  echo "$run" >> "$OUT/parity-runs.txt"
done
python3 - "$OUT" <<'EOF' || status=1
import csv, sys, pathlib
out = pathlib.Path(sys.argv[1])
runs = [pathlib.Path(l) / "parity/seed-0" for l in (out / "parity-runs.txt").read_text().split()]
def last_row(r):
    rows = list(csv.reader(open(r / "accuracy_matrix.csv")))
    return [float(v) for v in rows[-1][1:]]
def losses(r):
    return [float(row["loss"]) for row in csv.DictReader(open(r / "train_log.csv"))][:20]
cpu, gpu, gpu2 = runs
task_gap = max(abs(a - b) for a, b in zip(last_row(cpu), last_row(gpu)))
acc_gap = abs(sum(last_row(cpu)) - sum(last_row(gpu))) / len(last_row(cpu))
loss_gap = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(losses(cpu), losses(gpu)))
same = (gpu / "accuracy_matrix.csv").read_bytes() == (gpu2 / "accuracy_matrix.csv").read_bytes()
print(f"parity: final accuracies cpu {last_row(cpu)} gpu {last_row(gpu)}: largest task gap {task_gap:.2f} points")
print(f"parity: final average accuracy gap {acc_gap:.2f} points (need <= 0.5)")
print(f"parity: first 20 losses max relative gap {loss_gap:.2e} (need <= 1e-3)")
print(f"determinism: two cuda runs {'byte-identical' if same else 'DIFFER'}")
sys.exit(0 if acc_gap <= 0.5 and loss_gap <= 1e-3 else 1)
EOF

# --- 3. speed ---------------------------------------------------------------------------------
cat > "$OUT/mlp.yaml" <<'EOF'
name: bench-mlp
benchmark: { dataset: fmnist-mini, kind: split, tasks: 5, scenario: class-il }
model: { kind: mlp, hidden: [100, 100] }
optimizer: { kind: sgd, lr: 0.01 }
EOF
for w in 20 64; do
  sed -e "s/kind: mlp, hidden: \[100, 100\]/kind: resnet18, width: $w/" -e "s/bench-mlp/bench-r$w/" \
    "$OUT/mlp.yaml" > "$OUT/resnet$w.yaml"
done
bench() {   # config, batch, extra args -> steps/s
  "$BIN" bench "$OUT/$1.yaml" --device cuda:0 --batch "$2" --steps 300 --warmup 30 "${@:3}" \
    | awk '$1 ~ /^[0-9]+$/ { print $2 }' | tail -1
}
s_mlp10=$(bench mlp 10 --input 1x28x28 --outputs 10)
s_mlp128=$(bench mlp 128 --input 1x28x28 --outputs 10)
s_r20=$(bench resnet20 32 --input 3x32x32 --outputs 10)
s_r64=$(bench resnet64 32 --input 3x32x32 --outputs 10)
python3 scripts/torch_gpu_reference.py --json "$OUT/torch.json" || true
python3 - "$OUT" "$s_mlp10" "$s_mlp128" "$s_r20" "$s_r64" <<'EOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
ours = dict(zip(["mlp100 b10", "mlp100 b128", "resnet18r b32", "resnet18 b32"], sys.argv[2:]))
try:
    torch = json.loads((out / "torch.json").read_text())
except Exception:
    torch = {}
print("| step | sequel steps/s | PyTorch eager steps/s | ratio |")
print("|---|---|---|---|")
for k, v in ours.items():
    t = torch.get(k)
    try:
        r = f"{float(v) / t:.2f}x"
    except Exception:
        r = "n/a"
    print(f"| {k} | {v or 'failed'} | {t if t else 'n/a'} | {r} |")
EOF
uptime
exit $status
