#!/usr/bin/env bash
# Observability end to end: `llama3 train` writes metrics.jsonl, TensorBoard events and
# final.json; TensorBoard's own reader (the `tensorboard` package, no TensorFlow) must read
# back every tag, step and value, with valid TFRecord CRCs; `llama3 plot` writes PNGs that
# decode; `llama3 report` tabulates a finished stage (final.json) and a stage in progress
# (last metrics.jsonl values).
set -euo pipefail
BUILD=${1:?build dir}
LLAMA3="$BUILD/llama3"
PY=/usr/bin/python3
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
# One OpenMP thread: ctest runs tests two at a time on 2 cores, and spinning threads fight.
export OMP_NUM_THREADS=1

"$LLAMA3" data demo --out "$OUT/demo" > "$OUT/demo.log"
RUN="$OUT/run"
"$LLAMA3" train --data "$OUT/demo" --flavour debug --steps 12 --batch 4 --seq 64 --eval-every 4 \
  --eval-batches 2 --out "$RUN/pretrain" --stage pretrain | tee "$OUT/train.log"
echo '{"finished": ["pretrain"]}' > "$RUN/state.json"
# A stage in progress, as the recipe runner would leave it: no final.json, a resumed step
# logged twice, and eval/needle metrics.
mkdir -p "$RUN/long_context"
cat > "$RUN/long_context/metrics.jsonl" <<'JSONL'
{"stage":"long_context","step":1,"tokens":512,"time":1.0,"loss":4.5,"lr":0.001,"grad_norm":1.0,"tokens_per_s":500,"pct_gemm_peak":10}
{"stage":"long_context","step":2,"tokens":1024,"time":2.0,"loss":4.25,"lr":0.001,"grad_norm":0.9,"tokens_per_s":510,"pct_gemm_peak":11}
{"stage":"long_context","step":2,"tokens":1024,"time":2.5,"loss":4.125,"lr":0.001,"grad_norm":0.9,"tokens_per_s":505,"pct_gemm_peak":11}
{"stage":"long_context","step":2,"eval_loss":4.75,"niah_accuracy":0.5}
JSONL

"$PY" - "$RUN" <<'PY'
import glob, json, math, os, struct, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

stage = os.path.join(sys.argv[1], "pretrain")
lines = [json.loads(l) for l in open(os.path.join(stage, "metrics.jsonl"))]
assert all(l["stage"] == "pretrain" for l in lines)
want = {}  # tag -> {step: value}
for l in lines:
    for k, v in l.items():
        if k not in ("stage", "step") and isinstance(v, (int, float)):
            want.setdefault(k, {})[l["step"]] = v
for k in ("loss", "lr", "grad_norm", "tokens_per_s", "pct_gemm_peak", "tokens", "time", "eval_loss"):
    assert k in want, f"metrics.jsonl lacks {k}"
assert sorted(want["loss"]) == list(range(1, 13)), want["loss"]
assert sorted(want["eval_loss"]) == [4, 8, 12], want["eval_loss"]

files = glob.glob(os.path.join(stage, "tb", "events.out.tfevents.*"))
assert len(files) == 1, files
# Every record's framing and CRCs, checked independently of the reader.
data = open(files[0], "rb").read()
pos = n = 0
while pos < len(data):
    (length,) = struct.unpack_from("<Q", data, pos)
    (hcrc,) = struct.unpack_from("<I", data, pos + 8)
    assert hcrc == masked_crc32c(data[pos:pos + 8]), f"record {n}: bad length crc"
    payload = data[pos + 12:pos + 12 + length]
    (dcrc,) = struct.unpack_from("<I", data, pos + 12 + length)
    assert dcrc == masked_crc32c(payload), f"record {n}: bad data crc"
    pos += 16 + length
    n += 1
assert pos == len(data)

events = list(EventFileLoader(files[0]).Load())
assert events[0].file_version == "brain.Event:2", events[0]
assert len(events) == n == 1 + 12 + 3, (len(events), n)

acc = EventAccumulator(os.path.join(stage, "tb"), size_guidance={"scalars": 0})
acc.Reload()
tags = set(acc.Tags()["scalars"])
assert tags == set(want), (tags, set(want))
for tag, by_step in want.items():
    got = {e.step: e.value for e in acc.Scalars(tag)}
    assert got.keys() == by_step.keys(), (tag, got.keys(), by_step.keys())
    for s, v in by_step.items():
        assert math.isclose(got[s], v, rel_tol=1e-6, abs_tol=1e-30), (tag, s, got[s], v)  # float32 in the event
    walls = [e.wall_time for e in acc.Scalars(tag)]
    assert walls == sorted(walls) and abs(walls[-1] - os.path.getmtime(files[0])) < 600
