# Used for the "AdamW eps 1e-8" figures in bench/RESULTS.md and docs/parallelism.md.
# usage: python3 bench/parallel_eps_analysis.py W0.st PLAIN1.st LAYOUT1.st LR WEIGHT_DECAY EPS
# Compares a parallel run's weights after step 1 with the plain run's, AdamW eps 1e-8:
# which elements differ, and how big the (clipped) gradient of those elements was,
# recovered from the plain update: step 1 of AdamW moves w by
#   -lr * (u + wd * w0),  u = g / (|g| + eps)   (bias-corrected moments: m = g, v = g^2)
# so |g| = eps * |u| / (1 - |u|).
import json, struct, sys
from array import array

def load(path):
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    h = json.loads(data[8:8 + n])
    out = {}
    for name, info in h.items():
        if name == "__metadata__": continue
        a, b = info["data_offsets"]
        assert info["dtype"] == "F32", info
        arr = array("f"); arr.frombytes(data[8 + n + a:8 + n + b]); out[name] = arr
    return out

w0, p1, d1 = (load(p) for p in sys.argv[1:4])
lr, wd, eps = float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
nodecay = lambda name: "norm" in name  # norms have no weight decay
total = flipped = 0
worst_rel = 0.0
gs_diff, gs_all = [], []
for name in p1:
    if name == "__losses__": continue
    a, b, w = p1[name], d1[name], w0[name]
    scale = max(abs(x) for x in a)
    for i in range(len(a)):
        total += 1
        dec = 0.0 if nodecay(name) else wd * w[i]
        u = -(a[i] - w[i]) / lr - dec
        u = max(-1.0, min(1.0, u))
        g = eps * abs(u) / max(1e-12, 1 - abs(u))
        gs_all.append(g)
        rel = abs(a[i] - b[i]) / scale
        worst_rel = max(worst_rel, rel)
        if rel > 1e-5:
            flipped += 1
            gs_diff.append((g, name, i, a[i] - w[i], b[i] - w[i]))
gs_all.sort()
print(f"elements {total}, differing by > 1e-5 relative: {flipped} ({100.0 * flipped / total:.4f}%), worst {worst_rel:.3g}")
print(f"plain |g| percentiles: 1% {gs_all[len(gs_all)//100]:.3g}  50% {gs_all[len(gs_all)//2]:.3g}")
for g, name, i, da, db in sorted(gs_diff, reverse=True)[:8]:
    print(f"  |g|~{g:.3g} {name}[{i}] update plain {da:.3g} parallel {db:.3g}")
