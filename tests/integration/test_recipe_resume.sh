#!/usr/bin/env bash
# `llama3 run`: the tiny recipe on a small budget runs end to end; a second run SIGKILLed
# mid-stage (after the pretrain stage's first checkpoint) and rerun gives exactly the same
# final metrics (every stage's final.json, the post-training stages included) and the same per-step losses.
set -euo pipefail
BUILD=${1:?build dir}
SRC=${2:?source dir}
LLAMA3="$BUILD/llama3"
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

# A 2-layer, dim-64 model and a few thousand tokens per stage: the point is the mechanics.
SETS=(--set pretrain.model.dim=64 --set pretrain.model.n_layers=2 --set pretrain.model.n_heads=4
      --set pretrain.model.n_kv_heads=2
      --set pretrain.batch.batch_tokens=2048 --set pretrain.total_tokens=12288 --set pretrain.batch.ramp[0].at_tokens=4096
      --set pretrain.batch.ramp[0].batch_tokens=4096
      --set pretrain.lr.warmup_tokens=2048 --set pretrain.eval.every_tokens=4096 --set pretrain.checkpoint_every_steps=2
      --set pretrain.eval.niah.samples=2
      # pass-key documents: a one-step warm-up, answer-only loss, then one of each step's two
      # micro-batches (RecipeSource's task lane, whose position the resume must restore too)
      --set pretrain.batch.micro_batch_tokens=1024 --set pretrain.synthetic_niah.only_tokens=1024
      --set pretrain.synthetic_niah.answer_only=true --set pretrain.synthetic_niah.micro_batches=1
      --set long_context.batch.batch_tokens=2048 --set long_context.batch.micro_batch_tokens=1024
      --set long_context.long_context.synthetic_niah_micro_batches=1
      --set long_context.long_context.synthetic_niah_answer_only=true
      --set long_context.long_context.min_tokens_per_increment=2048
      --set long_context.long_context.check_every_tokens=2048
      --set long_context.long_context.max_tokens_per_increment=4096 --set long_context.eval.niah.samples=2
      --set long_context.checkpoint_every_steps=1
      --set anneal.batch.batch_tokens=2048 --set anneal.batch.micro_batch_tokens=2048
      --set anneal.total_tokens=6144 --set anneal.anneal.average_every_tokens=2048
      --set eval.eval.batches=2 --set eval.eval.niah.samples=2
      # post-training: a few steps each, few prompts
      --set post_data.post_data.sft_dialogs=32 --set post_data.post_data.prefs=32
      --set post_data.post_data.prompts=6 --set post_data.post_data.eval_prompts=6
      --set sft.sft.steps=3 --set r1_rm.reward_model.steps=3 --set r1_rs.rejection_sampling.k=2
      --set r1_sft.sft.steps=3 --set r1_dpo.dpo.steps=2 --set r2_rm.reward_model.steps=2
      --set r2_rs.rejection_sampling.k=2 --set r2_sft.sft.steps=3 --set r2_dpo.dpo.steps=2
      --set r1_rs.rejection_sampling.max_new_tokens=8 --set r2_rs.rejection_sampling.max_new_tokens=8
      --set r1_samples.rejection_sampling.k=2 --set r2_samples.rejection_sampling.k=2
      --set r1_samples.rejection_sampling.max_new_tokens=8 --set r2_samples.rejection_sampling.max_new_tokens=8
      --set sft.sft.max_new_tokens=8 --set r1_sft.sft.max_new_tokens=8 --set r2_sft.sft.max_new_tokens=8
      --set r1_dpo.dpo.max_new_tokens=8 --set r2_dpo.dpo.max_new_tokens=8
      --set r1_rm_b.reward_model.steps=2 --set r1_sft_b.sft.steps=2 --set r1_sft_b.sft.max_new_tokens=8
      --set r1_pairs.rejection_sampling.k=2 --set r2_pairs.rejection_sampling.k=2
      --set r1_pairs.rejection_sampling.max_new_tokens=8 --set r2_pairs.rejection_sampling.max_new_tokens=8
      --set r1_heldout.rejection_sampling.k=2 --set r2_heldout.rejection_sampling.k=2
      --set r1_heldout.rejection_sampling.max_new_tokens=8 --set r2_heldout.rejection_sampling.max_new_tokens=8
      --set r1_dpo_b.dpo.steps=2 --set r2_dpo_b.dpo.steps=2
      --set r1_dpo_b.dpo.max_new_tokens=8 --set r2_dpo_b.dpo.max_new_tokens=8
      --set r1_pairs.rejection_sampling.dialog_prompts=6 --set r2_pairs.rejection_sampling.dialog_prompts=6
      --set r1_samples.rejection_sampling.dialog_prompts=6 --set r2_samples.rejection_sampling.dialog_prompts=6)
