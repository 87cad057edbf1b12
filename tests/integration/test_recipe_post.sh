#!/usr/bin/env bash
# Post-training stage kinds in the recipe runner at toy scale (fresh debug model, own BPE):
# POST_DATA -> SFT -> sampling labelled by the verifier only -> REWARD_MODEL on those pairs ->
# REJECTION_SAMPLING -> SFT on samples -> DPO judged by the RM -> AVERAGE of two post-trained
# models. Checks the plan, every stage's outputs and
# metrics (metrics.jsonl lines, final.json values in range), the per-round report table,
# that a rerun skips finished stages, that a stage inserted before the samplers leaves their
# draws unchanged, and that bad post-training fields fail before any work with file:line and
# the field.
set -euo pipefail
BUILD=${1:?build dir}
SRC=${2:?source dir}
L="$BUILD/llama3"
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
start=$(date +%s)

cat > "$OUT/post.textproto" <<'R'
name: "post_toy"
seed: 3
stage { name: "post_data" kind: POST_DATA post_data { sft_dialogs: 160 prefs: 160 prompts: 12 eval_prompts: 12 bpe_vocab: 400 } }
stage {
  name: "sft0" kind: SFT data_from: "post_data" model { flavour: "debug" }
  optimizer { lr: 3e-3 } sft { steps: 30 batch: 4 seq_len: 96 }
}
stage {
  name: "r1_samples" kind: REJECTION_SAMPLING round: 1 data_from: "post_data" init_from: "sft0"
  rejection_sampling { k: 4 max_new_tokens: 12 }
}
stage {
  name: "r1_heldout" kind: REJECTION_SAMPLING round: 1 data_from: "post_data" init_from: "sft0"
  rejection_sampling { k: 4 max_new_tokens: 12 held_out: true }
}
stage {
  name: "r1_rm" kind: REWARD_MODEL round: 1 data_from: "post_data" init_from: "sft0" samples_from: "r1_samples"
  common_eval_samples_from: "r1_heldout" optimizer { lr: 1e-3 } reward_model { steps: 12 batch: 4 }
}
stage {
  name: "r1_rs" kind: REJECTION_SAMPLING round: 1 data_from: "post_data" init_from: "sft0"
  reward_model_from: "r1_rm" rejection_sampling { k: 4 max_new_tokens: 12 rank_wrong_pairs: true }
}
stage {
  name: "r1_sft" kind: SFT round: 1 data_from: "post_data" init_from: "sft0" samples_from: "r1_rs"
  optimizer { lr: 1e-3 } sft { steps: 10 batch: 4 seq_len: 96 }
}
stage {
  name: "r1_dpo" kind: DPO round: 1 data_from: "post_data" init_from: "r1_sft" samples_from: "r1_rs"
  reward_model_from: "r1_rm" optimizer { lr: 2e-4 } dpo { steps: 6 batch: 4 max_new_tokens: 12 win_rate_samples: 2 }
}
stage {  # round 2's RM, compared with round 1's pair by pair on the common held-out set
  name: "r2_rm" kind: REWARD_MODEL round: 2 data_from: "post_data" init_from: "r1_rm" samples_from: "r1_samples"
  common_eval_samples_from: "r1_heldout" reward_model_from: "r1_rm" optimizer { lr: 1e-3 } reward_model { steps: 4 batch: 4 }
}
stage { name: "avg" kind: AVERAGE average { stages: "r1_sft" stages: "r1_dpo" } }
R

"$L" run "$OUT/post.textproto" --dry-run > "$OUT/plan.txt" || { cat "$OUT/plan.txt"; exit 1; }
for s in post_data sft0 r1_samples r1_heldout r1_rm r1_rs r1_sft r1_dpo r2_rm avg; do
  grep -q "^$s " "$OUT/plan.txt" || { echo "FAIL: $s not planned"; cat "$OUT/plan.txt"; exit 1; }
done
grep -q "K=4 samples of sft0, labelled by the verifier only" "$OUT/plan.txt" &&
  grep -q "K=4 samples of sft0, scored by r1_rm" "$OUT/plan.txt" || { echo "FAIL: RS plan row"; cat "$OUT/plan.txt"; exit 1; }

