#!/usr/bin/env bash
# Runs bench_parallel for each layout on this machine and prints tokens/s relative to the
# single-process run on the same cores, and each layout's bytes per rank and step against
# the analytic volume. Usage: bench/bench_parallel.sh BUILD_DIR [extra bench_parallel args]
# The ranks share the machine's cores (mpirun --oversubscribe, OMP_NUM_THREADS = cores / ranks,
# at least 1), so the ratio shows the parallel overhead, not a multi-node speed-up.
# wait_ms / wait_frac / wait_max: time blocked in communication waits per step, mean rank's
# fraction of the step and the worst rank's (bench_parallel.cpp); pp_wait_ms / pp_wait_max:
# the part of it in the pipeline group (point-to-point receives and sends), mean and worst
# rank; cp_wait_ms: the part in the cp group (K/V gathers etc.), mean rank; tp_wait_ms: the
# part in the tp group, mean rank. FSDP, pipeline, cp and tp layouts run with --no-overlap
# (blocking collectives; each pipeline receive posted where it is consumed; column-parallel
# input-gradient all-reduces after their node; row-parallel outputs all-reduced whole; dK/dV
# reduce-scatters in their node) and with the default overlap (receives posted ahead, K/V
# gathers issued before the Q/K projections, input-gradient all-reduces in flight during the
# weight-gradient GEMM, row-parallel outputs all-reduced by row slices during the GEMM, dK/dV
# reduce-scatters issued as soon as the attention backward produced them); --no-tp-overlap
# keeps the other overlaps and turns the tp ones off (tp 2 x dp_shard 2 runs all three);
# --no-tp-forward-overlap turns off only the row-parallel one, --no-cp-backward-overlap only
# the dK/dV one.
# ONLY=REGEX runs only the layouts whose arguments match (the single-process base always runs).
set -euo pipefail
BUILD=${1:?build dir}
shift || true
BIN="$BUILD/bench/bench_parallel"
CORES=$(nproc)
run() {  # run NP ARGS...
  local np=$1; shift
  local threads=$(( CORES / np )); (( threads < 1 )) && threads=1
  timeout -k 5 300 mpirun --oversubscribe --allow-run-as-root -x OMP_NUM_THREADS=$threads -np "$np" \
    "$BIN" "$@" "${EXTRA[@]}" </dev/null | grep '^RESULT'
}
EXTRA=("$@")
base=$(run 1)
base_tps=$(sed -n 's/.*tokens_per_s=\([0-9.]*\).*/\1/p' <<<"$base")
field() { sed -n "s/.* $1=\([0-9.]*\).*/\1/p" <<<"$2"; }
printf "%-62s %5s %10s %6s %14s %14s %9s %8s %8s %9s %9s %10s %10s %10s %10s\n" layout ranks tokens/s vs_1 \
  bytes/rank/step analytic deviation step_ms wait_ms wait_frac wait_max pp_wait_ms pp_wait_max cp_wait_ms \
  tp_wait_ms
while read -r np args; do
  if [[ -n ${ONLY:-} ]] && ! grep -Eq -- "$ONLY" <<<"$args"; then continue; fi
  r=$(run "$np" $args)
  tps=$(field tokens_per_s "$r")
  printf "%-62s %5s %10s %6.2f %14s %14s %9s %8s %8s %9s %9s %10s %10s %10s %10s\n" "$args" "$np" "$tps" \
    "$(awk -v a="$tps" -v b="$base_tps" 'BEGIN{print a/b}')" "$(field bytes_per_rank_step "$r")" \
    "$(field analytic "$r")" "$(field max_rank_deviation "$r")" "$(field step_ms "$r")" \
    "$(field wait_ms_per_step_mean "$r")" "$(field wait_frac_mean "$r")" "$(field wait_frac_max "$r")" \
    "$(field pp_wait_ms_per_step_mean "$r")" "$(field pp_wait_ms_per_step_max "$r")" \
    "$(field cp_wait_ms_per_step_mean "$r")" "$(field tp_wait_ms_per_step_mean "$r")"
done <<'LAYOUTS'
1
2 --dp-shard 2 --no-overlap
2 --dp-shard 2
2 --dp-replicate 2
2 --tp 2 --no-overlap
2 --tp 2 --no-tp-forward-overlap
2 --tp 2
2 --pp 2 --microbatches 4 --no-overlap
2 --pp 2 --microbatches 4
2 --pp 2 --virtual-stages 2 --microbatches 4 --no-overlap
2 --pp 2 --virtual-stages 2 --microbatches 4
2 --cp 2 --no-overlap
2 --cp 2 --no-cp-backward-overlap
2 --cp 2
4 --tp 2 --cp 2 --no-overlap
4 --tp 2 --cp 2
4 --dp-replicate 2 --dp-shard 2 --no-overlap
4 --dp-replicate 2 --dp-shard 2
4 --tp 2 --pp 2 --microbatches 2 --no-overlap
4 --tp 2 --pp 2 --microbatches 2
4 --tp 2 --dp-shard 2 --no-overlap
4 --tp 2 --dp-shard 2 --no-tp-overlap
4 --tp 2 --dp-shard 2
8 --tp 2 --dp-shard 2 --cp 2 --no-overlap
8 --tp 2 --dp-shard 2 --cp 2
8 --dp-replicate 2 --tp 2 --pp 2 --microbatches 2 --no-overlap
8 --dp-replicate 2 --tp 2 --pp 2 --microbatches 2
LAYOUTS
