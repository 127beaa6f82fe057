"""Per-case scores per region and their summary: the one metrics code behind ``evaluate`` and
``evaluate-folder``, so that their per_case.csv columns and summary.json keys mean the same thing.

Columns: ``dice``, ``hd95``, ``sensitivity``, ``specificity``, ``precision`` (the mean over the
regions scored, undefined when one region's is), and with more than one region the same per region
(``dice_wt`` ...). The metrics themselves are :func:`trainer.models.metrics.case_metrics`.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from trainer.data.regions import RegionSet
from trainer.fsutil import write_csv
from trainer.models.metrics import case_metrics

log = logging.getLogger(__name__)
METRICS = ("dice", "hd95", "sensitivity", "specificity", "precision")
RAW_METRICS = ("dice", "hd95")  # evaluate also reports these before post-processing


def region_scores(regions: RegionSet, truth: np.ndarray, masks: np.ndarray,
                  spacing: tuple[float, ...]) -> dict[str, dict[str, float]]:
    """region -> metric -> value, for binary (..., R) truth and prediction masks; HD95 in mm."""
    return {region: case_metrics(truth[..., i], masks[..., i], 0.5, spacing) for i, region in enumerate(regions.names)}


def scores_row(regions: RegionSet, truth: np.ndarray, masks: np.ndarray,
               spacing: tuple[float, ...]) -> dict[str, float]:
    """Metrics of one case: their mean over regions (``dice`` ...) and, with several regions, per region
    (``dice_wt`` ...)."""
    per_region = region_scores(regions, truth, masks, spacing)
    row = {name: mean_defined([per_region[r][name] for r in regions.names]) for name in METRICS}
    if len(regions) > 1:
        for region in regions.names:
            row.update({f"{name}_{region}": per_region[region][name] for name in METRICS})
    return row


def case_row(regions: RegionSet, truth: np.ndarray, raw: np.ndarray, masks: np.ndarray,
             spacing: tuple[float, ...]) -> dict[str, float]:
    """Metrics of one case: per region (``dice_wt`` ...), their mean over regions (``dice`` ...),
    and Dice/HD95 before post-processing (``dice_raw`` ...)."""
    per_region = region_scores(regions, truth, masks, spacing)
    before = region_scores(regions, truth, raw, spacing)
    row = {name: mean_defined([per_region[r][name] for r in regions.names]) for name in METRICS}
    row.update({f"{name}_raw": mean_defined([before[r][name] for r in regions.names]) for name in RAW_METRICS})
    if len(regions) > 1:
        for region in regions.names:
            row.update({f"{name}_{region}": per_region[region][name] for name in METRICS})
            row.update({f"{name}_raw_{region}": before[region][name] for name in RAW_METRICS})
    return row


def mean_defined(values: list[float]) -> float:
    """The mean, or NaN when any value is undefined (a region's HD95 with one side empty)."""
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if len(defined) == len(values) else float("nan")


def summary_stats(values: list[float]) -> dict:
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


def column_summaries(rows: list[dict], columns: list[str]) -> dict[str, dict]:
    """column -> :func:`summary_stats` over the rows."""
    return {name: summary_stats([row[name] for row in rows]) for name in columns}


def warn_undefined_hd95(summary: dict, regions: RegionSet, cases: int) -> None:
    for column in ("hd95", *(f"hd95_{r}" for r in regions.names if len(regions) > 1)):
        if summary[column]["undefined_cases"]:
            log.warning("%s is undefined for %d of %d case(s) (exactly one of truth/prediction empty); "
                        "its mean/median/std cover the other %d", column, summary[column]["undefined_cases"],
                        cases, summary[column]["n"])


def write_per_case_csv(path: Path, rows: list[dict]) -> None:
    """One row per case; an undefined value is written as ``nan`` (float() and pandas read it back)."""
    write_csv(path, list(rows[0]), [{k: ("nan" if isinstance(v, float) and math.isnan(v) else v)
                                     for k, v in row.items()} for row in rows])