"$L" run "$OUT/post.textproto" --out "$OUT/run" > "$OUT/run.log" 2>&1 || { tail -40 "$OUT/run.log"; exit 1; }

/usr/bin/python3 - "$OUT/run" <<'PY'
import json, os, sys
run = sys.argv[1]
fin = lambda s: json.load(open(os.path.join(run, s, "final.json")))
lines = lambda s: [json.loads(l) for l in open(os.path.join(run, s, "metrics.jsonl")) if l.strip()]
st = json.load(open(os.path.join(run, "state.json")))
assert st["finished"] == ["post_data", "sft0", "r1_samples", "r1_heldout", "r1_rm", "r1_rs", "r1_sft", "r1_dpo", "r2_rm", "avg"], st
for f in ["sft.jsonl", "prefs.jsonl", "prompts.jsonl", "eval.jsonl", "eval_prefs.jsonl", "tokenizer.model"]:
    assert os.path.getsize(os.path.join(run, "post_data", f)) > 0, f
for s, steps in [("sft0", 30), ("r1_rm", 12), ("r1_sft", 10), ("r1_dpo", 6)]:
    for f in ["model.safetensors", "config.json", "tokenizer.model"]:
        assert os.path.exists(os.path.join(run, s, "model", f)), (s, f)
    ms = lines(s)
    train = [m for m in ms if "lr" in m]
    assert [m["step"] for m in train] == list(range(1, steps + 1)), (s, [m["step"] for m in train])
    assert all(m["loss"] == m["loss"] and m["loss"] >= 0 for m in train), s  # finite, non-negative
    assert all(m["stage"] == s for m in ms)
sft0, rm, rs, sft1, dpo = fin("sft0"), fin("r1_rm"), fin("r1_rs"), fin("r1_sft"), fin("r1_dpo")
l = lines("sft0")
assert l[-1]["step"] == 30 and "eval_exact_match" in l[-1], l[-1]  # the stage's eval as the last line
assert l[0]["loss"] > l[-2]["loss"], ("SFT loss did not fall", l[0]["loss"], l[-2]["loss"])
for k, v in [("sft0.eval_exact_match", sft0["eval_exact_match"]), ("rm.eval_accuracy", rm["eval_accuracy"]),
             ("rs.acceptance", rs["acceptance"]), ("rs.sample_correct_rate", rs["sample_correct_rate"]),
             ("sft.eval_exact_match", sft1["eval_exact_match"]), ("dpo.eval_accuracy", dpo["eval_accuracy"]),
             ("dpo.win_rate_vs_start", dpo["win_rate_vs_start"])]:
    assert 0.0 <= v <= 1.0, (k, v)
