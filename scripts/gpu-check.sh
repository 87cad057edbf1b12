#!/usr/bin/env bash
# The GPU check, one run on a lent GPU machine (H100/H200, CUDA 13, PyTorch, no package
# registry), under 8 minutes: prints versions, gets the binaries (prebuilt .gpu/ from
# scripts/gpu-prep.sh when carried along, else a from-source sm_90 build), runs
# unit_backend_parity and unit_ops, the parallel step on CUDA tensors with a one-rank NCCL
# communicator (unit_model ParallelDevice*), then the Llama 1B-class training step
# (bench_cuda_step, seq 4096 with a 2048 fallback) with a per-op GPU profile against PyTorch
# eager. Then, in order of what issue 7 is judged on (the deadline cuts the tail first):
# 32768-token steps replayed as CUDA graphs (8 micro-batches of one sequence, 4 of two, each
# without and with the candidates; 2 of four), the attention fwd+bwd against torch SDPA, the
# optimizer alone, the step with single choices reverted or candidates switched on (A/B
# rows, each over its reference; two micro-batches with a per-op profile),
# compute-sanitizer, both sides at two and four sequences a step, the NCCL communicator's
# collectives and all_reduce bandwidth, both sides at eight eager micro-batches and
# torch.compile, and prints a summary table last.
# Every step runs under `timeout` against one overall deadline. Logs go to $OUT when set.
#
#   bash scripts/gpu-check.sh        (env: DEADLINE=450 seconds, JOBS=16, SEQ=4096, NCU_ATTN=1
#                                     adds an Nsight Compute report of the attention kernels)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEADLINE=${DEADLINE:-450}
JOBS=${JOBS:-16}
SEQ=${SEQ:-4096}
BASE_MS="" ACC2_MS="" ACC8_GRAPH_MS="" ADAMW_MS=""  # references of the A/B ratios in the summary
LOGDIR=${OUT:-$ROOT/out/gpu-check}
mkdir -p "$LOGDIR"
LOG=$LOGDIR/gpu-check.log
STEPDIR=$(mktemp -d)  # per-step outputs (only gpu-check.log and summary.txt go to $OUT: it keeps 8 files)
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

