#!/usr/bin/env bash
# Scaling laws end to end: a tiny IsoFLOPs sweep trains every (budget, model) pair for
# C / flops_per_token tokens and records held-out eval and math losses; re-running resumes
# without training again; `scaling fit` recovers a known power law from a synthetic sweep
# exactly and writes fit.json + PNGs; on the real tiny sweep it either fits or says which
# budgets the grid fails to bracket.
set -euo pipefail
BUILD=${1:?build dir}
LLAMA3="$BUILD/llama3"
PY=/usr/bin/python3
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
export OMP_NUM_THREADS=1

"$LLAMA3" data demo --out "$OUT/demo" --vocab-size 512 > "$OUT/demo.log"
cat > "$OUT/cfg.json" <<JSON
{"data": "$OUT/demo", "budgets": [3e9, 1e10], "seq_len": 32, "batch": 4, "lr": 1e-2, "eval_batches": 4,
 "models": [{"dim": 8, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1},
            {"dim": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1},
            {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1}]}
JSON
start=$(date +%s)
"$LLAMA3" scaling sweep "$OUT/cfg.json" --out "$OUT/sweep" | tee "$OUT/sweep.log"
echo "sweep took $(( $(date +%s) - start )) s"
"$PY" - "$OUT/sweep/sweep.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
runs = d["runs"]
assert len(runs) == 6, len(runs)
for r in runs:
    step_tokens = 4 * 32
    # whole steps of batch x seq tokens, as close to C / flops_per_token as possible
    assert abs(r["tokens"] - r["budget"] / r["flops_per_token"]) <= step_tokens / 2 + 1e-6, r
    assert abs(r["flops"] - r["tokens"] * r["flops_per_token"]) < 1e-6 * r["flops"], r
    assert r["tokens"] == r["steps"] * step_tokens, r
    assert 0 < r["eval_loss"] < 10 and 0 < r["math_loss"] < 10, r
print("sweep.json ok:", [(r["budget"], r["dim"], round(r["eval_loss"], 3)) for r in runs])
PY
# Same config again: nothing left to train.
"$LLAMA3" scaling sweep "$OUT/cfg.json" --out "$OUT/sweep" > "$OUT/again.log" 2>&1
grep -q "resuming: 6 runs already" "$OUT/again.log" || { cat "$OUT/again.log"; echo "FAIL: no resume"; exit 1; }
if grep -q "C=" "$OUT/again.log"; then echo "FAIL: resumed sweep trained again"; exit 1; fi

# Synthetic sweep with D*(C) = 0.29 C^0.53 (the paper's coefficients) and parabolic losses.
"$PY" - "$OUT/synth.json" <<'PY'
import json, math, sys
runs = []
for c in (1e18, 1e19, 1e20, 1e21):
    xs = math.log10(0.29 * c ** 0.53)
    for dx in (-0.5, -0.2, 0.1, 0.4):
        runs.append({"budget": c, "tokens": 10 ** (xs + dx), "eval_loss": 50 * c ** -0.05 + 0.5 * dx * dx,
                     "math_loss": 40 * c ** -0.06 + dx * dx})
json.dump({"runs": runs}, open(sys.argv[1], "w"))
PY
"$LLAMA3" scaling fit "$OUT/synth.json" --target 1e24 --out "$OUT/fit_synth" | tee "$OUT/fit.log"
"$PY" - "$OUT/fit_synth" <<'PY'
import json, math, os, sys
d = sys.argv[1]
f = json.load(open(os.path.join(d, "fit.json")))
t = f["tokens_vs_compute"]
assert abs(t["alpha"] - 0.53) < 1e-9 and abs(t["A"] - 0.29) < 1e-6, t
p = f["prediction"]
assert abs(p["tokens"] - 0.29 * 1e24 ** 0.53) < 1e-6 * p["tokens"], p
assert abs(p["eval_loss"] - 50 * 1e24 ** -0.05) < 1e-8 and abs(p["math_nll"] - 40 * 1e24 ** -0.06) < 1e-8, p
for name in ("isoflops.png", "compute_optimal.png"):
    assert open(os.path.join(d, name), "rb").read(8) == b"\x89PNG\r\n\x1a\n", name
print("synthetic fit ok: alpha", t["alpha"], "A", t["A"])
PY

# The real tiny sweep: a fit, or an error naming the budgets the grid does not bracket.
if "$LLAMA3" scaling fit "$OUT/sweep/sweep.json" > "$OUT/real.log" 2>&1; then
  cat "$OUT/real.log"; test -s "$OUT/sweep/fit.json"
else
  cat "$OUT/real.log"; grep -q "not convex\|usable compute budgets" "$OUT/real.log" || { echo "FAIL: unexpected error"; exit 1; }
fi
echo "test_scaling: ok"