assert rm["eval_pairs"] == 12 and rm["round"] == 1 and "round" not in sft0
assert rs["prompts"] == 12 and rs["k"] == 4 and rs["best_of_k_gain"] >= 0, rs
# Sampling without a reward model: the verifier's labels only, no RM-score statistics.
ann = fin("r1_samples")
assert ann["prompts"] == 12 and "best_of_k_gain" not in ann and "best_correct_rate" not in ann, ann
assert 0.0 <= ann["sample_correct_rate"] <= ann["any_correct_rate"] <= 1.0, ann
vp = [json.loads(x) for x in open(os.path.join(run, "r1_samples", "verified_prefs.jsonl"))]
assert len(vp) == ann["verified_pairs"], (len(vp), ann)
assert all(p["chosen"] != p["rejected"] for p in vp)
# The RM trains on the synthetic pairs plus those (prefs.jsonl ranks up to 3 responses: 1-3 pairs each).
assert rm["train_pairs"] >= 160 + len(vp) - rm["skipped"], (rm, len(vp))
assert 0.0 <= rs["best_correct_rate"] <= 1.0 and "verified_best_of_k_gain" in rs, rs
kept = [json.loads(x) for x in open(os.path.join(run, "r1_rs", "sft.jsonl"))]
assert len(kept) == rs["kept"], (len(kept), rs["kept"])
# The RS samples join the SFT data: 160 dialogs + the kept samples (some may be skipped as too long).
assert sft1["dialogs"] + sft1["skipped"] == 160 + rs["kept"], (sft1, rs["kept"])
assert os.path.exists(os.path.join(run, "r1_dpo", "model", "reference_logps.json"))
# Every sample with its score and verdict; the RM-ranked pairs only where no sample verifies,
# the RM's best answer against each distinct one it scores lower.
smp = [json.loads(x) for x in open(os.path.join(run, "r1_rs", "samples.jsonl"))]
assert len(smp) == rs["prompts"] and all(len(r["samples"]) == 4 for r in smp), len(smp)
assert all(r["samples"][r["best"]]["score"] == max(x["score"] for x in r["samples"]) for r in smp)
assert sum(r["samples"][r["best"]]["correct"] for r in smp) == round(rs["best_correct_rate"] * rs["prompts"]), rs
rp = [json.loads(x) for x in open(os.path.join(run, "r1_rs", "ranked_prefs.jsonl"))]
assert len(rp) == rs["ranked_wrong_pairs"] > 0, (len(rp), rs)
def ranks(p, r):  # p is one of r's RM-ranked pairs
    ok = not any(x["correct"] for x in r["samples"])
    top = max(x["score"] for x in r["samples"] if x["response"].strip())
    return ok and p["scores"][0] == top > p["scores"][1] and p["chosen"] in [x["response"] for x in r["samples"]]
for p in rp:
    assert any(ranks(p, r) for r in smp if r["prompt"] == p["prompt"]), p
assert dpo["train_pairs"] + dpo["skipped"] == 160 + rs["verified_pairs"] + rs["ranked_wrong_pairs"], (dpo, rs)
assert fin("avg")["inputs"] == 2
# Every judged pair of the win rate, per prompt; the counts in final.json follow from them.
wr = [json.loads(x) for x in open(os.path.join(run, "r1_dpo", "win_rate.jsonl"))]
assert len(wr) == dpo["eval_prompts"], (len(wr), dpo)
for key, o in [("win_rate_wins", "win"), ("win_rate_ties", "tie"), ("win_rate_losses", "loss")]:
    assert sum(r["outcome"] == o for r in wr) == dpo[key], (key, dpo)
    assert all((r["score"] > r["start_score"]) == (r["outcome"] == "win") for r in wr)
one = [r for r in wr if r["correct"] != r["start_correct"] and r["score"] != r["start_score"]]
assert sum((r["score"] > r["start_score"]) == r["correct"] for r in one) == dpo["judge_agrees_with_verifier"], dpo
assert len(one) == dpo["judge_agrees_with_verifier"] + dpo["judge_disagrees_with_verifier"], dpo
assert sum(r["correct"] and not r["start_correct"] for r in wr) == dpo["exact_match_fixed"], dpo
# The sampled win rate: 2 draws of each policy per prompt, every draw judged once.
assert dpo["win_rate_sampled_k"] == 2 and 0.0 <= dpo["win_rate_sampled"] <= 1.0, dpo
assert dpo["win_rate_sampled_wins"] + dpo["win_rate_sampled_ties"] + dpo["win_rate_sampled_losses"] == 2 * dpo["eval_prompts"], dpo
assert abs(dpo["win_rate_sampled"] - (dpo["win_rate_sampled_wins"] + 0.5 * dpo["win_rate_sampled_ties"]) / (2 * dpo["eval_prompts"])) < 1e-9, dpo
# The common held-out set: the 12 generated pairs plus round 1's held-out on-policy pairs; round 2's
# RM scores round 1's RM on the same pairs, so its compared accuracy is round 1's own figure.
ho = fin("r1_heldout")
rm2 = fin("r2_rm")
for f in (rm, rm2):
    assert f["eval_pairs_common"] == 12 + ho["verified_pairs"], (f, ho)
