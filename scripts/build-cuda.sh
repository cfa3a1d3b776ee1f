#!/usr/bin/env bash
# Build the `sequel` binary with candle's CUDA backend on a machine without a GPU or a CUDA toolkit.
#
#   scripts/build-cuda.sh [PREFIX]        # PREFIX for the toolkit, default ./target/cuda-toolkit
#
# NVIDIA's compiler and libraries come from PyPI wheels, every one pinned to CUDA 13.0.x (what the
# GPU machines run, driver 580): an unpinned nvidia-nvvm/-crt resolves to a newer release whose PTX
# a 13.0 ptxas/driver rejects. No wheel ships the driver (libcuda), so the link uses a generated
# stub with soname libcuda.so.1 that exports every driver entry point cudarc declares; the binary
# needs the real driver at run time. NEVER put the stub on a GPU machine's library path.
# The result, target/cuda/release/sequel, links the CUDA libraries dynamically: on the GPU machine
# put the folders holding libcuda.so.1, libcudart.so.13, libcublas(Lt).so.13 and libcurand.so.10 on
# LD_LIBRARY_PATH (scripts/gpu-check.sh finds them). Kernels are built for compute capability
# $CUDA_COMPUTE_CAP (default 90: H100/H200, as sm_90a).
# The recipe and what failed on the way: ../shared/reference/cuda-build-notes.md.
set -euo pipefail
P=$(realpath -m "${1:-$(dirname "$0")/../target/cuda-toolkit}")   # before the cd: PREFIX is relative to the caller
cd "$(dirname "$0")/.."
C="$P/cuda"

if [ ! -x "$C/bin/nvcc" ] || [ ! -f "$C/lib/stubs/libcuda.so" ]; then
  cargo fetch --quiet
  python3 -m venv "$P/venv"
  "$P/venv/bin/pip" install --quiet --disable-pip-version-check \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 \
    nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
  W=$("$P/venv/bin/python" -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
  mkdir -p "$C/lib/stubs"
  # A CUDA_HOME layout over the wheel's tree; rust-lld wants unversioned .so names to link against.
  for d in bin include nvvm; do ln -sfn "$W/$d" "$C/$d"; done
  for l in cudart cublas cublasLt nvrtc; do ln -sf "$W/lib/lib$l.so.13" "$C/lib/lib$l.so"; done
  ln -sf "$W/lib/libcurand.so.10" "$C/lib/libcurand.so"
  # The driver stub: one function per cu* entry point of the cudarc version in Cargo.lock, each
  # returning CUDA_ERROR_STUB_LIBRARY (34).
  v=$(awk '/^name = "cudarc"$/ {getline; gsub(/[^0-9.]/, ""); print; exit}' Cargo.lock)
  sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$v"/src/driver/sys/mod.rs | head -1)
  { echo '/* libcuda.so.1 stub, for linking only */'
    grep -oP 'pub unsafe fn \Kcu\w+(?=\()' "$sys" | sort -u | sed 's/.*/int &(void) { return 34; }/'
  } > "$C/lib/stubs/libcuda_stub.c"
  gcc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$C/lib/stubs/libcuda.so" "$C/lib/stubs/libcuda_stub.c"
fi

export CUDA_HOME="$C" CUDA_PATH="$C" CUDA_ROOT="$C"
export PATH="$C/bin:$PATH"                 # cudarc's build script runs plain `nvcc --version`
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-2}"
cargo build --release -p sequel-bench --features cuda --target-dir target/cuda
bin=target/cuda/release/sequel
# The binary must need the driver (not have the stub baked in) and the CUDA runtime libraries.
readelf -d "$bin" | grep -q 'NEEDED.*libcuda.so.1' || { echo "error: $bin does not link libcuda.so.1" >&2; exit 1; }
echo "built $bin ($(du -h "$bin" | cut -f1)) for compute capability $CUDA_COMPUTE_CAP"
