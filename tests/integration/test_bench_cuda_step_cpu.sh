#!/usr/bin/env bash
# Keeps bench_cuda_step from rotting on CPU-only CI: the same training-step composition
# (ops forward/backward + AdamW, bf16 mixed precision) on the CPU backend, tiny config;
# the loss must start near ln(vocab) and fall. Usage: test_bench_cuda_step_cpu.sh BUILD_DIR
set -euo pipefail
bin=$1/bench/bench_cuda_step
if [[ ! -x $bin ]]; then
  echo "bench_cuda_step not built (LLAMA3_BENCH=OFF): nothing to check"
  exit 0
fi
out=$("$bin" --device cpu --seq 64 --layers 2 --dim 64 --heads 4 --kv-heads 2 --ffn 96 \
  --vocab 101 --steps 3 --warmup 1)
echo "$out"
first=$(sed -n 's/^step 1 loss \([0-9.]*\).*/\1/p' <<<"$out")
last=$(sed -n 's/^RESULT .* loss=\([0-9.]*\).*/\1/p' <<<"$out")
awk -v f="$first" -v l="$last" 'BEGIN { ok = (f > 4.3 && f < 4.9 && l < f); if (!ok) print "loss " f " -> " l " (want ~4.62 falling)"; exit !ok }'

# The A/B switches scripts/gpu-check.sh uses must parse and run here too. Separate gradient-sum
# adds give the same printed loss (the in-place sums change no rounding on CPU: bitwise in
# Golden.InPlaceGradientSumsEqualSeparateAdds); 16-row cross-entropy chunks sum dW in another
# order, so within 1e-3.
args=(--device cpu --seq 64 --layers 2 --dim 64 --heads 4 --kv-heads 2 --ffn 96 --vocab 101
  --steps 3 --warmup 1)
sep=$("$bin" "${args[@]}" --separate-sums | sed -n 's/^RESULT .* loss=\([0-9.]*\).*/\1/p')
[[ $sep == "$last" ]] || { echo "--separate-sums: loss $sep, in-place sums $last"; exit 1; }
chunk=$("$bin" "${args[@]}" --ce-chunk 16 | sed -n 's/^RESULT .* loss=\([0-9.]*\).*/\1/p')
awk -v a="$chunk" -v b="$last" 'BEGIN { d = a - b; if (d < 0) d = -d; ok = a != "" && d < 1e-3;
  if (!ok) print "--ce-chunk 16: loss " a ", one chunk " b; exit !ok }'
# --accum 2 repeats the batch as two micro-batches seeded with 1/2: every gradient is exactly
# half (a power of two commutes with rounding) and two halves sum exactly, so the same losses.
acc=$("$bin" "${args[@]}" --accum 2 | sed -n 's/^RESULT .* accum=2 .* loss=\([0-9.]*\).*/\1/p')
[[ $acc == "$last" ]] || { echo "--accum 2: loss $acc, one micro-batch $last"; exit 1; }
echo "switches ok: separate sums $sep, 16-row chunks $chunk, 2 micro-batches $acc"
# --optimizer-only times both paths of the optimizer (on CPU the same default loop) and prints
# one RESULT line with every field.
opt=$("$bin" --device cpu --layers 2 --dim 64 --heads 4 --kv-heads 2 --ffn 96 --vocab 101 \
  --optimizer-only --steps 2)
echo "$opt"
grep -Eq '^RESULT optimizer params=[0-9]+ tensors=21 adamw_multi_ms=[0-9.]+ .*norm_ratio=[0-9.]+ norm_multi_gbs=[0-9]+$' <<<"$opt" ||
  { echo "--optimizer-only: no complete RESULT line"; exit 1; }