print(f"tensorboard: {len(tags)} tags, {n} records, all values match metrics.jsonl")
PY

"$LLAMA3" plot "$RUN" | tee "$OUT/plot.log"
"$PY" - "$RUN/plots" <<'PY'
import os, struct, sys, zlib
d = sys.argv[1]
need = ["loss.png", "pretrain_loss.png", "pretrain_lr.png", "pretrain_throughput.png", "pretrain_gemm_peak.png",
        "long_context_loss.png", "long_context_eval.png"]
for name in need:
    b = open(os.path.join(d, name), "rb").read()
    assert b[:8] == b"\x89PNG\r\n\x1a\n", name
    pos, idat, w = 8, b"", 0
    while pos < len(b):
        (ln,) = struct.unpack(">I", b[pos:pos + 4]); typ = b[pos + 4:pos + 8]; body = b[pos + 8:pos + 8 + ln]
        (crc,) = struct.unpack(">I", b[pos + 8 + ln:pos + 12 + ln])
        assert crc == zlib.crc32(typ + body), (name, typ)
        if typ == b"IHDR": w, h = struct.unpack(">II", body[:8])
        if typ == b"IDAT": idat += body
        pos += 12 + ln
    raw = zlib.decompress(idat)
    assert len(raw) == h * (1 + 3 * w), name
    colours = {raw[i:i + 3] for r in range(h) for i in range(r * (1 + 3 * w) + 1, (r + 1) * (1 + 3 * w), 3 * 7)}
    assert len(colours) >= 4, (name, len(colours))  # background, grid, text, at least one series
print("plots ok:", ", ".join(need))
PY

"$LLAMA3" report "$RUN" > "$OUT/report.log"
cat "$RUN/report.md"
grep -q "^| pretrain | finished | final.json |" "$RUN/report.md" || { echo "FAIL: pretrain row"; exit 1; }
# The in-progress stage takes the last value of each field: loss 4.125 (step 2 logged twice).
"$PY" - "$RUN/report.md" <<'PY'
import sys
rows = [l.strip().strip("|").split("|") for l in open(sys.argv[1]) if l.startswith("|")]
head = [c.strip() for c in rows[0]]
lc = [c.strip() for c in next(r for r in rows if r[0].strip() == "long_context")]
row = dict(zip(head, lc))
assert row["status"] == "in progress" and row["source"].startswith("metrics.jsonl"), row
assert row["loss"] == "4.125" and row["eval_loss"] == "4.75" and row["niah_accuracy"] == "0.5", row
print("report ok")
PY
# Resuming the stage appends to metrics.jsonl and opens a second event file; TensorBoard
# merges both and the plot/report readers see the continued steps.
"$LLAMA3" train --data "$OUT/demo" --flavour debug --steps 16 --batch 4 --seq 64 --eval-every 4 \
  --eval-batches 2 --out "$RUN/pretrain" --stage pretrain --resume > "$OUT/resume.log"
grep -q "resumed from .* at step 12" "$OUT/resume.log" || { cat "$OUT/resume.log"; echo "FAIL: no resume"; exit 1; }
"$PY" - "$RUN/pretrain" <<'PY'
import glob, json, os, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
d = sys.argv[1]
assert len(glob.glob(os.path.join(d, "tb", "events.out.tfevents.*"))) == 2
acc = EventAccumulator(os.path.join(d, "tb"), size_guidance={"scalars": 0})
acc.Reload()
assert [e.step for e in acc.Scalars("loss")] == list(range(1, 17)), [e.step for e in acc.Scalars("loss")]
steps = [json.loads(l)["step"] for l in open(os.path.join(d, "metrics.jsonl"))]
assert max(steps) == 16 and steps.count(12) == 2, steps  # step 12: train line + eval line
times = {json.loads(l)["step"]: json.loads(l)["time"] for l in open(os.path.join(d, "metrics.jsonl")) if "time" in l}
assert times[13] > times[12] and all(times[s] < times[s + 1] for s in range(1, 16)), times  # time continues
print("resume ok: metrics.jsonl and TensorBoard continue to step 16")
PY
"$LLAMA3" report "$RUN" > /dev/null
grep -q "^| pretrain | finished | final.json | .* | 4096 |" "$RUN/report.md" || { cat "$RUN/report.md"; echo "FAIL: report after resume"; exit 1; }
echo "test_observability: ok"