STAGES=(data pretrain long_context anneal eval post_data sft r1_samples r1_heldout r1_rm r1_rm_b r1_rm_avg r1_rs r1_sft
        r1_sft_b r1_sft_avg r1_pairs r1_dpo r1_dpo_b r1_dpo_avg r2_samples r2_heldout r2_rm r2_rs r2_sft r2_pairs r2_dpo
        r2_dpo_b r2_dpo_avg)

start=$(date +%s)
"$LLAMA3" run "$SRC/recipes/tiny.textproto" --out "$OUT/a" "${SETS[@]}" > "$OUT/a.log" 2>&1 || { cat "$OUT/a.log"; exit 1; }
echo "uninterrupted run: $(( $(date +%s) - start )) s"
for s in "${STAGES[@]}"; do
  test -f "$OUT/a/$s/final.json" || { echo "FAIL: no $s/final.json"; exit 1; }
done
grep -q "unigram_entropy" "$OUT/a.log" || { echo "FAIL: no final table"; cat "$OUT/a.log"; exit 1; }
# stdout is not a terminal: the progress line comes as plain log lines (stage, step/total, loss,
# tok/s, % of GEMM peak, ETA; the first and last step of a stretch always print), never redrawn.
grep -qE "\] pretrain  step 1/4  loss [0-9.]+  lr [0-9.e+-]+  [0-9]+ tok/s  [0-9.]+% GEMM peak  ETA [0-9]+m[0-9]{2}s" \
  "$OUT/a.log" || { echo "FAIL: no plain progress line for pretrain step 1/4"; cat "$OUT/a.log"; exit 1; }
grep -q "\] pretrain  step 4/4  loss" "$OUT/a.log" || { echo "FAIL: no progress line for the last step"; exit 1; }
grep -q "\] long_context seq 256  step 1/2  loss" "$OUT/a.log" || { echo "FAIL: no long-context progress line"; cat "$OUT/a.log"; exit 1; }
if grep -q $'\r' "$OUT/a.log"; then echo "FAIL: carriage returns in a non-terminal log"; exit 1; fi

# Interrupted run: SIGKILL once the pretrain stage's first checkpoint exists.
"$LLAMA3" run "$SRC/recipes/tiny.textproto" --out "$OUT/b" "${SETS[@]}" > "$OUT/b1.log" 2>&1 &
pid=$!
for _ in $(seq 1 3000); do
  [ -f "$OUT/b/pretrain/checkpoint/checksums.json" ] && break
  kill -0 $pid 2>/dev/null || break
  sleep 0.1
done
kill -9 $pid || { echo "FAIL: the run ended before it could be killed"; cat "$OUT/b1.log"; exit 1; }
wait $pid || true
grep -q '"pretrain"' "$OUT/b/state.json" && { echo "FAIL: pretrain finished before the kill"; exit 1; }
echo "killed after step $(python3 -c "import json;print(json.load(open('$OUT/b/pretrain/checkpoint/trainer_state.json'))['step'])") of pretrain"

"$LLAMA3" run "$SRC/recipes/tiny.textproto" --out "$OUT/b" "${SETS[@]}" > "$OUT/b2.log" 2>&1 || { cat "$OUT/b2.log"; exit 1; }
grep -q "stage data (DATA): finished earlier, skipped" "$OUT/b2.log" || { echo "FAIL: data stage not skipped"; exit 1; }
grep -q "stage pretrain: resumed from" "$OUT/b2.log" || { echo "FAIL: pretrain did not resume"; cat "$OUT/b2.log"; exit 1; }

