#!/usr/bin/env bash
# Runs bench_parallel for each layout on this machine and prints tokens/s relative to the
# single-process run on the same cores, and each layout's bytes per rank and step against
# the analytic volume. Usage: bench/bench_parallel.sh BUILD_DIR [extra bench_parallel args]
# The ranks share the machine's cores (mpirun --oversubscribe, OMP_NUM_THREADS = cores / ranks,
# at least 1), so the ratio shows the parallel overhead, not a multi-node speed-up.
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
printf "%-42s %5s %10s %8s %14s %14s %9s\n" layout ranks tokens/s vs_1 bytes/rank/step analytic deviation
while read -r np args; do
  r=$(run "$np" $args)
  tps=$(sed -n 's/.*tokens_per_s=\([0-9.]*\).*/\1/p' <<<"$r")
  bytes=$(sed -n 's/.*bytes_per_rank_step=\([0-9]*\).*/\1/p' <<<"$r")
  an=$(sed -n 's/.*analytic=\([0-9]*\).*/\1/p' <<<"$r")
  dev=$(sed -n 's/.*max_rank_deviation=\([0-9.]*\).*/\1/p' <<<"$r")
  printf "%-42s %5s %10s %8.2f %14s %14s %9s\n" "$args" "$np" "$tps" "$(awk -v a="$tps" -v b="$base_tps" 'BEGIN{print a/b}')" \
    "$bytes" "$an" "$dev"
done <<'LAYOUTS'
1
2 --dp-shard 2
2 --dp-replicate 2
2 --tp 2
2 --pp 2 --microbatches 4
2 --cp 2
4 --dp-replicate 2 --dp-shard 2
4 --tp 2 --pp 2 --microbatches 2
8 --tp 2 --dp-shard 2 --cp 2
8 --dp-replicate 2 --tp 2 --pp 2 --microbatches 2
LAYOUTS
