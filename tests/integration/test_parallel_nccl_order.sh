#!/usr/bin/env bash
# Pipeline parallelism under NCCL's point-to-point semantics, checked on CPUs: with
# LLAMA3_P2P_EMULATE_NCCL=1 the MPI communicator behaves like NCCL's (runtime/dist/
# communicator.h): a send or receive outside a batch completes when issued (synchronous-mode
# send, blocking receive), a batch_p2p call completes all its transfers together before it
# returns, and every transfer has the same tag, so transfers between two ranks match in issue
# order only. A schedule that would deadlock under NCCL then hangs here (the 20 s
# communicator timeout turns that into an error), and one whose transfers to a peer are
# issued in another order than the peer receives them mixes up activations (the weights
# differ). The pipeline schedule issues each unit's sends and the next unit's receives as
# one batch (text/model/parallelize.cpp); under the emulation 1F1B, interleaved 1F1B, pp 4
# interleaved, tp 2 x pp 2 and dp_replicate 2 x tp 2 x pp 2 must train exactly (tolerance 0,
# losses and every updated weight) as the normal MPI run, which posts receives ahead.
# (The previous schedule - isend / irecv, receives posted up to two operations ahead -
# timed out under the emulation at pp 2: docs/parallelism.md.)
#
# First, tests/integration/pp_nccl_schedule_model.py checks the same batching rule on a model
# of NCCL's semantics over pp 2..8, V 1..4, 1..16 micro-batches (no processes, under a second).
set -euo pipefail
BUILD=${1:?build dir}
python3 "$(dirname "$0")/pp_nccl_schedule_model.py"
source "$(dirname "$0")/mpi_common.sh"
COMMON=(--flavour debug --batch 8 --seq 32 --steps 3 --lr 1e-2 --eps 1e-3 --docs --timeout 20)
fails=0
check() {  # check NP LAYERS ARGS...
  local np=$1 layers=$2; shift 2
  if ! timeout -k 5 120 "${MPI[@]}" -np "$np" "$BIN" parallel "${COMMON[@]}" --layers "$layers" "$@" \
       --dump "$OUT/mpi.st" >"$OUT/log0.txt" 2>&1; then
    echo "FAIL np=$np $* (normal MPI run)"; cat "$OUT/log0.txt"; fails=$((fails + 1)); return
  fi
  if timeout -k 5 120 "${MPI[@]}" -x LLAMA3_P2P_EMULATE_NCCL=1 -np "$np" "$BIN" parallel "${COMMON[@]}" \
       --layers "$layers" "$@" --reference "$OUT/mpi.st" --tol 0 >"$OUT/log1.txt" 2>&1 &&
     grep -q "NCCL's point-to-point ordering emulated" "$OUT/log1.txt"; then
    echo "PASS np=$np $* : NCCL ordering vs MPI: $(grep 'max relative' "$OUT/log1.txt")"
  else
    echo "FAIL np=$np $* (NCCL ordering emulated)"; cat "$OUT/log1.txt"; fails=$((fails + 1))
  fi
}
check 2 4 --pp 2 --microbatches 4
check 2 4 --pp 2 --virtual-stages 2 --microbatches 4
check 2 4 --pp 2 --microbatches 4 --no-overlap
check 4 8 --pp 4 --virtual-stages 2 --microbatches 8
check 4 4 --tp 2 --pp 2 --microbatches 2
check 8 4 --dp-replicate 2 --tp 2 --pp 2 --microbatches 2
exit $fails
