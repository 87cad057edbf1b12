#!/usr/bin/env bash
# Post-training end to end at toy scale: `llama3 post data` builds the verifiable tasks, one
# round of RM -> rejection sampling -> SFT -> DPO runs from a fresh debug model, every stage
# writes its checkpoint and a final.json with the metrics; generate/chat/average work on the
# result; bad input is skipped and counted by default, or fails with file:line.
set -euo pipefail
BUILD=${1:?build dir}
SRC=${2:?source dir}
L="$BUILD/llama3"
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
start=$(date +%s)

"$L" post data --out "$OUT/data" --train 96 --prefs 96 --prompts 6 --eval 8 > /dev/null
for f in sft.jsonl prefs.jsonl prompts.jsonl eval.jsonl eval_prefs.jsonl tokenizer.model; do
  test -s "$OUT/data/$f" || { echo "FAIL: post data wrote no $f"; exit 1; }
done
cat > "$OUT/rounds.json" <<JSON
{"data_dir": "$OUT/data", "out_dir": "$OUT/run", "flavour": "debug", "rounds": 1, "seq": 128,
 "batch": 4, "k": 3, "rm_steps": 8, "sft_steps": 12, "dpo_steps": 4}
JSON
"$L" post rounds "$OUT/rounds.json" > "$OUT/rounds.log" 2>&1 || { cat "$OUT/rounds.log"; exit 1; }

/usr/bin/python3 - "$OUT/run" <<'PY'
import json, os, sys
run = sys.argv[1]
m = json.load(open(os.path.join(run, "final.json")))
for k in ["round1.rm.eval_accuracy", "round1.rs.acceptance", "round1.rs.best_of_k_gain", "round1.sft.eval_exact_match",
          "round1.dpo.eval_accuracy", "round1.dpo.win_rate_vs_start"]:
    assert k in m, f"missing metric {k}: {sorted(m)}"
for k in ["round1.rm.eval_accuracy", "round1.rs.acceptance", "round1.sft.eval_exact_match", "round1.dpo.eval_accuracy",
          "round1.dpo.win_rate_vs_start"]:
    assert 0.0 <= m[k] <= 1.0, (k, m[k])
assert m["round1.rs.best_of_k_gain"] >= 0.0, m["round1.rs.best_of_k_gain"]  # max >= mean
assert m["round1.rs.prompts"] == 6
for stage in ["rm", "sft", "dpo"]:
    d = os.path.join(run, "round1", stage)
    for f in ["model.safetensors", "config.json", "tokenizer.model", "final.json"]:
        assert os.path.exists(os.path.join(d, f)), (d, f)
ref = json.load(open(os.path.join(run, "round1", "dpo", "reference_logps.json")))
assert len(ref["train"]) > 0 and all(x < 0 for b in ref["train"] for x in b), "reference log-probs must be < 0"
rows = [json.loads(l) for l in open(os.path.join(run, "round1", "rs", "sft.jsonl"))]
assert len(rows) == m["round1.rs.kept"] and all("score" in r and r["messages"][-1]["role"] == "assistant" for r in rows)
print("rounds ok:", {k: round(v, 3) for k, v in m.items() if isinstance(v, float)})
PY

M="$OUT/run/round1/dpo"
"$L" generate --model "$M" --prompt "What is 2 + 3?" --greedy --max-new 8 > "$OUT/gen.txt"
test "$(wc -l < "$OUT/gen.txt")" -ge 1 || { echo "FAIL: generate printed nothing"; exit 1; }
printf 'What is 2 + 3?\nWrite the word apple in uppercase.\n' | "$L" chat --model "$M" --greedy --max-new 6 > "$OUT/chat.txt" 2> /dev/null
test "$(wc -l < "$OUT/chat.txt")" -ge 2 || { echo "FAIL: chat did not answer both lines"; cat "$OUT/chat.txt"; exit 1; }

# Averaging a checkpoint with itself returns it.
"$L" post average --model "$M" --model "$M" --out "$OUT/avg" > /dev/null
/usr/bin/python3 - "$SRC" "$M" "$OUT/avg" <<'PY'
import sys
sys.path.insert(0, sys.argv[1] + "/tests/reference")
import numpy as np, safetensors_io
a = safetensors_io.load(sys.argv[2] + "/model.safetensors")
b = safetensors_io.load(sys.argv[3] + "/model.safetensors")
assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), "average of identical checkpoints changed weights"
PY

# Bad input: skipped and counted by default, or an error naming file:line.
head -3 "$OUT/data/sft.jsonl" > "$OUT/bad.jsonl"
echo '{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}' >> "$OUT/bad.jsonl"
echo '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}' >> "$OUT/bad.jsonl"
"$L" post sft --model "$M" --data "$OUT/bad.jsonl" --out "$OUT/sft_bad" --steps 1 > /dev/null 2>&1
/usr/bin/python3 -c "
import json,sys; m=json.load(open('$OUT/sft_bad/final.json'))
assert m['skipped_unknown_role']==1 and m['skipped_empty_response']==1 and m['dialogs']==3, m"
if "$L" post sft --model "$M" --data "$OUT/bad.jsonl" --out "$OUT/sft_bad2" --steps 1 --bad-input fail 2> "$OUT/err.txt" > /dev/null; then
  echo "FAIL: --bad-input fail accepted an unknown role"; exit 1
fi
grep -q "bad.jsonl:4: unknown role 'robot'" "$OUT/err.txt" || { echo "FAIL: error lacks file:line"; cat "$OUT/err.txt"; exit 1; }
echo "test_post_pipeline: ok in $(( $(date +%s) - start )) s"
