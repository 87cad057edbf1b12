#!/usr/bin/env bash
# FSDP with communication/compute overlap (asynchronous all-gathers prefetched one block
# ahead, gradient reduce-scatters in flight during the previous block's backward) must give
# exactly the results of the blocking path: the reduce-scatters are completed in issue order,
# so every shard gradient is summed in the same order. For dp_shard 2, HSDP, tp 2 x dp_shard 2
# and dp_shard 2 x tp 2 x pp 2 (where the last block's recompute prefetch waits across
# pipeline forwards), the losses of 3 steps and all updated weights of the default (overlap)
# run are compared with a --no-overlap run at tolerance 0 (bitwise); dp_shard 2 also with the
# plain single process within 1e-5 (test_parallel_equivalence checks every layout so, with
# the default overlap on).
#
# Pipeline point-to-point with overlap posts each receive up to two schedule operations
# before the one that consumes it (--no-overlap: where it is consumed); only the timing of the
# transfers changes, so pp 2 (1F1B and interleaved), tp 2 x pp 2 and dp_replicate 2 x tp 2 x
# pp 2 must be bitwise equal between the two as well. So must cp 2 and cp 2 x pp 2, whose K/V
# all-gathers are issued asynchronously with overlap (V's before the K and Q projections,
# K's before the Q projection) and waited just before attention.
#
# Tensor parallelism with overlap all-reduces each column-parallel layer's input gradient
# (q/k/v, gate/up) asynchronously inside the layer's backward, while its weight-gradient GEMM
# runs (--no-overlap: copy_to_group's all-reduce after the node); the same all-reduce of the
# same values at the same point of the sequence, so tp 2 (f32 and bf16), tp 2 x dp_shard 2 and
# the other tp layouts above must be bitwise equal too. With overlap the row-parallel layers
# (o, down) also compute their output in row slices and all-reduce each slice while the next
# is computed (--no-overlap: one all-reduce of the whole output after the GEMM): every output
# row is the same dot products and every element the same sum over the tp ranks (in-place
# MPI_Iallreduce: OpenMPI's libnbc binomial tree, whatever the length), so bitwise again -
# tp 2, tp 2 x cp 2, tp 2 x dp_shard 2 x cp 2 (slices of 32 rows there) and every tp layout.
# And the cp backward's dK/dV reduce-scatters are issued as soon as the attention backward has
# produced them and waited where consumed (--no-overlap: issued and waited in their node):
# cp 2, cp 2 x pp 2, tp 2 x cp 2, tp 2 x dp_shard 2 x cp 2.
set -euo pipefail
BUILD=${1:?build dir}
source "$(dirname "$0")/mpi_common.sh"
COMMON=(--flavour debug --layers 4 --batch 8 --seq 32 --steps 3 --lr 1e-2 --eps 1e-3 --docs --timeout 60)
"$BIN" parallel --plain "${COMMON[@]}" --dump "$OUT/ref.st" | tail -1
fails=0
check() {  # check NP ARGS...
  local np=$1; shift
  if ! timeout -k 5 120 "${MPI[@]}" -np "$np" "$BIN" parallel "${COMMON[@]}" "$@" --no-overlap \
       --dump "$OUT/blocking.st" >"$OUT/log0.txt" 2>&1; then
    echo "FAIL np=$np $* --no-overlap"; cat "$OUT/log0.txt"; fails=$((fails + 1)); return
  fi
  if timeout -k 5 120 "${MPI[@]}" -np "$np" "$BIN" parallel "${COMMON[@]}" "$@" --reference "$OUT/blocking.st" \
       --tol 0 >"$OUT/log1.txt" 2>&1; then
    echo "PASS np=$np $* : overlap vs blocking: $(grep 'max relative' "$OUT/log1.txt")"
  else
    echo "FAIL np=$np $* (overlap)"; cat "$OUT/log1.txt" "$OUT/log2.txt" 2>/dev/null; fails=$((fails + 1))
  fi
}
check 2 --dp-shard 2
if timeout -k 5 120 "${MPI[@]}" -np 2 "$BIN" parallel "${COMMON[@]}" --dp-shard 2 --reference "$OUT/ref.st" \
     >"$OUT/log2.txt" 2>&1; then
  echo "PASS np=2 --dp-shard 2 (overlap) vs one process: $(grep 'max relative' "$OUT/log2.txt")"
else
  echo "FAIL np=2 --dp-shard 2 (overlap) vs one process"; cat "$OUT/log2.txt"; fails=$((fails + 1))
fi
check 4 --dp-replicate 2 --dp-shard 2
check 2 --tp 2
check 2 --tp 2 --precision bf16
check 4 --tp 2 --dp-shard 2
check 8 --dp-shard 2 --tp 2 --pp 2 --microbatches 2
check 2 --pp 2 --microbatches 4
check 2 --pp 2 --virtual-stages 2 --microbatches 4
check 4 --tp 2 --pp 2 --microbatches 2
check 8 --dp-replicate 2 --tp 2 --pp 2 --microbatches 2
check 2 --cp 2
check 4 --cp 2 --pp 2 --microbatches 2 --checkpointing
check 4 --tp 2 --cp 2
check 8 --tp 2 --dp-shard 2 --cp 2
exit $fails
