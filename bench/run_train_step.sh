#!/usr/bin/env bash
# The issue-2 training-step benchmark: ours (f32, bf16 mixed) against PyTorch doing the same
# step on the same machine in the same run: Debian's torch 1.13 (/usr/bin/python3) and, when
# present, a newer torch (TORCH_PY, default /opt/torch2/bin/python: `python3 -m venv
# /opt/torch2 && /opt/torch2/bin/pip install torch numpy`), eager, autocast-bf16 and
# torch.compile. Prints one JSON line per run and the ratios last.
#
#   bash bench/run_train_step.sh [BUILD_DIR]      (env: STEPS=5 WARMUP=2 THREADS=2)
set -uo pipefail
BUILD=${1:-build}
HERE=$(cd "$(dirname "$0")" && pwd)
STEPS=${STEPS:-5}; WARMUP=${WARMUP:-2}; THREADS=${THREADS:-2}
TORCH_PY=${TORCH_PY:-/opt/torch2/bin/python}
export OMP_NUM_THREADS=$THREADS
RES=$(mktemp)
run() { "$@" 2>/dev/null | grep '^{' | tee -a "$RES"; }
run "$BUILD/bench/bench_train_step" --precision f32 --steps "$STEPS" --warmup "$WARMUP"
run "$BUILD/bench/bench_train_step" --precision bf16 --steps "$STEPS" --warmup "$WARMUP"
for py in /usr/bin/python3 "$TORCH_PY"; do
  [ -x "$py" ] || continue
  for mode in f32 bf16; do run "$py" "$HERE/train_step_peer.py" --mode "$mode" --steps "$STEPS" --warmup "$WARMUP" --threads "$THREADS"; done
  if [ "$py" = "$TORCH_PY" ]; then
    for mode in compile compile-bf16; do timeout 900 "$py" "$HERE/train_step_peer.py" --mode "$mode" --steps "$STEPS" --warmup "$WARMUP" --threads "$THREADS" 2>/dev/null | grep '^{' | tee -a "$RES"; done
  fi
done
python3 - "$RES" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
ours = {r["precision"]: r for r in rows if r["impl"] == "llama3"}
print("\n| impl | precision | tokens/s | GFLOP/s | % of ceiling | peak RSS MB |")
print("| --- | --- | --- | --- | --- | --- |")
for r in rows:
    print(f"| {r['impl']} | {r['precision']} | {r['tokens_per_s']} | {r['gflops']} | {r.get('pct_of_ceiling', '')} | {r['peak_rss_mb']} |")
for prec, peer_modes in (("f32", ("f32", "compile")), ("bf16", ("bf16", "compile-bf16"))):
    if prec not in ours:
        continue
    for r in rows:
        if r["impl"] != "llama3" and r["precision"] in peer_modes:
            print(f"{prec}: llama3 / {r['impl']} {r['precision']} = {ours[prec]['tokens_per_s'] / r['tokens_per_s']:.2f}x tokens/s, "
                  f"peak RSS {ours[prec]['peak_rss_mb']} vs {r['peak_rss_mb']} MB")
PY
rm -f "$RES"
