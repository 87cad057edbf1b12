#!/usr/bin/env bash
# The issue-2 training-step benchmark: ours (f32, bf16 mixed) against PyTorch doing the same
# step on the same machine in the same run. The peer is the newest PyTorch installable here
# (TORCH_PY, default /opt/torch2/bin/python: `python3 -m venv /opt/torch2 &&
# /opt/torch2/bin/pip install torch numpy`), eager f32 and autocast bf16; COMPILE=1 adds
# torch.compile, DEBIAN_TORCH=1 adds Debian's torch 1.13 (/usr/bin/python3; very slow here).
#
# This machine is a shared 2-core VM whose speed drifts by 20-30% from minute to minute, so
# ours and the peer alternate for ROUNDS rounds and the comparison is the median of the
# per-round ratios (each ratio taken between neighbouring runs). Prints one JSON line per
# run, then a table and the ratios last.
#
#   bash bench/run_train_step.sh [BUILD_DIR]    (env: ROUNDS=3 STEPS=3 WARMUP=1 THREADS=2)
set -uo pipefail
BUILD=${1:-build}
HERE=$(cd "$(dirname "$0")" && pwd)
ROUNDS=${ROUNDS:-3}; STEPS=${STEPS:-3}; WARMUP=${WARMUP:-1}; THREADS=${THREADS:-2}
TORCH_PY=${TORCH_PY:-/opt/torch2/bin/python}
export OMP_NUM_THREADS=$THREADS
RES=$(mktemp)
run() { "$@" 2>/dev/null | grep '^{' | sed "s/}\$/, \"round\": $ROUND}/" | tee -a "$RES"; }
peer() { [ -x "$1" ] && run "$1" "$HERE/train_step_peer.py" --mode "$2" --steps "$STEPS" --warmup "$WARMUP" --threads "$THREADS"; }
for ROUND in $(seq 1 "$ROUNDS"); do
  for prec in f32 bf16; do
    run "$BUILD/bench/bench_train_step" --precision "$prec" --steps "$STEPS" --warmup "$WARMUP"
    peer "$TORCH_PY" "$prec"
  done
done
ROUND=0
if [ "${COMPILE:-0}" = 1 ]; then peer "$TORCH_PY" compile; peer "$TORCH_PY" compile-bf16; fi
if [ "${DEBIAN_TORCH:-0}" = 1 ]; then peer /usr/bin/python3 f32; peer /usr/bin/python3 bf16; fi
python3 - "$RES" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("\n| impl | precision | round | tokens/s | GFLOP/s | % of same-run ceiling | peak RSS MB |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for r in rows:
    print(f"| {r['impl']} | {r['precision']} | {r['round']} | {r['tokens_per_s']} | {r['gflops']} | "
          f"{r.get('pct_of_ceiling', '')} | {r['peak_rss_mb']} |")
for prec in ("f32", "bf16"):
    ours = {r["round"]: r for r in rows if r["impl"] == "llama3" and r["precision"] == prec}
    peers = {r["round"]: r for r in rows if r["impl"] != "llama3" and r["precision"] == prec and r["round"] > 0}
    ratios = [ours[k]["tokens_per_s"] / peers[k]["tokens_per_s"] for k in sorted(ours) if k in peers]
    if not ratios:
        continue
    rss = max(r["peak_rss_mb"] for r in ours.values()), max(r["peak_rss_mb"] for r in peers.values())
    pct = statistics.median(r["pct_of_ceiling"] for r in ours.values())
    print(f"{prec}: llama3 / {next(iter(peers.values()))['impl']} = median {statistics.median(ratios):.2f}x tokens/s "
          f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)}); median {pct:.1f}% of the same-run GEMM ceiling; "
          f"peak RSS {rss[0]} vs {rss[1]} MB")
PY
rm -f "$RES"
