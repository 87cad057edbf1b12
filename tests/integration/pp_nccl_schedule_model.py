#!/usr/bin/env python3
"""A model of the pipeline schedule's point-to-point batches (text/model/parallelize.cpp,
run_step) under NCCL's semantics, over many more layouts than the MPI runs can afford.

Each rank's schedule is its list of operations (forward / backward of a model chunk on a
micro-batch: 1F1B or Megatron's interleaved order, the same formulas as run_step) cut into
units; before each unit one batch carries the previous unit's sends and this unit's receives.
NCCL semantics modelled: a batch completes only once every peer has reached (posted) the batch
holding the matching transfer, and transfers between two ranks match in issue order (no
tags), so each rank's sends to a peer must come in the order the peer receives them.

Checks, for pp 2..8, V 1..4, micro-batches 1..16 (multiples of pp when V > 1), training and
evaluation: the units run_step uses (interleaved steady state: forward + backward in one unit)
never deadlock and never mismatch; and, as a control that the model can fail, one unit per
operation deadlocks for interleaved schedules with more micro-batches than stages.
Exit status: the number of failed checks.
"""
import sys


def units(S, s, V, M, train, pair_steady):
    total = M * V
    fwd_k = lambda n: (n // S) % V
    bwd_k = lambda n: V - 1 - (n // S) % V
    mb_of = lambda n: (n // (S * V)) * S + n % S
    out = []
    if not train:
        return [[(True, fwd_k(n), mb_of(n))] for n in range(total)]
    w = min(total, S - s - 1 if V == 1 else 2 * (S - s - 1) + (V - 1) * S)
    out += [[(True, fwd_k(n), mb_of(n))] for n in range(w)]
    for n in range(total - w):
        f, b = (True, fwd_k(w + n), mb_of(w + n)), (False, bwd_k(n), mb_of(n))
        out += [[f, b]] if pair_steady else [[f], [b]]
    out += [[(False, bwd_k(n), mb_of(n))] for n in range(total - w, total)]
    return out


def batches(S, s, V, M, train, pair_steady):
    us = units(S, s, V, M, train, pair_steady)
    last, nxt, prv = S * V - 1, (s + 1) % S, (s - 1) % S

    def recv(op):
        f, k, i = op
        st = k * S + s
        if (st == 0) if f else (st == last):
            return None
        return ('r', prv if f else nxt, (st, i, 0 if f else 1))

    def send(op):
        f, k, i = op
        st = k * S + s
        if f and st != last:
            return ('s', nxt, (st + 1, i, 0))
        if not f and st != 0:
            return ('s', prv, (st - 1, i, 1))
        return None

    out = []
    for u in range(len(us) + 1):
        b = [x for x in map(send, us[u - 1]) if x] if u > 0 else []
        b += [x for x in map(recv, us[u]) if x] if u < len(us) else []
        if b:
            out.append(b)
    return out


def check(S, V, M, train, pair_steady):
    R = [batches(S, s, V, M, train, pair_steady) for s in range(S)]
    for a in range(S):
        for b in range(S):
            sends = [o[2] for bt in R[a] for o in bt if o[0] == 's' and o[1] == b]
            recvs = [o[2] for bt in R[b] for o in bt if o[0] == 'r' and o[1] == a]
            if sends != recvs:
                return 'order mismatch %d -> %d' % (a, b)
    where = {(r, o[0], o[2]): i for r in range(S) for i, bt in enumerate(R[r]) for o in bt}
    pos = [0] * S
    while any(pos[r] < len(R[r]) for r in range(S)):
        moved = False
        for r in range(S):
            if pos[r] < len(R[r]) and all(
                    pos[o[1]] >= where[(o[1], 'r' if o[0] == 's' else 's', o[2])] for o in R[r][pos[r]]):
                pos[r] += 1
                moved = True
        if not moved:
            return 'deadlock at batches %s' % pos
    return 'ok'


fails = checked = 0
control_deadlocks = 0
for S in (2, 3, 4, 5, 8):
    for V in (1, 2, 3, 4):
        for M in range(1, 17):
            if V > 1 and M % S:
                continue
            for train in (True, False):
                checked += 1
                r = check(S, V, M, train, pair_steady=V > 1)
                if r != 'ok':
                    fails += 1
                    print('FAIL pp %d V %d M %d %s: %s' % (S, V, M, 'train' if train else 'eval', r))
                if V > 1 and M > S and train and check(S, V, M, train, pair_steady=False) != 'ok':
                    control_deadlocks += 1
print('%d layouts: %d failed; control (one unit per operation) deadlocked in %d interleaved ones'
      % (checked, fails, control_deadlocks))
if control_deadlocks == 0:
    print('FAIL: the control never deadlocked: the model cannot detect a deadlock')
    fails += 1
sys.exit(fails)
