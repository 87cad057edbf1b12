#!/usr/bin/env bash
# `llama3 data demo` builds the default corpus from the machine's files: the curation report
# must show the real duplicates and e-mail addresses it found, every source must get a
# shard, and the tokenize command must reject bad input with the file and line.
set -euo pipefail
BUILD=${1:?build dir}
LLAMA3="$BUILD/llama3"
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

start=$(date +%s)
"$LLAMA3" data demo --out "$OUT/demo" | tee "$OUT/log.txt"
echo "demo took $(( $(date +%s) - start )) s"

python3 - "$OUT/demo" <<'PY'
import json, os, sys
d = sys.argv[1]
rep = json.load(open(os.path.join(d, "curate_report.json")))
st = {s["name"]: s for s in rep["stages"]}
emails = st["pii"]["found"].get("email", 0)
dups = sum(st["minhash"]["dropped_by"].values())
lines = st["line_dedup"]["found"].get("lines_removed", 0)
print(f"report: {emails} e-mails redacted, {dups} duplicate documents, {lines} duplicate lines")
assert emails > 0, "no e-mail addresses found"
assert dups > 0, "no duplicate documents found"
assert lines > 0, "no duplicate lines found"
assert rep["docs_out"] > 0 and rep["docs_out"] < rep["docs_in"]
man = json.load(open(os.path.join(d, "manifest.json")))
names = [s["name"] for s in man["sources"]]
assert names == ["general", "math", "code", "multilingual"], names
for s in man["sources"]:
    assert s["tokens"] > 0 and os.path.getsize(s["shards"][0]) > 40, s
assert man["eval"]["tokens"] > 0
assert abs(sum(s["weight"] for s in man["sources"]) - 1.0) < 1e-9
print("manifest ok:", {s["name"]: s["tokens"] for s in man["sources"]}, "eval", man["eval"]["tokens"])
PY

# Bad input to `data tokenize`: invalid JSONL names file and line; empty input is an error.
printf '{"text": "fine"}\n{"text": broken}\n' > "$OUT/bad.jsonl"
if "$LLAMA3" data tokenize --vocab "$OUT/demo/tokenizer.model" --in "$OUT/bad.jsonl" --out "$OUT/bad.shard" 2> "$OUT/err.txt"; then
  echo "FAIL: tokenize accepted invalid JSONL"; exit 1
fi
grep -q "bad.jsonl:2" "$OUT/err.txt" || { echo "FAIL: error does not name bad.jsonl:2:"; cat "$OUT/err.txt"; exit 1; }
: > "$OUT/empty.jsonl"
if "$LLAMA3" data tokenize --vocab "$OUT/demo/tokenizer.model" --in "$OUT/empty.jsonl" --out "$OUT/e.shard" 2> "$OUT/err.txt"; then
  echo "FAIL: tokenize accepted an empty input"; exit 1
fi
grep -q "empty.jsonl: empty source" "$OUT/err.txt" || { cat "$OUT/err.txt"; exit 1; }
# Re-tokenising the same text gives a byte-identical shard.
"$LLAMA3" data tokenize --vocab "$OUT/demo/tokenizer.model" --in "$OUT/demo/text/math.jsonl" --out "$OUT/m.shard"
cmp -s "$OUT/m.shard" "$OUT/demo/shards/math.shard" || { echo "FAIL: tokenize is not deterministic"; exit 1; }
echo "test_data_demo: ok"