assert "common_fixed" not in rm and abs(rm2["compared_eval_accuracy_common"] - rm["eval_accuracy_common"]) < 1e-12, (rm, rm2)
n = rm2["eval_pairs_common"]
assert abs(rm2["eval_accuracy_common"] - rm["eval_accuracy_common"] - (rm2["common_fixed"] - rm2["common_broken"]) / n) < 1e-9, rm2
# Every held-out pair an RM stage scored, with both scores: the figures follow from them.
ep = [json.loads(x) for x in open(os.path.join(run, "r2_rm", "eval_pairs.jsonl"))]
gen = [r for r in ep if r["set"] == "generated"]
own = [r for r in ep if r["set"] == "on_policy"]
common = gen + [r for r in ep if r["set"] == "common_on_policy"]
assert len(gen) + len(own) == rm2["eval_pairs"] and len(common) == n, (len(gen), len(own), len(common), rm2)
assert all(r["correct"] == (r["better_score"] > r["worse_score"]) for r in ep)
assert abs(sum(r["correct"] for r in gen + own) / rm2["eval_pairs"] - rm2["eval_accuracy"]) < 1e-9, rm2
assert sum(r["correct"] and not r["compared_correct"] for r in common) == rm2["common_fixed"], rm2
assert sum(r["compared_correct"] and not r["correct"] for r in common) == rm2["common_broken"], rm2
print("post stages ok: sft0 EM", sft0["eval_exact_match"], "rm acc", rm["eval_accuracy"], "rs acc", rs["acceptance"],
      "sft EM", sft1["eval_exact_match"], "dpo EM", dpo["eval_exact_match"], "win", dpo["win_rate_vs_start"])
PY

"$L" report "$OUT/run" > "$OUT/report.txt"
grep -q "## Post-training rounds" "$OUT/report.txt" || { echo "FAIL: no rounds table"; cat "$OUT/report.txt"; exit 1; }
grep -q "^| 1 | " "$OUT/report.txt" || { echo "FAIL: no round 1 row"; cat "$OUT/report.txt"; exit 1; }
grep -q "^| - | .*sft0" "$OUT/report.txt" || { echo "FAIL: no row for the untagged SFT"; cat "$OUT/report.txt"; exit 1; }
# Round 2's RM gain over round 1's on the common set, with the pairs fixed / broken.
grep -qE "^\| 2 \| .* \([0-9]+/[0-9]+\) \|" "$OUT/report.txt" || { echo "FAIL: no paired RM gain in round 2"; cat "$OUT/report.txt"; exit 1; }

# A rerun skips every finished stage.
"$L" run "$OUT/post.textproto" --out "$OUT/run" > "$OUT/rerun.log" 2>&1
test "$(grep -c "finished earlier, skipped" "$OUT/rerun.log")" = 10 || { cat "$OUT/rerun.log"; exit 1; }

# A sampler's draws depend on its stage's name, not its position: with an extra sampling stage
# inserted before them, the samplers after it draw exactly the same responses as above.
/usr/bin/python3 - "$OUT/post.textproto" "$OUT/moved.textproto" <<'PY'
import sys
s = open(sys.argv[1]).read()
extra = ('stage {\n  name: "extra" kind: REJECTION_SAMPLING round: 1 data_from: "post_data" init_from: "sft0"\n'
         '  rejection_sampling { k: 2 max_new_tokens: 4 }\n}\n')
at = s.index('stage {\n  name: "r1_samples"')
open(sys.argv[2], "w").write(s[:at] + extra + s[at:])
PY
"$L" run "$OUT/moved.textproto" --out "$OUT/moved" > "$OUT/moved.log" 2>&1 || { tail -20 "$OUT/moved.log"; exit 1; }
for f in r1_samples/sft.jsonl r1_heldout/sft.jsonl r1_rs/sft.jsonl r1_rs/prefs.jsonl; do
  test -s "$OUT/run/$f" || { echo "FAIL: $f is empty"; exit 1; }
  cmp -s "$OUT/run/$f" "$OUT/moved/$f" || { echo "FAIL: $f differs once a stage is inserted before it"; exit 1; }
