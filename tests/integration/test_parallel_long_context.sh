#!/usr/bin/env bash
# A LONG_CONTEXT stage runs under a parallel layout from the recipe: `mpirun -np 2 llama3 run`
# with `parallel { dp_shard: 2 }` and with `cp: 2` on the long_context stage (sequence
# increments 64 -> 128 after a 32-token pretrain) gives the step losses, the short-context
# evals and the final metrics of the same recipe in one process (1e-5 relative). An
# increment length the layout cannot split (cp 2 needs a multiple of 4) is refused when the
# recipe is validated, before any stage runs, naming the stage, the field and the numbers.
set -euo pipefail
BUILD=${1:?build dir}
MPI_TIMEOUT=100
source "$(dirname "$0")/mpi_common.sh"
cat > "$OUT/lc.textproto" <<'R'
name: "lc"
seed: 1
stage { name: "data" kind: DATA data { vocab_size: 512 } }
stage {
  name: "pretrain"
  kind: PRETRAIN
  data_from: "data"
  model { flavour: "debug" }
  optimizer { lr: 1e-2 max_grad_norm: 1.0 }
  lr { warmup_tokens: 256 decay: CONSTANT }
  batch { seq_len: 32 batch_tokens: 512 micro_batch_tokens: 256 }
  total_tokens: 1024
}
stage {
  name: "long_context"
  kind: LONG_CONTEXT
  init_from: "pretrain"
  data_from: "data"
  optimizer { lr: 1e-3 max_grad_norm: 1.0 }
  batch { seq_len: 32 batch_tokens: 512 micro_batch_tokens: 128 }
  long_context {
    seq_lens: 64
    seq_lens: 128
    min_tokens_per_increment: 512
    check_every_tokens: 512
    max_tokens_per_increment: 1024
    short_loss_tolerance: 0.05
    niah_threshold: 0.8
  }
  eval { batches: 2 }
  parallel { dp_shard: 2 }
}
R
"$BIN" run "$OUT/lc.textproto" --out "$OUT/one" --set long_context.parallel.dp_shard=1 > "$OUT/one.log" 2>&1 \
  || { cat "$OUT/one.log"; exit 1; }
# The 2-rank runs start from the single-process run's data and pretrain stages.
for layout in dps cp; do
  mkdir -p "$OUT/$layout" && cp -r "$OUT/one/data" "$OUT/one/pretrain" "$OUT/$layout/"
  echo '{"finished": ["data", "pretrain"]}' > "$OUT/$layout/state.json"
done
"${MPI[@]}" -np 2 "$BIN" run "$OUT/lc.textproto" --out "$OUT/dps" --timeout 60 > "$OUT/dps.log" 2>&1 \
  || { cat "$OUT/dps.log"; exit 1; }
"${MPI[@]}" -np 2 "$BIN" run "$OUT/lc.textproto" --out "$OUT/cp" --timeout 60 --set long_context.parallel.dp_shard=1 \
  --set long_context.parallel.cp=2 > "$OUT/cp.log" 2>&1 || { cat "$OUT/cp.log"; exit 1; }
ls "$OUT/dps/long_context/checkpoint" | grep -q "rank-00001.safetensors"

python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
def metrics(run):
    by = {}
    for line in open(f"{out}/{run}/long_context/metrics.jsonl"):
        j = json.loads(line)
        for k, v in j.items():
            if "loss" in k or k == "seq_len":
                by[(k, j["step"])] = v
    return by
ref = metrics("one")
assert ("seq_len", 2) in ref and ref[("seq_len", 2)] == 128, ref  # both increments trained
for run in ("dps", "cp"):
    got = metrics(run)
    assert set(got) == set(ref), (run, sorted(ref), sorted(got))
    worst = max(abs(got[k] - ref[k]) / abs(ref[k]) for k in ref)
    print(f"{run}: {len(ref)} values (losses, evals, seq_len) max relative difference to one process {worst:.3g}")
    assert worst <= 1e-5, (run, worst)
    a = json.load(open(f"{out}/one/long_context/final.json"))
    b = json.load(open(f"{out}/{run}/long_context/final.json"))
    for k in ("eval_loss", "lc_64_short_loss", "lc_128_short_loss", "lc_128_tokens", "steps"):
        assert abs(a[k] - b[k]) <= 1e-5 * abs(a[k]), (run, k, a[k], b[k])
PY

# cp 2 cannot split an increment of 66 tokens (the stage's own seq_len 44 it can).
mkdir -p "$OUT/bad" && cp -r "$OUT/one/data" "$OUT/one/pretrain" "$OUT/bad/"
echo '{"finished": ["data", "pretrain"]}' > "$OUT/bad/state.json"
if "${MPI[@]}" -np 2 "$BIN" run "$OUT/lc.textproto" --out "$OUT/bad" --timeout 60 --set long_context.parallel.dp_shard=1 \
     --set long_context.parallel.cp=2 --set long_context.batch.seq_len=44 --set long_context.batch.batch_tokens=264 \
     --set long_context.batch.micro_batch_tokens=132 --set long_context.long_context.seq_lens[0]=66 \
     --set long_context.long_context.seq_lens[1]=132 > "$OUT/bad.log" 2>&1; then
  echo "FAIL: an increment of 66 tokens ran under cp 2"; exit 1
fi
grep -q "seq_len 66 is not divisible by 2 x cp = 4" "$OUT/bad.log" || { cat "$OUT/bad.log"; exit 1; }
echo "PASS bad increment: $(grep -o "stage .long_context. field.*" "$OUT/bad.log" | head -1)"
