#!/usr/bin/env bash
# Builds the GPU check's binaries HERE (a CPU machine with nvcc) for sm_90, portable x86-64
# CPU code, and packs them with the shared libraries the GPU image lacks (oneDNN, fmt, ...)
# into .gpu/ (git-ignored, about 50 MB). The GPU machine's image has CUDA, cuBLAS and
# PyTorch but none of the project's Debian dependencies, so building there may fail;
# scripts/gpu-check.sh uses .gpu/ when it was carried along and builds from source otherwise.
#
#   bash scripts/gpu-prep.sh            # then run: bash scripts/gpu-check.sh   carrying .gpupack
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-2}
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DLLAMA3_TESTS=ON -DLLAMA3_BENCH=ON -DLLAMA3_ARCH_FLAGS=-march=x86-64-v3 >/dev/null
cmake --build build-gpu -j "$JOBS" --target unit_backend_parity unit_ops unit_model bench_cuda_step bench_trainer_step bench_nccl llama3
rm -rf .gpu && mkdir -p .gpu/bin .gpu/lib .gpu/lib-fallback
cp build-gpu/tests/unit_backend_parity build-gpu/tests/unit_ops build-gpu/tests/unit_model \
  build-gpu/bench/bench_cuda_step build-gpu/bench/bench_trainer_step build-gpu/bench/bench_nccl build-gpu/llama3 .gpu/bin/
strip --strip-unneeded .gpu/bin/* 2>/dev/null || true
# Every non-system, non-CUDA library the binaries load (CUDA and NCCL come from the GPU machine).
for b in .gpu/bin/*; do
  ldd "$b" | awk '/=> \//{print $3}'
done | sort -u | while read -r lib; do
  case "$(basename "$lib")" in
    libc.so*|libm.so*|libdl.so*|librt.so*|libpthread.so*|ld-linux*|libcuda.so*|libcudart*|libcublas*) ;;
    libnccl.so*) ;;  # 200+ MB; the GPU image has it beside PyTorch (nvidia-nccl-cu13)
    libstdc++.so*|libgcc_s.so*) cp -L "$lib" .gpu/lib-fallback/ ;;  # only if the image's are older
    *) cp -L "$lib" .gpu/lib/ ;;
  esac
done
# The tiny recipe's data stage for gpu-check.sh's `llama3 run --device cuda` row: its demo
# corpus is built from this machine's installed docs, which the GPU image may lack.
mapfile -t SETS <scripts/gpu-recipe.args
build-gpu/llama3 run recipes/tiny.textproto --out .gpu/recipe_run "${SETS[@]}" --only data >/dev/null
echo "$PWD/.gpu/recipe_run" > .gpu/recipe_run.prefix  # its files name it: gpu-check.sh renames
git rev-parse HEAD > .gpu/COMMIT
du -sh .gpu; ls -la .gpu/bin .gpu/lib .gpu/lib-fallback
# The device tool carries at most 64 MiB: the same files as one xz tarball (about 20 MB) in
# .gpupack/ (git-ignored); gpu-check.sh unpacks it with Python when .gpu/ did not travel.
rm -rf .gpupack && mkdir -p .gpupack
tar -cf - .gpu | xz -T"$JOBS" -6 > .gpupack/gpu.tar.xz
ls -la .gpupack
