"""How many registrations a leave-one-out sweep of the transport arm (or of CVAEs trained with
train.transport_partners) does per fold, against the distinct (target, partner) pairs the storage
root's PairCache registers once (stop 50). Exact counts from cardiomotion.train.transport.partners;
no timing. Usage: python pair_counts.py [n_scans] [seed]"""
from __future__ import annotations

import sys

from cardiomotion.train.transport import partners


def counts(n_scans: int, folds: int, k: int, seed: int) -> tuple[int, int]:
    ids = [f"phantom_{i:03d}" for i in range(n_scans)]
    per_fold, union = 0, set()
    for f in range(folds):
        train = [s for s in ids if s != ids[f]]
        pairs = {(t, p) for t, ps in partners(train, k, seed).items() for p in ps}
        per_fold += len(pairs)
        union |= pairs
    return per_fold, len(union)


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 44
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    print("| k | folds | registrations, per fold | with the pair cache | ratio |")
    print("|---|---|---|---|---|")
    for k in (4, 16):
        for folds in (8, n):
            a, b = counts(n, folds, k, seed)
            print(f"| {k} | {folds} | {a} | {b} | {a / b:.1f} |")
