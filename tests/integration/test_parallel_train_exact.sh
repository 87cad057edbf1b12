#!/usr/bin/env bash
# `llama3 train --parallel` beyond tolerances (docs/parallelism.md, AdamW eps 1e-8):
# dp_shard 2 sums the same two half-batch gradients as one process accumulating two
# micro-batches, so its weights and AdamW moments are bitwise equal to that run; and when
# gradients overflow (lr 1e4), every rank skips the update together, as one process does.
set -euo pipefail
BUILD=${1:?build dir}
MPI_TIMEOUT=120
source "$(dirname "$0")/mpi_common.sh"
"$BIN" data demo --out "$OUT/demo" --vocab-size 512 >/dev/null
# Exactness at AdamW eps 1e-8 (docs/parallelism.md): without clipping, dp_shard 2 on a
# batch of 8 sums the same two 4-row gradients as one process accumulating 2 micro-batches
# of 4, so after 3 steps the weights and moments must be bitwise equal (the distributed
# checkpoint is turned into a single-process one by a plain --resume at the same step).
B=(--data "$OUT/demo" --flavour debug --seq 32 --lr 1e-2 --warmup 0 --decay constant --eval-every 0 --clip 0 --steps 3)
"$BIN" train "${B[@]}" --batch 4 --accum 2 --out "$OUT/acc2" >/dev/null 2>&1
"${MPI[@]}" -np 2 "$BIN" train "${B[@]}" --batch 8 --parallel dp_shard=2 --out "$OUT/bits" > "$OUT/bits.log" 2>&1 \
  || { cat "$OUT/bits.log"; exit 1; }
"$BIN" train "${B[@]}" --batch 8 --resume --out "$OUT/bits" >/dev/null 2>&1
for f in model.safetensors optimizer.safetensors; do
  cmp "$OUT/acc2/checkpoint/$f" "$OUT/bits/checkpoint/$f" || { echo "FAIL: $f of dp_shard 2 differs from accumulation"; exit 1; }
done
echo "dp_shard 2 == one process accumulating the same halves: weights and moments bitwise equal after 3 steps"
# NaN skip: at lr 1e4 the gradients of steps 4-6 overflow. Under FSDP a non-finite element
# lies in one rank's shard; every rank must skip together (no hang, no divergence), as the
# single process does.
N=(--data "$OUT/demo" --flavour debug --seq 32 --batch 8 --lr 1e4 --warmup 0 --decay constant --clip 0
   --eval-every 0 --steps 6)
"$BIN" train "${N[@]}" --out "$OUT/nan1" >/dev/null 2>&1
"${MPI[@]}" -np 2 "$BIN" train "${N[@]}" --timeout 30 --parallel dp_shard=2 --out "$OUT/nan2" > "$OUT/nan2.log" 2>&1 \
  || { cat "$OUT/nan2.log"; exit 1; }
python3 - "$OUT/nan1/final.json" "$OUT/nan2/final.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
assert a["skipped_steps"] == 3 and b["skipped_steps"] == 3, (a, b)
assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a, b)
print(f"non-finite steps skipped on every rank: {b['skipped_steps']} of {b['steps']}, as in one process")
PY
echo "PASS llama3 train --parallel: bitwise data parallelism, NaN skip on every rank"
