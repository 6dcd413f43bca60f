"""Stratified train/val/test assignment of the clean images."""

from __future__ import annotations

import logging
import math
from collections import Counter

import numpy as np
import pandas as pd

from pipeline.config import SPLITS, SplitParams, StageError

log = logging.getLogger(__name__)


def quotas(counts: dict[str, int], sizes: dict[str, int]) -> dict[str, dict[str, int]]:
    """How many images of each letter go to each split.

    Each count is its exact proportional share rounded down or up, while every letter's total
    and every split's size stay exact (a controlled rounding; augmenting paths find it).
    """
    total = sum(counts.values())
    exact = {(c, s): counts[c] * sizes[s] / total for c in counts for s in sizes}
    floor = {k: math.floor(v) for k, v in exact.items()}
    up: set[tuple[str, str]] = set()  # cells rounded up

    def room(s: str) -> int:
        return sizes[s] - sum(floor[c, s] + ((c, s) in up) for c in counts)

    def augment(c: str, seen: set[str]) -> bool:
        """Round one more cell of letter c up, moving other letters' round-ups if needed."""
        for s in sorted(sizes, key=lambda s: floor[c, s] - exact[c, s]):  # largest part first
            if s in seen or (c, s) in up or exact[c, s] == floor[c, s]:
                continue
            seen.add(s)
            if room(s) > 0:
                up.add((c, s))
                return True
            for other in [o for o in sorted(counts) if (o, s) in up]:
                if augment(other, seen):  # `other` rounds up elsewhere and frees s
                    up.remove((other, s))
                    up.add((c, s))
                    return True
        return False

    for c in sorted(counts):
        for _ in range(counts[c] - sum(floor[c, s] for s in sizes)):
            if not augment(c, set()):
                raise StageError(f"cannot split letter {c} in proportion")  # never, in theory
    return {s: {c: floor[c, s] + ((c, s) in up) for c in sorted(counts)} for s in sizes}


def assign(index: pd.DataFrame, p: SplitParams, seed: int) -> np.ndarray:
    """One of 'train' / 'val' / 'test' per row: stratified by letter, seeded.

    With group_duplicates, rows with identical pixels (same sha256) move together, so no
    test or val image has an exact copy in train.
    """
    n = len(index)
    train, val = p.sizes(n)
    asked = f"train_size {p.train_size} + val_size {p.val_size}"
    if isinstance(p.train_size, float) or isinstance(p.val_size, float):
        asked += f" (train {train}, val {val})"
    if min(train, val) < 1:
        raise StageError(f"{asked} leaves an empty split out of {n} images")
    if train + val >= n:
        raise StageError(f"{asked} leaves no test images out of {n}")
    counts = index["letter"].value_counts().sort_index().to_dict()
    sizes = {"train": train, "val": val, "test": n - train - val}
    want = quotas(counts, sizes)
    for c, k in counts.items():
        if min(want[s][c] for s in SPLITS) < 1:
            raise StageError(
                f"letter {c} has only {k} images: too few to stratify into "
                f"train {want['train'][c]} / val {want['val'][c]} / test {want['test'][c]}"
            )
    letters = index["letter"].to_numpy()
    if p.group_duplicates:
        out = assign_groups(letters, index["sha256"].to_numpy(), want, seed)
    else:
        out = assign_rows(letters, want, seed)
    got = {s: int((out == s).sum()) for s in SPLITS}
    if got != sizes:  # only when groups of copies cannot fill a quota exactly
        log.warning("split sizes %s differ from the requested %s", got, sizes)
    return out


def assign_rows(letters: np.ndarray, want: dict, seed: int) -> np.ndarray:
    """Rows in a seeded random order; each letter's first rows in that order fill its train
    quota, the next its val quota, the rest go to test. Vectorized: no Python loop per row."""
    order = np.random.default_rng(seed).permutation(len(letters))
    codes = np.full(len(letters), 2, dtype=np.int8)  # test
    for c in np.unique(letters):
        rows = order[letters[order] == c]  # this letter's rows, in the random order
        train, val = want["train"].get(c, 0), want["val"].get(c, 0)
        codes[rows[:train]] = 0
        codes[rows[train : train + val]] = 1
    return np.array(SPLITS)[codes]


def assign_groups(letters: np.ndarray, keys: np.ndarray, want: dict, seed: int) -> np.ndarray:
    """Rows with the same key move as a unit: large units first while every split has room,
    then single rows fill each quota exactly; a unit goes to the first split with room."""
    want = {s: dict(q) for s, q in want.items()}
    units = list(pd.Series(np.arange(len(keys))).groupby(keys, sort=True).indices.values())
    order = np.random.default_rng(seed).permutation(len(units))
    order = sorted(order, key=lambda i: -len(units[i]))
    out = np.empty(len(keys), dtype=object)
    for i in order:
        need = Counter(letters[units[i]])
        split = next(
            (s for s in ("train", "val") if all(want[s][c] >= k for c, k in need.items())), "test"
        )
        for c, k in need.items():
            want[split][c] -= k
        out[units[i]] = split
    return out.astype(str)


def split_report(index: pd.DataFrame, split: np.ndarray) -> dict:
    """Counts per split and letter, and how many val/test images have an exact copy in train."""
    train_hashes = set(index["sha256"][split == "train"])
    per_letter = pd.crosstab(index["letter"], split).reindex(columns=list(SPLITS), fill_value=0)
    return {
        "counts": {s: int((split == s).sum()) for s in SPLITS},
        "per_letter": {s: {c: int(per_letter.loc[c, s]) for c in per_letter.index} for s in SPLITS},
        "duplicates_in_train": {
            s: int(index["sha256"][split == s].isin(train_hashes).sum()) for s in ("val", "test")
        },
    }
