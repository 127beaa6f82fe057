"""Patient-level train/val/test split: a case's slices never land in two sets."""
from __future__ import annotations

import numpy as np

from trainer.errors import DataError

SPLITS = ("train", "val", "test")


def split_cases(case_ids: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[str]]:
    ids = sorted(case_ids)
    if len(ids) < 1:
        raise DataError("cannot split an empty list of cases")
    order = np.random.default_rng(seed).permutation(len(ids))
    n_val = _count(len(ids), val_fraction)
    n_test = _count(len(ids), test_fraction)
    if n_val + n_test >= len(ids):
        n_val, n_test = (1, 1) if len(ids) >= 3 else (int(len(ids) == 2), 0)
    shuffled = [ids[i] for i in order]
    return {"val": sorted(shuffled[:n_val]), "test": sorted(shuffled[n_val:n_val + n_test]),
            "train": sorted(shuffled[n_val + n_test:])}


def _count(n: int, fraction: float) -> int:
    return 0 if fraction <= 0 else max(1, int(round(n * fraction)))
