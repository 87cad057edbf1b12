#!/usr/bin/env bash
# The issue-6 generation benchmark: KV-cache greedy decoding, ours (bench_generate) against
# the PyTorch peer (generate_peer.py) on the same machine in the same run, for each flavour,
# precision (f32; bf16 = bf16 weights on both sides) and batch size. Ours and the peer
# alternate for ROUNDS rounds (this VM's speed drifts between minutes); the ratio is the
# median of the per-round ratios of decode tokens/s.
#
#   bash bench/run_generate.sh [BUILD_DIR]   (env: ROUNDS=2 FLAVOURS="tiny 125M" PRECISIONS="f32 bf16"
#                                             BATCHES=1,16 THREADS=2 TORCH_PY=/opt/torch2/bin/python)
set -uo pipefail
BUILD=${1:-build}
HERE=$(cd "$(dirname "$0")" && pwd)
ROUNDS=${ROUNDS:-2}; THREADS=${THREADS:-2}; BATCHES=${BATCHES:-1,16}
FLAVOURS=${FLAVOURS:-tiny 125M}; PRECISIONS=${PRECISIONS:-f32 bf16}
TORCH_PY=${TORCH_PY:-/opt/torch2/bin/python}
export OMP_NUM_THREADS=$THREADS
RES=$(mktemp)
for ROUND in $(seq 1 "$ROUNDS"); do
  for f in $FLAVOURS; do
    for p in $PRECISIONS; do
      "$BUILD/bench/bench_generate" --flavour "$f" --batch "$BATCHES" --precision "$p" 2>/dev/null |
        grep '^{' | sed "s/}\$/, \"round\": $ROUND}/" | tee -a "$RES"
      "$TORCH_PY" "$HERE/generate_peer.py" --flavour "$f" --batch "$BATCHES" --dtype "$p" --threads "$THREADS" 2>/dev/null |
        grep '^{' | sed "s/}\$/, \"round\": $ROUND}/" | tee -a "$RES"
    done
  done
done
python3 - "$RES" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
key = lambda r: (r["flavour"], r["precision"], r["batch"])
print("\n| flavour | precision | batch | llama3 decode tokens/s (rounds) | PyTorch (rounds) | median ratio |")
print("| --- | --- | --- | --- | --- | --- |")
for k in sorted({key(r) for r in rows}, key=lambda k: (k[0] != "tiny", k[1], k[2])):
    ours = {r["round"]: r["decode_tokens_per_s"] for r in rows if key(r) == k and r["impl"] == "llama3"}
    peer = {r["round"]: r["decode_tokens_per_s"] for r in rows if key(r) == k and r["impl"] != "llama3"}
    ratios = [ours[i] / peer[i] for i in sorted(ours) if i in peer]
    fmt = lambda d: " / ".join(f"{d[i]:,.1f}" for i in sorted(d))
    print(f"| {k[0]} | {k[1]} | {k[2]} | {fmt(ours)} | {fmt(peer)} | "
          f"{statistics.median(ratios):.2f}x |" if ratios else "| n/a |")
PY
rm -f "$RES"
