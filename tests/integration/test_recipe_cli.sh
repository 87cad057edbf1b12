#!/usr/bin/env bash
# `llama3 run` front end: every shipped recipe passes --dry-run (the paper's recipes print
# their layouts); bad recipes and --set paths fail before any work with file:line and field;
# multi-rank layouts are refused for real runs in this build.
set -euo pipefail
BUILD=${1:?build dir}
SRC=${2:?source dir}
LLAMA3="$BUILD/llama3"
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

for r in tiny llama3_8b llama3_70b llama3_405b; do
  "$LLAMA3" run "$SRC/recipes/$r.textproto" --dry-run > "$OUT/$r.plan" || { echo "FAIL: $r dry run"; exit 1; }
done
cat "$OUT/llama3_405b.plan"
grep -q "dp_shard 64 x tp 8 x pp 16 x cp 1 x dp_replicate 1 = 8192 ranks" "$OUT/llama3_405b.plan"
grep -q "6 increments to 131072" "$OUT/llama3_405b.plan"
# The paper's 405B pre-training budget is 3.8e25 FLOPs; ours integrates the ramp's seq lengths.
python3 - "$OUT/llama3_405b.plan" <<'PY'
import sys
for line in open(sys.argv[1]):
    f = line.split()
    if f and f[0] == "pretrain":
        flops = float(f[4]); assert 3.5e25 < flops < 4.2e25, flops; print("405B pretrain FLOPs", flops)
PY

expect_fail() {  # expect_fail PATTERN llama3-args...
  local pat=$1; shift
  if "$LLAMA3" "$@" > "$OUT/out.txt" 2> "$OUT/err.txt"; then echo "FAIL: accepted: $*"; exit 1; fi
  grep -qF -- "$pat" "$OUT/err.txt" || { echo "FAIL: '$pat' not in:"; cat "$OUT/err.txt"; exit 1; }
  test ! -e "$OUT/run" || { echo "FAIL: work was done before the error"; exit 1; }
}
sed 's/total_tokens: 589824/total_tokens: 589824 totl: 1/' "$SRC/recipes/tiny.textproto" > "$OUT/bad1.textproto"
line=$(grep -n "totl" "$OUT/bad1.textproto" | cut -d: -f1)
expect_fail "bad1.textproto:$line:" run "$OUT/bad1.textproto" --out "$OUT/run"
sed 's/^    batch_tokens: 1024$/    batch_tokens: 1000/' "$SRC/recipes/tiny.textproto" > "$OUT/bad2.textproto"
line=$(grep -n "batch_tokens: 1000" "$OUT/bad2.textproto" | head -1 | cut -d: -f1)
expect_fail "bad2.textproto:$line:" run "$OUT/bad2.textproto" --out "$OUT/run"
expect_fail "field batch.batch_tokens: batch of 1000 tokens is not a multiple of seq_len 128" run "$OUT/bad2.textproto" --out "$OUT/run"
sed 's/init_from: "pretrain"/init_from: "anneal"/' "$SRC/recipes/tiny.textproto" > "$OUT/bad3.textproto"
expect_fail "stage 'long_context' field init_from: 'anneal' is a later stage" run "$OUT/bad3.textproto" --out "$OUT/run"
expect_fail "--set pretrain.optimizer.lrr: Optimizer has no field 'lrr' (fields: lr," run "$SRC/recipes/tiny.textproto" --out "$OUT/run" --set pretrain.optimizer.lrr=1
expect_fail "needs 8192 ranks" run "$SRC/recipes/llama3_405b.textproto" --out "$OUT/run"
expect_fail "field kind: VISION_ENCODER is not implemented in this build" run "$SRC/recipes/tiny.textproto" --out "$OUT/run" --set eval.kind=VISION_ENCODER
# The default's post-training stages are planned (two rounds after the bootstrap SFT, with
# averaged reward models and SFT policies in round 1, DPO policies in both, and the held-out
# annotations that the reward models are evaluated on).
for s in post_data sft r1_samples r1_heldout r1_rm r1_rm_b r1_rm_avg r1_rs r1_sft r1_sft_b r1_sft_avg r1_pairs r1_dpo \
         r1_dpo_b r1_dpo_avg r2_samples r2_heldout r2_rm r2_rs r2_sft r2_pairs r2_dpo r2_dpo_b r2_dpo_avg; do
  grep -qE "^$s +(POST_DATA|SFT|REWARD_MODEL|REJECTION_SAMPLING|DPO|AVERAGE) " "$OUT/tiny.plan" || { echo "FAIL: $s not planned"; cat "$OUT/tiny.plan"; exit 1; }
done
grep -q "round 2: 400 prompts x K=16 samples of r1_dpo_avg, scored by r2_rm" "$OUT/tiny.plan" &&
  grep -q "round 2: 960 SFT-dialog prompts x K=8 samples of r1_dpo_avg, labelled by the verifier only" "$OUT/tiny.plan" &&
  grep -q "round 2: 200 held-out prompts x K=8 samples of r1_dpo_avg, labelled by the verifier only" "$OUT/tiny.plan" || { echo "FAIL: RS plan row"; cat "$OUT/tiny.plan"; exit 1; }
# A post stage's inputs are checked like any other: file:line and field.
sed 's/reward_model_from: "r2_rm"/reward_model_from: "r2_sft"/' "$SRC/recipes/tiny.textproto" > "$OUT/bad4.textproto"
line=$(grep -n 'reward_model_from: "r2_sft"' "$OUT/bad4.textproto" | head -1 | cut -d: -f1)
expect_fail "bad4.textproto:$line:3: stage 'r2_rs' field reward_model_from: 'r2_sft' is a later stage" run "$OUT/bad4.textproto" --out "$OUT/run"
echo "test_recipe_cli: ok"
