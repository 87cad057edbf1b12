#!/usr/bin/env bash
# Keeps bench_trainer_step (the product's Trainer step, timed by gpu-check.sh on a GPU) building
# and running on CPU-only CI: the debug model in bf16 mixed precision with gradient
# accumulation, with and without documents; the loss must start near ln(512) and fall, every
# RESULT field must be there, and bad flags must be refused by name.
# Usage: test_bench_trainer_step_cpu.sh BUILD_DIR
set -euo pipefail
bin=$1/bench/bench_trainer_step
if [[ ! -x $bin ]]; then
  echo "bench_trainer_step not built (LLAMA3_BENCH=OFF): nothing to check"
  exit 0
fi
args=(--device cpu --flavour debug --seq 64 --batch 2 --accum 2 --steps 4 --warmup 1)
for docs in 1 4; do
  out=$("$bin" "${args[@]}" --docs "$docs")
  echo "$out"
  first=$(sed -n 's/^step 1 loss \([0-9.]*\).*/\1/p' <<<"$out")
  r=$(grep '^RESULT llama3_trainer ' <<<"$out")
  grep -Eq "^RESULT llama3_trainer seq=64 batch=2 accum=2 docs=$docs tokens_per_s=[0-9]+ mfu=[0-9.]+ mfu_full=[0-9.]+ step_ms=[0-9.]+ loss=[0-9.]+ graph_steps=0 after_steps=5$" <<<"$r" ||
    { echo "docs $docs: incomplete RESULT line: $r"; exit 1; }
  last=$(sed -n 's/.* loss=\([0-9.]*\).*/\1/p' <<<"$r")
  awk -v f="$first" -v l="$last" 'BEGIN { ok = (f > 5.9 && f < 6.6 && l < f); if (!ok) print "loss " f " -> " l " (want ~6.24 falling)"; exit !ok }'
done
# Refused by name, with the status of an error (nothing runs).
for bad in "--seq 0" "--docs 65" "--precision fp8" "--flavour 3B" "--nope"; do
  # shellcheck disable=SC2086
  if err=$("$bin" --device cpu --flavour debug --seq 64 $bad 2>&1); then
    echo "$bad: accepted"; exit 1
  fi
  word=${bad#--}; word=${word%% *}
  grep -q -- "$word\|3B" <<<"$err" || { echo "$bad: the error does not name it: $err"; exit 1; }
  echo "refused: $err"
done