done

# Validation: bad post-training fields fail before any work, naming file:line and the field.
expect_fail() {  # expect_fail PATTERN FILE
  rm -rf "$OUT/bad_run"
  if "$L" run "$2" --out "$OUT/bad_run" > "$OUT/out.txt" 2> "$OUT/err.txt"; then echo "FAIL: accepted $2"; exit 1; fi
  grep -qF -- "$1" "$OUT/err.txt" || { echo "FAIL: '$1' not in:"; cat "$OUT/err.txt"; exit 1; }
  test ! -e "$OUT/bad_run/post_data" || { echo "FAIL: work was done before the error"; exit 1; }
}
bad() {  # bad N SED-EXPR: writes bad_N.textproto, the toy recipe edited
  sed "$2" "$OUT/post.textproto" > "$OUT/bad_$1.textproto"
}
bad 1 's/init_from: "sft0" samples_from: "r1_rs"/init_from: "sft0" reward_model_from: "r1_rm" samples_from: "r1_rs"/'
line=$(grep -n 'reward_model_from: "r1_rm" samples_from' "$OUT/bad_1.textproto" | cut -d: -f1)
expect_fail "bad_1.textproto:$line:" "$OUT/bad_1.textproto"
expect_fail "stage 'r1_sft' field reward_model_from: a SFT stage uses no reward model" "$OUT/bad_1.textproto"
bad 2 's/init_from: "sft0" samples_from: "r1_rs"/init_from: "sft0" samples_from: "nope"/'
line=$(grep -n 'samples_from: "nope"' "$OUT/bad_2.textproto" | cut -d: -f1)
expect_fail "bad_2.textproto:$line:" "$OUT/bad_2.textproto"
expect_fail "field samples_from[0]: no stage named 'nope' before this one" "$OUT/bad_2.textproto"
bad 3 's/reward_model_from: "r1_rm" optimizer/reward_model_from: "sft0" optimizer/'
expect_fail "field reward_model_from: stage 'sft0' is a SFT stage, not REWARD_MODEL" "$OUT/bad_3.textproto"
bad 4 's/init_from: "sft0" samples_from: "r1_rs"/init_from: "r1_dpo" samples_from: "r1_rs"/'
expect_fail "field init_from: 'r1_dpo' is a later stage" "$OUT/bad_4.textproto"
bad 5 's/reward_model { steps: 12 batch: 4 }/reward_model { steps: 12 batch: 4 } dpo { beta: 0.1 }/'
expect_fail "stage 'r1_rm' field dpo: only DPO stages take it" "$OUT/bad_5.textproto"
bad 6 's/data_from: "post_data" model { flavour: "debug" }/data_from: "post_data"/'
expect_fail "stage 'sft0' field init_from: a SFT stage starts from init_from (an earlier model) or a fresh model.flavour" "$OUT/bad_6.textproto"
bad 7 's/optimizer { lr: 2e-4 } dpo/dpo/'
expect_fail "stage 'r1_dpo' field optimizer.lr: must be > 0" "$OUT/bad_7.textproto"
bad 8 's/kind: REWARD_MODEL round: 1 data_from: "post_data"/kind: REWARD_MODEL round: 1 data_from: "sft0"/'
expect_fail "stage 'r1_rm' field data_from: stage 'sft0' is a SFT stage, not POST_DATA" "$OUT/bad_8.textproto"
bad 9 's/rejection_sampling { k: 4 max_new_tokens: 12 }/rejection_sampling { k: 4 top_p: 1.5 }/'
expect_fail "field rejection_sampling.top_p: 1.5 must lie in [0, 1]" "$OUT/bad_9.textproto"
bad 10 's/rejection_sampling { k: 4 max_new_tokens: 12 }/rejection_sampling { k: 4 rank_wrong_pairs: true }/'
expect_fail "stage 'r1_samples' field rejection_sampling.rank_wrong_pairs: needs reward_model_from" "$OUT/bad_10.textproto"

echo "test_recipe_post: ok in $(( $(date +%s) - start )) s"