# A third invocation has nothing left to do.
"$LLAMA3" run "$SRC/recipes/tiny.textproto" --out "$OUT/b" "${SETS[@]}" > "$OUT/b3.log" 2>&1
test "$(grep -c 'finished earlier, skipped' "$OUT/b3.log")" = ${#STAGES[@]} || { echo "FAIL: rerun did not skip all stages"; exit 1; }

# --only reruns one stage from scratch (same result: stages are deterministic).
cp "$OUT/b/eval/final.json" "$OUT/eval_before.json"
"$LLAMA3" run "$SRC/recipes/tiny.textproto" --out "$OUT/b" "${SETS[@]}" --only eval > "$OUT/b4.log" 2>&1
grep -q "stage eval (EVAL): starting" "$OUT/b4.log" || { echo "FAIL: --only eval did not rerun eval"; exit 1; }
cmp "$OUT/b/eval/final.json" "$OUT/eval_before.json" || { echo "FAIL: --only eval changed its metrics"; exit 1; }

python3 - "$OUT/a" "$OUT/b" "$OUT/b4.log" "${STAGES[@]}" <<'PY'
import json, re, sys
a, b, log, stages = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
for s in stages:
    fa = json.load(open(f"{a}/{s}/final.json")); fb = json.load(open(f"{b}/{s}/final.json"))
    assert fa == fb, f"{s}: final metrics differ after resume:\n{fa}\n{fb}"
def losses(d, s):
    out = []
    for line in open(f"{d}/{s}/metrics.jsonl"):
        j = json.loads(line)
        out.append((j["step"], j.get("loss"), j.get("eval_loss"), j.get("lr"), j.get("tokens")))
    return out
for s in ["pretrain", "long_context", "anneal", "sft", "r1_rm", "r1_dpo", "r2_sft"]:
    la, lb = losses(a, s), losses(b, s)
    assert la == lb, f"{s}: metrics.jsonl differs:\n{la}\n{lb}"
# Averages of post-trained models are evaluated like their inputs (docs/recipes.md).
ra, sa = json.load(open(f"{a}/r1_rm_avg/final.json")), json.load(open(f"{a}/r1_sft_avg/final.json"))
da = json.load(open(f"{a}/r1_dpo_avg/final.json"))
# The RM average's held-out set: the 6 generated pairs plus its inputs' held-out on-policy pairs.
ho = sum(1 for _ in open(f"{a}/r1_heldout/verified_prefs.jsonl"))
assert ra["average_of"] == "REWARD_MODEL" and ra["eval_pairs_generated"] == 6 and ra["eval_pairs"] == 6 + ho, (ra, ho)
assert 0 <= ra["eval_accuracy"] <= 1, ra
assert sa["average_of"] == "SFT" and sa["eval_prompts"] == 6 and 0 <= sa["eval_exact_match"] <= 1, sa
# A DPO average is judged like a DPO run: against the SFT model it started from, by its RM.
assert da["average_of"] == "DPO" and da["eval_pairs"] == 6 and da["eval_prompts"] == 6, da
assert da["win_rate_wins"] + da["win_rate_ties"] + da["win_rate_losses"] == 6 and 0 <= da["eval_accuracy"] <= 1, da
assert da["start_exact_match"] == sa["eval_exact_match"], (da, sa)
st = json.load(open(f"{b}/state.json"))
assert sorted(st["finished"]) == sorted(stages), st  # --only eval moved eval last
# The rerun's time replaces the discarded run's (it is not added to it).
secs = float(re.search(r"stage eval \(EVAL\): finished in ([0-9.]+) s", open(log).read()).group(1))
assert abs(st["seconds"]["eval"] - secs) < 0.051, (st["seconds"]["eval"], secs)
an = json.load(open(f"{a}/anneal/metrics.jsonl".replace("metrics.jsonl", "final.json")))
lrs = [json.loads(l)["lr"] for l in open(f"{a}/anneal/metrics.jsonl") if '"loss"' in l]
assert lrs[-1] == 0.0 and all(x > y for x, y in zip(lrs, lrs[1:])), lrs
print("resume ok: identical final metrics", json.load(open(f"{b}/eval/final.json")))
PY
echo "test_recipe_resume: ok ($(( $(date +%s) - start )) s)"
