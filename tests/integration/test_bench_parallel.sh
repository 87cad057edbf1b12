#!/usr/bin/env bash
# The bytes each rank sends per step (counted in the Communicators) must be within 10% of
# the analytic volume of its layout (bench/bench_parallel.cpp states the formula) - an extra
# or missing collective shows up here. Small shapes; a few layouts.
set -euo pipefail
BUILD=${1:?build dir}
BIN="$BUILD/bench/bench_parallel"
if [[ ! -x $BIN ]] || ! command -v mpirun >/dev/null; then echo "bench_parallel or mpirun missing: nothing to check"; exit 0; fi
fails=0
while read -r np args; do
  r=$(timeout -k 5 120 mpirun --oversubscribe --allow-run-as-root -x OMP_NUM_THREADS=1 -np "$np" "$BIN" $args \
        --dim 64 --heads 4 --kv-heads 2 --layers 4 --vocab 512 --batch 8 --seq 32 --steps 1 </dev/null | grep '^RESULT')
  dev=$(sed -n 's/.*max_rank_deviation=\([0-9.]*\).*/\1/p' <<<"$r")
  if awk -v d="$dev" 'BEGIN { exit !(d != "" && d <= 0.10) }'; then echo "PASS $r"; else echo "FAIL $r"; fails=$((fails + 1)); fi
done <<'LAYOUTS'
2 --dp-shard 2
2 --dp-shard 2 --no-overlap
2 --tp 2 --checkpointing
2 --pp 2 --microbatches 2
2 --pp 2 --virtual-stages 2 --microbatches 2
4 --dp-replicate 2 --cp 2
8 --tp 2 --dp-shard 2 --pp 2 --microbatches 2
LAYOUTS
exit $fails
