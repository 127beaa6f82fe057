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
from trainer.inference.engines import describe
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
            raise DataError(f"{split_path_for(data.slices_h5)}: split case {missing[0]} not found in "
                            f"{data.brats_dir}")
        ids = ids[:limit] if limit else ids

        def read_2d():
            for case_id in ids:
                image, labels, first = read_brats_case(by_id[case_id], max_voxels=data.max_voxels)
                yield LabelledCase(case_id, zscore_brain(image), whole_tumour(labels), first.geometry)
        return len(ids), read_2d()
    index = read_index(data.decathlon_dir, data.max_voxels)
    ids = load_split(data.decathlon_split)[split_name]
    by_id = {c.case_id: c for c in index.training}
    missing = [i for i in ids if i not in by_id]
    if missing:  # e.g. a split file from another dataset.json: say so before loading a model
        raise DataError(f"{data.decathlon_split}: split case {missing[0]} is not a training case in "
                        f"{index.root / 'dataset.json'}")
    ids = ids[:limit] if limit else ids

    def read_3d():
        for case_id in ids:
            image, mask, geometry = load_case(by_id[case_id], index.label_set, index.max_voxels)
            yield LabelledCase(case_id, image, mask, geometry)
    return len(ids), read_3d()


def evaluate(settings: Settings, split_name: str = "test", limit: int | None = None, out: Path | None = None,
             save_predictions: bool = True, progress: bool = True, **predictor_options) -> dict:
    out = Path(out or settings.run_path / "evaluation")
    count, cases = iter_cases(settings, split_name, limit)  # checks the split first: cheaper than a model
    if count == 0:
        raise DataError(f"split '{split_name}' has no cases to evaluate")
    predictor, checkpoint = Predictor.from_run(settings, **predictor_options)
    rows = []
    for case in tqdm(cases, total=count, desc=f"evaluate {split_name}", unit="case", disable=not progress):
        probability = predictor.predict(case.image)
        values = case_metrics(case.truth, probability, settings.model.threshold, case.geometry.spacing)
        rows.append({"case": case.case_id, **values})
        if save_predictions:
            mask = (probability > settings.model.threshold).astype(np.uint8)
            write_volume(out / "predictions" / f"{case.case_id}_pred.nii.gz", mask, case.geometry)
    summary = {"checkpoint": checkpoint, "engine": describe(predictor.engine), "split": split_name, "cases": len(rows), "model": settings.train.model,
               **{name: _stats([row[name] for row in rows]) for name in METRICS}}
    if summary["hd95"]["undefined_cases"]:
        log.warning("HD95 is undefined for %d of %d case(s) (exactly one of truth/prediction empty); "
                    "its mean/median/std cover the other %d", summary["hd95"]["undefined_cases"], len(rows),
                    summary["hd95"]["n"])
    _write_csv(out / "per_case.csv", rows)
    write_json(out / "summary.json", summary)
    return summary


def _stats(values: list[float]) -> dict:
    """mean/median/std over the cases where the metric is defined (``n`` of them).

    A metric can be undefined for a case (HD95 when exactly one of truth and prediction is
    empty: ``nan`` in per_case.csv). Dropping those silently would flatter the
    summary, so their number is reported as ``undefined_cases``.
    """
    finite = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    undefined = len(values) - int(finite.size)
    if not finite.size:
        return {"mean": None, "median": None, "std": None, "min": None, "max": None, "n": 0,
                "undefined_cases": undefined}
    return {"mean": float(finite.mean()), "median": float(np.median(finite)), "std": float(finite.std()),
            "min": float(finite.min()), "max": float(finite.max()), "n": int(finite.size),
            "undefined_cases": undefined}


def _write_csv(path: Path, rows: list[dict]) -> None:
    """One row per case; an undefined value is written as ``nan`` (float() and pandas read it back)."""
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["case", *METRICS])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
