"""Patient-level train/val/test split: a case's slices never land in two sets."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from trainer.errors import DataError, UserError
from trainer.fsutil import read_regular_text, write_json

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


def split_path_for(data_file: Path) -> Path:
    """The split JSON beside a prepared dataset: only the last suffix is replaced
    (slices.h5 -> slices.split.json, a.v1.h5 -> a.v1.split.json), so files that differ
    only after their first dot never share one split file."""
    return Path(data_file).with_suffix(".split.json")


def save_split(path: Path, split: dict[str, list[str]], seed: int, source: Path, layout: str) -> None:
    """The split, with the raw dataset it was made from (an absolute path, and its layout):
    training, evaluation and prediction find the raw volumes there without being told again."""
    write_json(path, {"seed": seed, "source": str(Path(source).resolve()), "layout": layout,
                      **{k: split[k] for k in SPLITS}})


def recorded_source(path: Path) -> Path | None:
    """The raw dataset folder ``prepare`` recorded in a split file; None when there is no readable
    record. A relative record (older files) is taken relative to the current folder."""
    try:
        source = json.loads(read_regular_text(Path(path))).get("source")
    except (OSError, ValueError, AttributeError, UserError):
        return None
    return Path(source).absolute() if isinstance(source, str) and source else None


def load_split(path: Path) -> dict[str, list[str]]:
    try:
        data = json.loads(read_regular_text(Path(path)))
        return {k: list(data[k]) for k in SPLITS}
    except FileNotFoundError:
        raise DataError(f"{path}: split file not found (run 'unet-train prepare' first)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: malformed split file ({exc})") from None