declare -a SUMMARY=()
note() { SUMMARY+=("$(printf '%-34s %-8s %s' "$1" "$2" "$3")"); }
left() { echo $((DEADLINE - SECONDS)); }
# step NAME CAP CMD...: runs CMD with timeout min(CAP, time left); output to $LOGDIR/NAME.txt
step() {
  local name=$1 cap=$2
  shift 2
  local t
  t=$(left)
  ((t > cap)) && t=$cap
  if ((t < 10)); then
    echo "### $name: skipped, $(left) s left of the ${DEADLINE} s budget"
    return 124
  fi
  echo "### $name (timeout ${t} s, $(left) s left): $*"
  local t0=$SECONDS
  timeout --kill-after=5 "$t" "$@" >"$STEPDIR/$name.txt" 2>&1
  local rc=$?
  cat "$STEPDIR/$name.txt"
  echo "### $name: rc=$rc after $((SECONDS - t0)) s"
  return $rc
}
result() { grep -h "^RESULT $1" "$STEPDIR"/*.txt 2>/dev/null | tail -1; }
field() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" <<<"$2"; }
# A RESULT line's MFU of record (causal attention counted at half its matrix) and, in
# brackets, PaLM's (the whole matrix, as Megatron-LM, torchtitan and nanoGPT count it).
mfus() { awk -v a="$(field mfu "$1")" -v b="$(field mfu_full "$1")" 'BEGIN{if (a == "") a = 0; printf "%.1f%%", 100*a; if (b != "") printf " (%.1f%% PaLM)", 100*b}'; }

echo "=== versions"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 || echo "nvidia-smi: unavailable"
DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
(nvcc --version 2>/dev/null || /usr/local/cuda/bin/nvcc --version 2>/dev/null) | tail -2 || echo "nvcc: not found"
cmake --version 2>/dev/null | head -1 || echo "cmake: not found"
ninja --version 2>/dev/null | sed 's/^/ninja /' || echo "ninja: not found"
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
uname -m; ldd --version 2>/dev/null | head -1; nproc
[[ -f .gpu/COMMIT ]] && echo "prebuilt .gpu from commit $(cat .gpu/COMMIT)"
git rev-parse HEAD 2>/dev/null | sed 's/^/working tree commit /'

# CUDA libraries for the prebuilt binaries: the toolkit's, else the pip wheels beside torch.
CUDA_LIBS=""
for d in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib; do
  [[ -e $d/libcublasLt.so.13 ]] && CUDA_LIBS+="$d:"
done
if [[ -z $CUDA_LIBS ]]; then
  for f in $(timeout 20 find /usr /opt -name 'libcublasLt.so.13*' 2>/dev/null | head -3) \
           $(timeout 20 find /usr /opt -name 'libcudart.so.13*' 2>/dev/null | head -3); do
    CUDA_LIBS+="$(dirname "$f"):"
  done
fi
# NCCL: the toolkit's, else the pip wheel beside torch (nvidia-nccl-cu13).
if ! ls /usr/local/cuda/lib*/libnccl.so.2 >/dev/null 2>&1; then
  for f in $(timeout 20 find /usr /opt -name 'libnccl.so.2*' 2>/dev/null | head -1); do
    CUDA_LIBS+="$(dirname "$f"):"
  done
fi
echo "CUDA libraries from: ${CUDA_LIBS:-<system default>}"

# ---- binaries
if [[ ! -d .gpu && -f .gpupack/gpu.tar.xz ]]; then
  # (python's tarfile: the image may lack xz)
  python3 -c "import tarfile; tarfile.open('.gpupack/gpu.tar.xz').extractall('.')" &&
    echo "unpacked .gpupack/gpu.tar.xz"
fi
BIN=""
LIBPATH=""
if [[ -x .gpu/bin/unit_backend_parity ]]; then
  LIBPATH="$ROOT/.gpu/lib:${CUDA_LIBS}${LD_LIBRARY_PATH:-}"
  if LD_LIBRARY_PATH=$LIBPATH ldd .gpu/bin/unit_backend_parity | grep -q "not found"; then
    echo "prebuilt: some libraries not found, trying the bundled libstdc++/libgcc"
    LIBPATH="$ROOT/.gpu/lib:$ROOT/.gpu/lib-fallback:${CUDA_LIBS}${LD_LIBRARY_PATH:-}"
  fi
  LD_LIBRARY_PATH=$LIBPATH ldd .gpu/bin/unit_backend_parity | grep "not found"
  if LD_LIBRARY_PATH=$LIBPATH timeout 30 .gpu/bin/unit_backend_parity --gtest_list_tests >/dev/null 2>&1; then
    BIN=$ROOT/.gpu/bin
    note "binaries" "PREBUILT" "from .gpu (scripts/gpu-prep.sh)"
  else
    echo "prebuilt binaries do not start here; building from source"
  fi
fi
if [[ -z $BIN ]]; then
  GEN=()
  command -v ninja >/dev/null && GEN=(-G Ninja)
  if command -v cmake >/dev/null &&
     step configure 120 cmake -S . -B build-gpu-src "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
       -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA3_TESTS=ON -DLLAMA3_BENCH=ON \
       -DCMAKE_CUDA_COMPILER="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)" &&
     step build 300 cmake --build build-gpu-src -j "$JOBS" --target unit_backend_parity unit_ops unit_model bench_cuda_step bench_trainer_step bench_nccl llama3; then
    mkdir -p build-gpu-src/gpu-bin
    cp build-gpu-src/tests/unit_backend_parity build-gpu-src/tests/unit_ops build-gpu-src/tests/unit_model \
       build-gpu-src/bench/bench_cuda_step build-gpu-src/bench/bench_trainer_step build-gpu-src/bench/bench_nccl build-gpu-src/llama3 build-gpu-src/gpu-bin/
    BIN=$ROOT/build-gpu-src/gpu-bin
    LIBPATH="${CUDA_LIBS}${LD_LIBRARY_PATH:-}"
    note "binaries" "BUILT" "from source, sm_90, $SECONDS s"
  else
    note "binaries" "FAIL" "no prebuilt .gpu and the source build failed (see configure/build in gpu-check.log; the image lacks oneDNN/fmt/spdlog/... - run scripts/gpu-prep.sh and carry .gpu)"
  fi
fi
# (timeout needs a program, not a shell function: each run below goes through env.)

# ---- correctness
if [[ -n $BIN ]]; then
  # Synchronous launches: a failing kernel is reported by its own launcher.
  step parity 150 env CUDA_LAUNCH_BLOCKING=1 LD_LIBRARY_PATH="$LIBPATH" "$BIN/unit_backend_parity" --gtest_color=no
  rc=$?
  P=$(grep -c '^\[       OK \]' "$STEPDIR/parity.txt")
  Fl=$(grep '^\[  FAILED  \].*(' "$STEPDIR/parity.txt" | sort -u | wc -l)
  S=$(grep -c '^\[  SKIPPED \].*CudaMatchesCpu.*(' "$STEPDIR/parity.txt")
  if ((rc == 0 && S == 0)); then st=PASS; elif ((S > 0 && Fl == 0 && rc == 0)); then st=SKIPPED; else st=FAIL; fi
  note "unit_backend_parity" "$st" "$P ok, $Fl failed, $S cuda cases skipped (rc $rc)"
  if ((rc != 0)); then
    # Re-run each failed case alone (a sticky CUDA error fails every later case of a process),
    # so the table names the kernels that really fail and their first error line.
    mapfile -t failed < <(grep '^\[  FAILED  \].*(' "$STEPDIR/parity.txt" | sed 's/^\[  FAILED  \] //; s/, where.*//; s/ (.*//' | sort -u | head -16)
    ((${#failed[@]} == 0)) && failed=("*")  # crashed: no list, run the whole suite case by case below
    if [[ ${failed[0]} == "*" ]]; then
      mapfile -t failed < <(env LD_LIBRARY_PATH="$LIBPATH" "$BIN/unit_backend_parity" --gtest_list_tests | awk '/^[^ ]/{s=$1} /^  /{print s $1}' | grep CudaMatchesCpu | head -40)
    fi
    rerun_end=$((SECONDS + 90))
    for t in "${failed[@]}"; do
      ((SECONDS > rerun_end)) && { note "  (more)" "" "stopped re-running failed cases after 90 s"; break; }
      step parity_alone 20 env CUDA_LAUNCH_BLOCKING=1 LD_LIBRARY_PATH="$LIBPATH" "$BIN/unit_backend_parity" --gtest_color=no --gtest_filter="$t"
      r2=$?
      why=$({ grep -m1 -E 'normalised error|CUDA error|cuBLAS error|non-finite|exception' "$STEPDIR/parity_alone.txt" ||
              grep -m1 -E 'error|Error|Failure' "$STEPDIR/parity_alone.txt"; } | cut -c1-160)
      note "  ${t##*/}" "$( ((r2 == 0)) && echo ok-alone || echo "FAIL")" "${why:-rc $r2}"
    done
  fi
  # The captured training step (CUDA graphs) vs the eager one: graphs cannot be captured under
  # CUDA_LAUNCH_BLOCKING, so these cases skip above and run here.
  step cuda_graph 60 env LD_LIBRARY_PATH="$LIBPATH" "$BIN/unit_backend_parity" --gtest_color=no --gtest_filter='*CudaGraph*'
  rc=$?
  P=$(grep -c '^\[       OK \]' "$STEPDIR/cuda_graph.txt")
  S=$(grep -c '^\[  SKIPPED \].*(' "$STEPDIR/cuda_graph.txt")
  note "captured step (CUDA graph)" "$( ((rc == 0 && S == 0 && P > 0)) && echo PASS || { ((rc == 0)) && echo SKIPPED || echo FAIL; })" "$P ok, $S skipped (rc $rc)"
  step unit_ops 60 env LD_LIBRARY_PATH="$LIBPATH" "$BIN/unit_ops" --gtest_color=no
  rc=$?
  note "unit_ops (cpu)" "$([[ $rc == 0 ]] && echo PASS || echo FAIL)" "rc $rc"
  if [[ -x $BIN/unit_model ]]; then
    # The golden test on the GPU: the model in f32 and in bf16 mixed precision against the
    # PyTorch reference (run here by this machine's python3, from this checkout).
    step golden 60 env LD_LIBRARY_PATH="$LIBPATH" LLAMA3_PYTHON=python3 LLAMA3_SOURCE_DIR="$ROOT" "$BIN/unit_model" --gtest_color=no --gtest_filter='*GoldenOnCuda*'
    rc=$?
    P=$(grep -c '^\[       OK \]' "$STEPDIR/golden.txt")
    S=$(grep -c '^\[  SKIPPED \].*(' "$STEPDIR/golden.txt")
    note "golden model on cuda (f32, bf16)" "$( ((rc == 0 && S == 0 && P > 0)) && echo PASS || { ((rc == 0)) && echo SKIPPED || echo FAIL; })" "$P ok, $S skipped (rc $rc)"
    # ParallelLlama on CUDA tensors, world of one over NCCL, vs the plain CUDA and CPU runs.
    step parallel_device 60 env LD_LIBRARY_PATH="$LIBPATH" "$BIN/unit_model" --gtest_color=no --gtest_filter='*ParallelDevice*'
    rc=$?
    S=$(grep -c '^\[  SKIPPED \].*(' "$STEPDIR/parallel_device.txt")
    note "parallel step on cuda" "$( ((rc == 0 && S == 0)) && echo PASS || { ((rc == 0)) && echo SKIPPED || echo FAIL; })" "rc $rc, $S skipped"
  fi
fi

# ---- the training step (llama3 vs torch eager), same seq
STEP_SEQ=$SEQ
if [[ -n $BIN ]]; then
  step llama3_step 150 env LD_LIBRARY_PATH="$LIBPATH" "$BIN/bench_cuda_step" --seq "$SEQ" --steps 3 --warmup 1 --profile
  rc=$?
  if ((rc != 0 && rc != 77)); then  # 77: no CUDA device, nothing to retry
    STEP_SEQ=2048
    step llama3_step_2048 100 env LD_LIBRARY_PATH="$LIBPATH" "$BIN/bench_cuda_step" --seq 2048 --steps 3 --warmup 1
  fi
  r=$(result llama3_cuda)
  BASE_MS=$(field step_ms "$r")  # the A/B rows' reference
  if [[ -n $r ]]; then
    note "llama3 step seq $(field seq "$r")" "OK" "$(field tokens_per_s "$r") tokens/s, MFU $(mfus "$r"), $(field step_ms "$r") ms/step, loss $(field loss "$r") after $(field after_steps "$r") steps"
  else
    note "llama3 step" "FAIL" "see llama3_step in gpu-check.log"
  fi
  # The figures issue 7's targets are judged on come first, so that a short run still has
  # them: PyTorch eager at the same step (the 1.2x target) and the steps of 32768 tokens
  # replayed as CUDA graphs (TrainerConfig::cuda_graph's path; the 45% MFU target).
  step torch_eager 120 python3 bench/cuda_step_peer.py --mode eager --seq "$STEP_SEQ" --steps 3 --warmup 1
  r=$(result torch_eager)
  [[ -n $r ]] && note "torch eager step seq $(field seq "$r")" "OK" "$(field tokens_per_s "$r") tokens/s, MFU $(mfus "$r"), $(field step_ms "$r") ms/step, loss $(field loss "$r")" || note "torch eager step" "FAIL" "see torch_eager in gpu-check.log"
  # graph_step TAG LABEL ENV ARGS: our step as a CUDA graph, its time over the eight
  # micro-batch default's (the first row, ACC8_GRAPH_MS). Two sequences a micro-batch, four
  # micro-batches (and four, two): the same tokens a step with half (a quarter of) the
  # weight-gradient accumulations (each reads the f32 gradients) and larger GEMMs. The candidates: bf16 cross-entropy logits,
  # RMSNorm backward prefetch, GEMM autotune, RoPE 4 positions a block, bf16 GQA partials,
  # the projections' bf16 input gradients summed by the norms.
  CAND="LLAMA3_CE_BF16_LOGITS=1 LLAMA3_RMSNORM_BWD_PREFETCH=1 LLAMA3_GEMM_AUTOTUNE=1 LLAMA3_ROPE_POSITIONS=4 LLAMA3_ATTN_GQA_PART_BF16=1 LLAMA3_BF16_PROJ_GRADS=1"
  graph_step() {
    local tag=$1 label=$2 envs=$3 r ms ratio
    shift 3
    (($(left) > 30)) || return 0
    # shellcheck disable=SC2086
    step "llama3_step_$tag" 40 env LD_LIBRARY_PATH="$LIBPATH" $envs "$BIN/bench_cuda_step" --seq "$STEP_SEQ" --steps 2 --warmup 1 --graph "$@"
    r=$(grep -h "^RESULT llama3_cuda_graph" "$STEPDIR/llama3_step_$tag.txt" 2>/dev/null | tail -1)
    ms=$(field step_ms "$r")
    [[ $tag == acc8_graph ]] && ACC8_GRAPH_MS=$ms
    ratio=$(awk -v a="$ms" -v b="$ACC8_GRAPH_MS" 'BEGIN{if (a > 0 && b > 0) printf "%.3f", a / b; else printf "n/a"}')
    [[ -n $r ]] && note "$label" "OK" "$(field tokens_per_s "$r") tokens/s, MFU $(mfus "$r"), $ms ms/step ($ratio of 8 x 1)"
  }
  graph_step acc8_graph "llama3 step 8 x 1 seq, graph" "" --accum 8
  # The product's step: text::Trainer on text::LlamaModel (the recipe runner's path), with
  # what bench_cuda_step leaves out (clipping's gradient norm, host batches uploaded, losses
  # and norm read back), replayed as a graph; over the composed step's time.
  if (($(left) > 40)) && [[ -x $BIN/bench_trainer_step ]]; then
    step trainer_acc8_graph 60 env LD_LIBRARY_PATH="$LIBPATH" "$BIN/bench_trainer_step" --seq "$STEP_SEQ" --accum 8 --steps 2 --warmup 1 --graph
    r=$(grep -h "^RESULT llama3_trainer_graph" "$STEPDIR/trainer_acc8_graph.txt" 2>/dev/null | tail -1)
    ratio=$(awk -v a="$(field step_ms "$r")" -v b="$ACC8_GRAPH_MS" 'BEGIN{if (a > 0 && b > 0) printf "%.3f", a / b; else printf "n/a"}')
    [[ -n $r ]] && note "  Trainer (the product), same, graph" "OK" "$(field tokens_per_s "$r") tokens/s, MFU $(mfus "$r"), $(field step_ms "$r") ms/step ($ratio of 8 x 1), $(field graph_steps "$r") of 2 steps replayed" || note "  Trainer (the product), same, graph" "FAIL" "see trainer_acc8_graph in gpu-check.log"
  fi
  graph_step acc8_graph_cand "  same, with the candidates" "$CAND" --accum 8
  graph_step b2a4_graph "llama3 step 4 x 2 seq, graph" "" --accum 4 --batch 2
  graph_step b2a4_graph_cand "  same, with the candidates" "$CAND" --accum 4 --batch 2
  graph_step b4a2_graph "llama3 step 2 x 4 seq, graph" "" --accum 2 --batch 4
  # Attention fwd+bwd at the same shapes (issue 7: within 1.5x of SDPA).
  step llama3_attn 60 env LD_LIBRARY_PATH="$LIBPATH" "$BIN/bench_cuda_step" --attn-only --seq "$SEQ"
  step torch_attn 60 python3 bench/cuda_step_peer.py --mode attn --seq "$SEQ"
  for dt in f32 bf16; do
    a=$(result "attn_ms_$dt" | awk '{print $3}')
    b=$(result "torch_attn_ms_$dt" | awk '{print $3}')
    note "attention fwd+bwd $dt T=$SEQ" "" "llama3 ${a:-n/a} ms, torch sdpa ${b:-n/a} ms"
  done
  # f32 activations with compute = bf16 (tensor cores): the path of the bf16 mixed-precision step.
  a=$(result attn_tc_ms_f32 | awk '{print $3}')
  b=$(result torch_attn_ms_bf16 | awk '{print $3}')
  c=$(result attn_tc_nosplit_ms_f32 | awk '{print $3}')
  d=$(result attn_tc_noprefetch_ms_f32 | awk '{print $3}')
  e=$(result attn_tc_fwd1_ms_f32 | awk '{print $3}')
  f=$(result attn_tc_bwd1_ms_f32 | awk '{print $3}')
  g=$(result attn_tc_stsm_ms_f32 | awk '{print $3}')
  note "attention fwd+bwd f32->tc T=$SEQ" "" "llama3 ${a:-n/a} ms (tensor cores), torch sdpa bf16 ${b:-n/a} ms"
  note "  reverted: bwd per kv head" "" "${c:-n/a} ms"
  note "  reverted: no lse/dsum prefetch" "" "${d:-n/a} ms"
  note "  reverted: fwd one m-tile per warp" "" "${e:-n/a} ms"
  note "  reverted: bwd 64-key blocks (LLAMA3_ATTN_BWD_MT=1)" "" "${f:-n/a} ms"
  note "  variant: dS by stmatrix (LLAMA3_ATTN_BWD_STSM=1)" "" "${g:-n/a} ms"
  # The default's time over the previous default's and over the stmatrix variant's (below 1:
  # the default is faster).
  if [[ -n $a && -n $f && -n $g ]]; then
    note "  default / reverted, / stmatrix" "" "$(awk -v a="$a" -v f="$f" -v g="$g" 'BEGIN{printf "%.3f, %.3f", a/f, a/g}')"
  fi
  # The optimizer alone on the 1B parameters: multi-tensor launches against one per tensor.
  step optimizer 40 env LD_LIBRARY_PATH="$LIBPATH" "$BIN/bench_cuda_step" --optimizer-only
  r=$(result optimizer)
  ADAMW_MS=$(field adamw_multi_ms "$r")
  [[ -n $r ]] && note "optimizer: AdamW, multi / per tensor" "OK" "$(field adamw_multi_ms "$r") / $(field adamw_per_tensor_ms "$r") ms ($(field adamw_ratio "$r")), $(field adamw_multi_gbs "$r") GB/s"
  [[ -n $r ]] && note "optimizer: grad norm, multi / per tensor" "OK" "$(field norm_multi_ms "$r") / $(field norm_per_tensor_ms "$r") ms ($(field norm_ratio "$r")), $(field norm_multi_gbs "$r") GB/s"
  # A/B: choices of the step, each one reverted alone, and the candidates (same run, same
  # card).
  # (tag:flags:environment:what)
  # (The rows that settled their question are gone: 1024-row cross-entropy chunks, separate
  # gradient-sum adds, weights cast each step, separate residual adds, the CUDA graph at one
  # micro-batch, the 64-key attention backward, f32 attention activations; their figures
  # are in bench/RESULTS.md and the switches still work.)
  for v in "acc2:--accum 2 --profile::two micro-batches a step (deferred cross-entropy gradient)" \
           "acc2fw:--accum 2:LLAMA3_CE_DEFERRED=0:two micro-batches, cross-entropy gradient in the forward" \
           "castg:--cast-residual-grads::residual gradients cast by the projections (no bf16 copies)" \
           "ce16::LLAMA3_CE_BF16_LOGITS=1:candidate: bf16 logits in the cross-entropy" \
           "rmsp::LLAMA3_RMSNORM_BWD_PREFETCH=1:candidate: RMSNorm backward prefetching rows" \
           "tune::LLAMA3_GEMM_AUTOTUNE=1:candidate: GEMM algorithms timed at first use" \
           "rope4::LLAMA3_ROPE_POSITIONS=4:candidate: RoPE 4 positions a block" \
           "gqa16::LLAMA3_ATTN_GQA_PART_BF16=1:candidate: bf16 dK/dV partials of the GQA backward" \
           "pgrad::LLAMA3_BF16_PROJ_GRADS=1:candidate: projections' bf16 dx summed by the norms"; do
    IFS=: read -r tag flags envs what <<<"$v"
    # shellcheck disable=SC2086
    step "llama3_step_$tag" 45 env LD_LIBRARY_PATH="$LIBPATH" $envs "$BIN/bench_cuda_step" --seq "$STEP_SEQ" --steps 3 --warmup 1 $flags
    r=$(grep -h "^RESULT llama3_cuda" "$STEPDIR/llama3_step_$tag.txt" 2>/dev/null | tail -1)
    ms=$(field step_ms "$r")
    # The row's time over its reference's (below 1: faster): acc2fw against acc2, the others
    # against the default step (acc2 runs two micro-batches: about 2).
    ref=$BASE_MS
    [[ $tag == acc2fw ]] && ref=$ACC2_MS
    [[ $tag == acc2 ]] && ACC2_MS=$ms
    ratio=$(awk -v a="$ms" -v b="$ref" 'BEGIN{if (a > 0 && b > 0) printf "%.3f", a / b; else printf "n/a"}')
    [[ -n $r ]] && note "  $what" "OK" "$(field tokens_per_s "$r") tokens/s, $ms ms/step ($ratio of its reference), loss $(field loss "$r") after $(field after_steps "$r") steps"
  done
  # What a micro-batch costs under accumulation over what it costs alone: the second
  # micro-batch of acc2 (its time less the default step's) against the default step less its
  # AdamW. The difference is the accumulation's own cost (weight-gradient GEMMs that read the
  # f32 gradients, the cross-entropy's gradient); acc2's per-op profile is in gpu-check.log.
  if [[ -n $ACC2_MS && -n $BASE_MS && -n $ADAMW_MS ]]; then
    note "  accumulated micro-batch / alone" "" "$(awk -v a="$ACC2_MS" -v b="$BASE_MS" -v o="$ADAMW_MS" 'BEGIN{printf "%.1f / %.1f ms", a - b, b - o}')"
  fi
  # The product's step as pre-training runs it: documents packed into each row (the document
  # mask; four a row), over the composed 8 x 1 step's time.
  if (($(left) > 40)) && [[ -x $BIN/bench_trainer_step ]]; then
    step trainer_acc8_docs4 60 env LD_LIBRARY_PATH="$LIBPATH" "$BIN/bench_trainer_step" --seq "$STEP_SEQ" --accum 8 --steps 2 --warmup 1 --graph --docs 4
    r=$(grep -h "^RESULT llama3_trainer_graph" "$STEPDIR/trainer_acc8_docs4.txt" 2>/dev/null | tail -1)
    ratio=$(awk -v a="$(field step_ms "$r")" -v b="$ACC8_GRAPH_MS" 'BEGIN{if (a > 0 && b > 0) printf "%.3f", a / b; else printf "n/a"}')
    [[ -n $r ]] && note "Trainer 8 x 1, 4 documents a row" "OK" "$(field tokens_per_s "$r") tokens/s, $(field step_ms "$r") ms/step ($ratio of the composed 8 x 1; MFU counts whole rows)"
  fi
fi

# ---- compute-sanitizer on the kernels with shared memory and atomics (small shapes)
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
if [[ -n $BIN && -n $SAN ]]; then
  # (the T=1024 tensor-core attention cases are left out: too slow under racecheck)
  # (the tensor-core attention at D 64 and 48 and with bf16 inputs; the exact SIMT kernels)
  FILTER='*CudaMatchesCpu/attn_tc_causal_doc_gqa_d64_t200:*CudaMatchesCpu/attn_tc_causal_doc_gqa_d64_t200_bwd1:*CudaMatchesCpu/attn_tc_causal_doc_gqa_d64_t200_stsm:*CudaMatchesCpu/attn_tc_causal_gqa_d64_t333:*CudaMatchesCpu/attn_tc_doc*:*CudaMatchesCpu/attn_tc_bf16*:*CudaMatchesCpu/attn_causal_doc_gqa_d32*:*CudaMatchesCpu/linear_cross*:*CudaMatchesCpu/rmsnorm*:*CudaMatchesCpu/embedding*:*CudaMatchesCpu/adamw*:*CudaMatchesCpu/reductions*'
  for tool in memcheck racecheck; do
    step "sanitizer_$tool" 45 env LD_LIBRARY_PATH="$LIBPATH" "$SAN" --tool "$tool" --error-exitcode 3 \
      "$BIN/unit_backend_parity" --gtest_color=no --gtest_filter="$FILTER"
    rc=$?
    errs=$(grep -m1 -o 'ERROR SUMMARY: [0-9]* error[s]*\|RACECHECK SUMMARY: [0-9]* hazard[s]*.*' "$STEPDIR/sanitizer_$tool.txt")
    note "compute-sanitizer $tool" "$([[ $rc == 0 ]] && echo PASS || echo "rc=$rc")" "${errs:-no summary} (attention, cross-entropy, rmsnorm, embedding, adamw, reduction cases)"
  done
fi

# ---- the main job on the GPU: the tiny recipe's pre-training stage, shrunk to 12 steps
# (scripts/gpu-recipe.args), with `llama3 run --device cuda --cuda-graph` (docs/recipes.md), from
# its data stage run by gpu-prep.sh (the demo corpus is built from this machine's installed docs,
# which the GPU image may lack); without it, the data stage runs here first.
if [[ -n $BIN && -x $BIN/llama3 ]] && (($(left) > 60)); then
  RUN="$STEPDIR/recipe_run"
  mapfile -t SETS <scripts/gpu-recipe.args
  rc=0
  if [[ -d $ROOT/.gpu/recipe_run/data && -f $ROOT/.gpu/recipe_run.prefix ]]; then
    # (the data stage's files hold absolute paths: the prepared directory's, renamed here)
    RUN=$ROOT/.gpu/recipe_run
    old=$(cat "$ROOT/.gpu/recipe_run.prefix")
    grep -rl --include='*.json' -F "$old" "$RUN" | xargs -r sed -i "s#$old#$RUN#g"
  else
    step recipe_data 60 env LD_LIBRARY_PATH="$LIBPATH" "$BIN/llama3" run recipes/tiny.textproto --out "$RUN" "${SETS[@]}" --only data
    rc=$?
  fi
  ((rc == 0)) && step recipe_pretrain 60 env LD_LIBRARY_PATH="$LIBPATH" "$BIN/llama3" run recipes/tiny.textproto --out "$RUN" "${SETS[@]}" --only pretrain --device cuda --cuda-graph
  rc=$?
  replays=$(grep -c '"graph":true' "$RUN/pretrain/metrics.jsonl" 2>/dev/null)
  mfu=$(grep '"mfu"' "$RUN/pretrain/metrics.jsonl" 2>/dev/null | tail -1 | sed -n 's/.*"mfu":\([0-9.e+-]*\).*/\1/p')
  final=$(tr -d '\n ' <"$RUN/pretrain/final.json" 2>/dev/null | sed -n 's/.*"eval_loss":\([0-9.e+-]*\).*/\1/p')
  note "llama3 run --device cuda (tiny pretrain)" "$([[ $rc == 0 && -n $final ]] && echo OK || echo "rc=$rc")" "eval loss ${final:-n/a}, ${replays:-0} steps replayed, last step MFU ${mfu:-n/a}% (a tiny model)"
fi

# Both sides at another step shape: both_sides TAG LABEL CAP_OURS CAP_TORCH ARGS... (ARGS go
# to bench_cuda_step and cuda_step_peer.py alike).
both_sides() {
  local tag=$1 label=$2 cap_ours=$3 cap_torch=$4 r
  shift 4
  step "llama3_step_$tag" "$cap_ours" env LD_LIBRARY_PATH="$LIBPATH" "$BIN/bench_cuda_step" --seq "$STEP_SEQ" "$@"
  r=$(grep -h "^RESULT llama3_cuda" "$STEPDIR/llama3_step_$tag.txt" 2>/dev/null | tail -1)
  [[ -n $r ]] && note "llama3 step $label" "OK" "$(field tokens_per_s "$r") tokens/s, MFU $(mfus "$r"), $(field step_ms "$r") ms/step"
  step "torch_eager_$tag" "$cap_torch" python3 bench/cuda_step_peer.py --mode eager --seq "$STEP_SEQ" "$@"
  r=$(grep -h "^RESULT torch_eager" "$STEPDIR/torch_eager_$tag.txt" 2>/dev/null | tail -1)
  [[ -n $r ]] && note "torch eager step $label" "OK" "$(field tokens_per_s "$r") tokens/s, MFU $(mfus "$r"), $(field step_ms "$r") ms/step"
}

# Two sequences per optimizer step (8192 tokens): the optimizer's fixed cost (AdamW is
# memory-bound, ~15 ms) spread over twice the tokens, on both sides.
if [[ -n $BIN ]] && (($(left) > 60)); then
  both_sides b2 "batch 2" 40 50 --batch 2 --steps 3 --warmup 1
fi
# Four (16384 tokens, about 45 GB on our side): a larger micro-batch, as a run with a realistic
# global batch on one card would take.
if [[ -n $BIN ]] && (($(left) > 100)); then
  both_sides b4 "batch 4" 45 60 --batch 4 --steps 3 --warmup 1
fi

# ---- NCCL communicator (issue 5): collectives checked, all_reduce bandwidth
if [[ -n $BIN && -x $BIN/bench_nccl ]]; then
  step nccl 45 env LD_LIBRARY_PATH="$LIBPATH" "$BIN/bench_nccl" --max-mib 256 --iters 20
  rc=$?
  r=$(result nccl_allreduce)
  oks=$(grep -c '^ok ' "$STEPDIR/nccl.txt")
  note "nccl collectives + all_reduce" "$([[ $rc == 0 ]] && echo PASS || echo "rc=$rc")" \
    "$oks checks ok; ranks $(field ranks "$r") algbw $(field algbw_gbs "$r") GB/s busbw $(field busbw_gbs "$r") GB/s at $(field bytes "$r") B"
fi

# ---- Nsight Compute on the tensor-core attention kernels (NCU_ATTN=1): where the time goes
# (speed of light, occupancy, warp stall reasons) for one forward and one backward launch.
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [[ ${NCU_ATTN:-0} == 1 && -n $BIN && -n $NCU ]]; then
  step ncu_attention 120 env LD_LIBRARY_PATH="$LIBPATH" "$NCU" --kernel-name regex:attn_.*_mma \
    --launch-skip 2 --launch-count 2 --section SpeedOfLight --section Occupancy \
    --section WarpStateStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
    "$BIN/bench_cuda_step" --attn-only --seq "$SEQ"
  rc=$?
  note "ncu attention fwd+bwd" "$([[ $rc == 0 ]] && echo OK || echo "rc=$rc")" "report in gpu-check.log (ncu_attention)"
fi

# ---- Eight micro-batches per optimizer step (32768 tokens; gradient accumulation, as a run with a
# realistic global batch trains): the optimizer's fixed cost over 8x the tokens, on both sides.
if [[ -n $BIN ]] && (($(left) > 70)); then
  both_sides acc8 "8 micro-batches" 60 70 --accum 8 --steps 2 --warmup 1
fi
# ---- torch.compile, only with time to spare
if (($(left) > 100)); then
  step torch_compile $(($(left) - 15)) python3 bench/cuda_step_peer.py --mode compile --seq "$STEP_SEQ" --steps 3 --warmup 1
  r=$(result torch_compile)
  [[ -n $r ]] && note "torch compile step seq $(field seq "$r")" "OK" "$(field tokens_per_s "$r") tokens/s, MFU $(mfus "$r"), $(field step_ms "$r") ms/step" || note "torch compile step" "FAIL/TIMEOUT" "see torch_compile in gpu-check.log"
else
  note "torch compile step" "SKIPPED" "$(left) s left"
fi

{
  echo
  echo "=== summary: ${DEVICE:-unknown device}, ${SECONDS} s (budget ${DEADLINE} s); MFU = (6 * non-embedding params * tokens + causal attention) / step time / 989 TFLOP/s"
  printf '%-34s %-8s %s\n' "check" "status" "figures"
  for l in "${SUMMARY[@]}"; do echo "$l"; done
} | tee "$LOGDIR/summary.txt"
sleep 1  # let tee flush gpu-check.log before $OUT is collected
