"""Per-case evaluation on the held-out split, with predictions written in source geometry."""
from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from trainer.config.settings import Settings
from trainer.data.brats import discover_brats, read_brats_case
from trainer.data.decathlon import load_case, read_index
from trainer.data.nifti import Geometry, write_volume
from trainer.data.normalize import whole_tumour, zscore_brain
from trainer.data.split import load_split, split_path_for
from trainer.errors import DataError
from trainer.fsutil import atomic_file, write_json
from trainer.inference.predictor import Predictor
from trainer.metrics import case_metrics

log = logging.getLogger(__name__)
METRICS = ("dice", "hd95", "sensitivity", "specificity", "precision")


@dataclass(frozen=True)
class LabelledCase:
    case_id: str
    image: np.ndarray  # normalised (x, y, z, 4)
    truth: np.ndarray  # WT (x, y, z) uint8
    geometry: Geometry


def iter_cases(settings: Settings, split_name: str, limit: int | None) -> tuple[int, Iterator[LabelledCase]]:
    """The split's cases, read one at a time from the raw dataset (BraTS for 2D, Decathlon for 3D)."""
    data = settings.data
    if settings.train.model == "2d":
        ids = load_split(split_path_for(data.slices_h5))[split_name]
        by_id = {c.case_id: c for c in discover_brats(data.brats_dir)}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise DataError(f"{data.brats_dir}: split case {missing[0]} not found")
        ids = ids[:limit] if limit else ids

        def read_2d():
            for case_id in ids:
                image, labels, first = read_brats_case(by_id[case_id])
                yield LabelledCase(case_id, zscore_brain(image), whole_tumour(labels), first.geometry)
        return len(ids), read_2d()
    index = read_index(data.decathlon_dir)
    ids = load_split(data.decathlon_split)[split_name]
    ids = ids[:limit] if limit else ids
    by_id = {c.case_id: c for c in index.training}

    def read_3d():
        for case_id in ids:
            image, mask, geometry = load_case(by_id[case_id], index.label_set)
            yield LabelledCase(case_id, image, mask, geometry)
    return len(ids), read_3d()


def evaluate(settings: Settings, split_name: str = "test", limit: int | None = None, out: Path | None = None,
             save_predictions: bool = True, progress: bool = True, **predictor_options) -> dict:
    out = Path(out or settings.run_path / "evaluation")
    predictor, checkpoint = Predictor.from_run(settings, **predictor_options)
    count, cases = iter_cases(settings, split_name, limit)
    if count == 0:
        raise DataError(f"split '{split_name}' has no cases to evaluate")
    rows = []
    for case in tqdm(cases, total=count, desc=f"evaluate {split_name}", unit="case", disable=not progress):
        probability = predictor.predict(case.image)
        values = case_metrics(case.truth, probability, settings.model.threshold, case.geometry.spacing)
        rows.append({"case": case.case_id, **values})
        if save_predictions:
            mask = (probability > settings.model.threshold).astype(np.uint8)
            write_volume(out / "predictions" / f"{case.case_id}_pred.nii.gz", mask, case.geometry)
    summary = {"checkpoint": checkpoint, "split": split_name, "cases": len(rows), "model": settings.train.model,
               **{name: _stats([row[name] for row in rows]) for name in METRICS}}
    _write_csv(out / "per_case.csv", rows)
    write_json(out / "summary.json", summary)
    return summary


def _stats(values: list[float]) -> dict:
    finite = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if not finite.size:
        return {"mean": None, "median": None, "std": None, "n": 0}
    return {"mean": float(finite.mean()), "median": float(np.median(finite)), "std": float(finite.std()),
            "n": int(finite.size)}


def _write_csv(path: Path, rows: list[dict]) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["case", *METRICS])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
