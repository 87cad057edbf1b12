#!/usr/bin/env bash
# Failure behaviour of distributed runs: bad layouts fail before any work with the
# arithmetic in the message; a rank that hangs makes its peers exit with a clear timeout
# error; a rank killed with SIGKILL or aborting ends the job - all within bounded time.
set -uo pipefail
BUILD=${1:?build dir}
source "$(dirname "$0")/mpi_common.sh"
fails=0
expect_fail() {  # expect_fail NAME MAX_SECONDS PATTERN CMD...
  local name=$1 max=$2 pat=$3; shift 3
  local t0=$(date +%s)
  timeout -k 5 $((max + 30)) "$@" >"$OUT/log" 2>&1
  local rc=$? dt=$(( $(date +%s) - t0 ))
  if [[ $rc -ne 0 && $dt -le $max ]] && grep -q -- "$pat" "$OUT/log"; then
    echo "PASS $name (rc $rc, ${dt}s): $(grep -m1 -o -- "$pat.*" "$OUT/log" | cut -c1-150)"
  else
    echo "FAIL $name (rc $rc, ${dt}s, want failure within ${max}s matching '$pat')"; tail -20 "$OUT/log"
    fails=$((fails + 1))
  fi
}
expect_fail "world-size mismatch" 20 "dp_replicate 1 x dp_shard 2 x cp 1 x tp 2 x pp 2 = 8 != world size 4" \
  "${MPI[@]}" -np 4 "$BIN" parallel --dp-shard 2 --tp 2 --pp 2
expect_fail "heads not divisible by tp" 20 "n_heads 4 is not divisible by tp 3" \
  "${MPI[@]}" -np 3 "$BIN" parallel --tp 3
expect_fail "layers across stages" 20 "2 layers cannot fill pp 4" \
  "${MPI[@]}" -np 4 "$BIN" parallel --pp 4 --layers 2
expect_fail "seq not divisible by 2 x cp" 20 "seq 30 is not divisible by 2 x cp 2 = 4" \
  "${MPI[@]}" -np 2 "$BIN" parallel --cp 2 --seq 30
expect_fail "hanging rank -> peers time out" 40 "did not complete within 5 s" \
  "${MPI[@]}" -np 4 "$BIN" parallel --dp-shard 2 --tp 2 --layers 4 --steps 5 --timeout 5 --inject-hang 1
expect_fail "aborting rank ends the job" 30 "injected abort" \
  "${MPI[@]}" -np 4 "$BIN" parallel --dp-shard 2 --pp 2 --layers 4 --steps 5 --inject-abort 2

# SIGKILL of one rank in the middle of a long run.
t0=$(date +%s)
"${MPI[@]}" -np 4 "$BIN" parallel --dp-shard 4 --layers 4 --steps 100000 --timeout 10 >"$OUT/kill.log" 2>&1 &
mp=$!
for _ in $(seq 100); do grep -q "^step 2 " "$OUT/kill.log" && break; sleep 0.2; done
victim=$(pgrep -P $mp -f "llama3 parallel" | sed -n 2p)
if [[ -n $victim ]]; then kill -9 "$victim"; fi
for _ in $(seq 150); do kill -0 $mp 2>/dev/null || break; sleep 0.2; done
if kill -0 $mp 2>/dev/null; then
  echo "FAIL kill -9 of rank pid $victim: job still running after 30 s"; kill -9 $mp; fails=$((fails + 1))
else
  wait $mp; rc=$?
  if [[ -n $victim && $rc -ne 0 ]]; then
    echo "PASS kill -9 of rank pid $victim ended the job in $(( $(date +%s) - t0 ))s (rc $rc)"
  else
    echo "FAIL kill -9 (victim '$victim', rc $rc)"; tail -20 "$OUT/kill.log"; fails=$((fails + 1))
  fi
fi
exit $fails
