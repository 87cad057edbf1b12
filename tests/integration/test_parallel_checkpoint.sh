#!/usr/bin/env bash
# Distributed checkpoints load under another layout: steps 1-2 under tp 2 x pp 2 (saved as
# one file per rank with slice metadata), steps 3-4 under dp_shard 4 (loaded, resharded,
# saved again), step 5 in one plain process - weights, AdamW moments and step count carried
# through - must equal 5 plain single-process steps (1e-5 relative, see
# test_parallel_equivalence.sh for the AdamW eps). A checkpoint missing a rank's file must
# be rejected, naming the uncovered tensor.
set -euo pipefail
BUILD=${1:?build dir}
MPI_TIMEOUT=120
source "$(dirname "$0")/mpi_common.sh"
C=(--flavour debug --layers 4 --batch 8 --seq 32 --lr 1e-2 --eps 1e-3 --docs --timeout 60)

"$BIN" parallel --plain "${C[@]}" --steps 5 --dump "$OUT/ref.st" | tail -1
"${MPI[@]}" -np 4 "$BIN" parallel "${C[@]}" --tp 2 --pp 2 --microbatches 2 --steps 2 --save "$OUT/ck1" | tail -1
"${MPI[@]}" -np 4 "$BIN" parallel "${C[@]}" --dp-shard 4 --steps 4 --load "$OUT/ck1" --save "$OUT/ck2" | tail -1
"$BIN" parallel --plain "${C[@]}" --steps 5 --load "$OUT/ck2" --reference "$OUT/ref.st" | tail -1

rm "$OUT/ck2/rank-00002.safetensors"
if "$BIN" parallel --plain "${C[@]}" --steps 5 --load "$OUT/ck2" >"$OUT/bad.log" 2>&1; then
  echo "FAIL: a checkpoint missing a rank file loaded"; exit 1
fi
grep -o "covers [0-9]* of [0-9]* elements of .*" "$OUT/bad.log" | head -1
grep -q "covers" "$OUT/bad.log"
echo "PASS resharding tp2 x pp2 -> dp_shard 4 -> single process"
