#!/usr/bin/env python3
"""Static figures of the CUDA kernels, for a machine without a GPU: compiles a .cu file of
runtime/cuda for sm_90 alone (nvcc -Xptxas -v) and prints, per kernel, the registers and the
spill bytes ptxas reports; with cuobjdump, also the hot loops' instruction mix from the SASS
(every loop with a backward branch that contains MMAs, or the largest loop otherwise) and the
calls inside loops (a 64-bit division by a runtime value compiles to a call of a ~70-instruction
routine, "div64"; the slow paths of float division, "fdiv", are taken only for special values).

Not a speed figure: what it shows (registers, spills, ldmatrix per MMA, division calls in a
loop) is what a GPU run then times. Figures of record are in docs/cuda.md.

  python3 bench/kernel_stats.py [runtime/cuda/attention_mma.cu] [--filter SUBSTRING]
      [--cuobjdump PATH] [--hot-path]

--hot-path compiles with LLAMA3_HOT_PATH defined: the block-uniform conditions marked
LLAMA3_HOT(...) in the source take the values of the training step's common case (mask-free
tiles, no documents, whole dQ rows), so the loop shown is what that case executes; without
it every path of the loop is counted, branches never taken in the step included.

cuobjdump is not part of the CUDA toolkit image here; `pip download --no-deps
nvidia-cuda-cuobjdump` gets a wheel whose nvidia/cu13/bin/cuobjdump works (unzip it).
"""
import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ["HMMA", "LDSM", "STSM", "STS", "LDS", "LDL", "STL", "BAR", "REDG", "MUFU", "FFMA", "FMUL",
        "F2FP", "LDGSTS", "IMAD", "ISETP"]


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    return out.stdout.split("\n")


def short(name):
    m = re.search(r"(\w+(?:<[^(]*>)?)\(", name)
    return m.group(1) if m else name[:80]


def ptxas_report(log):
    """{kernel: (registers, spill stores, spill loads)} from nvcc -Xptxas -v output."""
    res, cur, spill = {}, None, (0, 0)
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            cur = m.group(1)
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur:
            spill = (int(m.group(1)), int(m.group(2)))
        m = re.search(r"Used (\d+) registers", line)
        if m and cur:
            res[cur] = (int(m.group(1)),) + spill
            cur, spill = None, (0, 0)
    return res


def sass_functions(text):
    """[(mangled name, [(address, opcode, operands)])] from cuobjdump -sass."""
    out = []
    for part in re.split(r"\n\s*Function : ", text)[1:]:
        name = part.split("\n", 1)[0].strip()
        ins = []
        for line in part.split("\n"):
            m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*)", line)
            if m:
                ins.append((int(m.group(1), 16), m.group(3), m.group(4)))
        out.append((name, ins))
    return out


def loops(ins):
    """(start index, end index) of every loop closed by a backward branch."""
    at = {a: i for i, (a, _, _) in enumerate(ins)}
    res = []
    for i, (a, op, rest) in enumerate(ins):
        m = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if m and int(m.group(1), 16) < a and int(m.group(1), 16) in at:
            res.append((at[int(m.group(1), 16)], i))
    return res


def call_kind(ins, target):
    at = {a: i for i, (a, _, _) in enumerate(ins)}
    i = at.get(target)
    if i is None:
        return "?"
    ops = [o for _, o, _ in ins[i:i + 40]]
    if any("I2F.U64" in o for o in ops):
        return "div64"
    if any(o.startswith("MUFU.RCP") for o in ops):
        return "fdiv"
    return "other"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("source", nargs="?", default="runtime/cuda/attention_mma.cu")
    p.add_argument("--filter", default="", help="only kernels whose demangled name contains this")
    p.add_argument("--cuobjdump", default=os.environ.get("CUOBJDUMP", shutil.which("cuobjdump") or ""))
    p.add_argument("--hot-path", action="store_true",
                   help="compile with LLAMA3_HOT_PATH (the step's common case only)")
    a = p.parse_args()
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    with tempfile.TemporaryDirectory() as tmp:
        obj = os.path.join(tmp, "k.o")
        cmd = [nvcc, "-O3", "-DNDEBUG", "--generate-code=arch=compute_90,code=sm_90",
               "--expt-relaxed-constexpr", "-std=c++20", "-I" + ROOT, "-c",
               os.path.join(ROOT, a.source), "-o", obj, "-Xptxas", "-v"]
        if a.hot_path:
            cmd.insert(1, "-DLLAMA3_HOT_PATH")
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.stderr.write(r.stderr[-4000:])
            return 1
        regs = ptxas_report(r.stderr)
        names = sorted(regs)
        pretty = dict(zip(names, demangle(names)))
        sass = []
        if a.cuobjdump and os.path.exists(a.cuobjdump):
            s = subprocess.run([a.cuobjdump, "-sass", obj], capture_output=True, text=True)
            sass = sass_functions(s.stdout)
        else:
            print("(no cuobjdump: registers and spills only; see the header for how to get it)")
    for n in names:
        nm = short(pretty[n])
        if a.filter not in pretty[n]:
            continue
        r, st, ld = regs[n]
        print(f"{nm}\n  ptxas sm_90: {r} registers, spill stores {st} B, spill loads {ld} B")
        for mangled, ins in sass:
            if mangled != n:
                continue
            lp = loops(ins)
            mma = [(s0, e) for s0, e in lp if any(o.startswith("HMMA") for _, o, _ in ins[s0:e + 1])]
            shown = mma or sorted(lp, key=lambda x: x[1] - x[0])[-1:]
            for s0, e in shown:
                c = collections.Counter(o.split(".")[0] for _, o, _ in ins[s0:e + 1])
                mix = " ".join(f"{k} {c[k]}" for k in KEYS if c.get(k))
                kind = "the step's common case" if a.hot_path else "every path"
                print(f"  loop of {e - s0 + 1} instructions (static, {kind}): {mix}")
            calls = collections.Counter()
            for s0, e in lp:
                for _, o, rest in ins[s0:e + 1]:
                    if o.startswith("CALL"):
                        calls[call_kind(ins, int(re.search(r"0x([0-9a-f]+)", rest).group(1), 16))] += 1
            if calls:
                print("  calls inside loops: " + ", ".join(f"{k} {v}" for k, v in sorted(calls.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
