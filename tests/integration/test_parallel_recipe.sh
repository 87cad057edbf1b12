#!/usr/bin/env bash
# `mpirun -np 4 llama3 run` of a small recipe whose PRETRAIN stage has `parallel { tp: 2
# dp_shard: 2 }` and whose ANNEAL stage (Polyak average of 2 snapshots) has `parallel { pp: 2
# dp_shard: 2 }`: the data and eval stages run on rank 0, the training stages on all four
# ranks with distributed checkpoints. Step and eval losses and final metrics equal the same
# recipe run in one process (1e-5 relative), the eval stage loads the annealed model
# single-process, and the pretrain stage, reopened with more tokens in one plain process,
# resumes from its 4-rank distributed checkpoint.
set -euo pipefail
BUILD=${1:?build dir}
MPI_TIMEOUT=150
source "$(dirname "$0")/mpi_common.sh"
cat > "$OUT/par.textproto" <<'R'
name: "par"
seed: 1
stage { name: "data" kind: DATA data { vocab_size: 512 } }
stage {
  name: "pretrain"
  kind: PRETRAIN
  data_from: "data"
  model { flavour: "debug" }
  optimizer { lr: 1e-2 max_grad_norm: 1.0 }
  lr { warmup_tokens: 512 decay: CONSTANT }
  # 512-token steps: per rank 128-token micro-batches, dp 2 -> 2 micro-batches of 8 rows.
  batch { seq_len: 32 batch_tokens: 512 micro_batch_tokens: 128 }
  total_tokens: 2560
  parallel { tp: 2 dp_shard: 2 }
  eval { every_tokens: 1024 batches: 2 }
  checkpoint_every_steps: 2
}
stage {
  name: "anneal"
  kind: ANNEAL
  init_from: "pretrain"
  data_from: "data"
  optimizer { lr: 5e-3 }
  batch { seq_len: 32 batch_tokens: 512 micro_batch_tokens: 128 }
  total_tokens: 1536
  parallel { pp: 2 dp_shard: 2 }
  anneal { average_every_tokens: 512 average_last: 2 }
  eval { batches: 2 }
}
stage { name: "eval" kind: EVAL init_from: "anneal" data_from: "data" eval { seq_len: 32 batches: 2 } }
R
PLAIN=(--set pretrain.parallel.tp=1 --set pretrain.parallel.dp_shard=1 --set anneal.parallel.pp=1
       --set anneal.parallel.dp_shard=1)

"${MPI[@]}" -np 4 "$BIN" run "$OUT/par.textproto" --out "$OUT/par" --timeout 120 > "$OUT/par.log" 2>&1 \
  || { cat "$OUT/par.log"; exit 1; }
"$BIN" run "$OUT/par.textproto" --out "$OUT/one" "${PLAIN[@]}" > "$OUT/one.log" 2>&1 || { cat "$OUT/one.log"; exit 1; }
ls "$OUT/par/pretrain/checkpoint" | grep -q "rank-00000.safetensors"
test -f "$OUT/par/eval/final.json"

python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
def metrics(run, stage):
    by, lines = {}, 0
    for line in open(f"{out}/{run}/{stage}/metrics.jsonl"):
        j = json.loads(line)
        lines += 1
        for k in ("loss", "eval_loss"):
            if k in j:
                by[(k, j["step"])] = j[k]
    return by, lines
for stage, steps in (("pretrain", 5), ("anneal", 3)):
    (ref, n1), (got, n4) = metrics("one", stage), metrics("par", stage)
    assert set(ref) == set(got) and n1 == n4, (sorted(ref), sorted(got))  # rank 0 alone wrote
    assert len([k for k in ref if k[0] == "loss"]) == steps, ref
    worst = max(abs(got[k] - ref[k]) / abs(ref[k]) for k in ref)
    print(f"{stage}: {len(ref)} losses, max relative difference to one process {worst:.3g}")
    assert worst <= 1e-5, worst
for stage in ("pretrain", "anneal"):
    a = json.load(open(f"{out}/one/{stage}/final.json"))
    b = json.load(open(f"{out}/par/{stage}/final.json"))
    for k in ("eval_loss", "eval_loss_last", "averaged_checkpoints", "tokens", "steps"):
        if k in a:
            assert abs(a[k] - b[k]) <= 1e-5 * abs(a[k]), (stage, k, a[k], b[k])
assert json.load(open(f"{out}/par/anneal/final.json"))["averaged_checkpoints"] == 2
e1 = json.load(open(f"{out}/one/eval/final.json"))["eval_loss"]
e4 = json.load(open(f"{out}/par/eval/final.json"))["eval_loss"]
print(f"eval stage (single process, model of the 4-rank stage): {e4:.6f} vs {e1:.6f}")
assert abs(e4 - e1) / e1 <= 1e-5
PY

# Reopen pretrain with one more step, in one plain process: it resumes from the 4-rank
# distributed checkpoint (step 5) instead of starting over.
python3 - "$OUT/par/state.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
s["finished"] = ["data"]  # pretrain runs again (resuming); anneal and eval follow
json.dump(s, open(sys.argv[1], "w"))
PY
"$BIN" run "$OUT/par.textproto" --out "$OUT/par" "${PLAIN[@]}" --set pretrain.total_tokens=3072 \
  > "$OUT/more.log" 2>&1 || { cat "$OUT/more.log"; exit 1; }
grep -q "resumed from .* at step 5" "$OUT/more.log" || { cat "$OUT/more.log"; exit 1; }
python3 -c "import json,sys; f=json.load(open(sys.argv[1])); assert f['steps']==6, f" "$OUT/par/pretrain/final.json"

# A layout that needs another world size fails before any stage runs.
if "${MPI[@]}" -np 2 "$BIN" run "$OUT/par.textproto" --out "$OUT/bad" > "$OUT/bad.log" 2>&1; then
  echo "FAIL: a 4-rank stage ran on 2 ranks"; exit 1
fi
grep -q "needs 4 ranks; this run has 2" "$OUT/bad.log"
test ! -d "$OUT/bad/data"
echo "PASS parallel PRETRAIN (tp2 x dp_shard2) and ANNEAL (pp2 x dp_shard2) stages under mpirun -np 4 equal one process; resume single-process"
