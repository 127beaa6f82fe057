"""Post-processing decided per region on the validation split: a probability threshold, then a
connected-component action, each kept only where validation says it helps.

nnU-Net's rule: for each region, try removing every connected component but the largest
(and, here, removing components smaller than a few sizes); keep the action that raises
the mean validation Dice, else do nothing. For the 2D model the same search also covers the
threshold that turns the region's probability into its mask (``model.tune_thresholds_2d``): a
soft-Dice model trained on single slices hedges where a slice cannot tell (a tumour core that
looks like oedema) and over-segments at 0.5; on the hard phantom validation chose 0.8 for TC in
8 runs of 8 and the held-out TC rose in each (docs/results.md). The decision is stored in the run
(``postprocessing.json``, tied to the checkpoint and inference procedure it was decided for) and
applied by ``evaluate`` and ``predict``, so a model's reported figures and its written label maps
always come from the same procedure.
"""
from __future__ import annotations

import logging
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from trainer.config.settings import Settings
from trainer.data.prepared import raw_source
from trainer.errors import TrainingError
from trainer.fsutil import read_regular_json, write_json

log = logging.getLogger(__name__)
# Candidate actions, tried on the validation split: "largest" keeps one component; "min_mm3:V"
# removes components smaller than V cubic millimetres (small distant false positives);
# "drop_below_mm3:V" empties the region when its whole predicted volume is under V mm^3, the
# BraTS rule for enhancing tumour (Isensee et al.: ET under 500 voxels becomes necrosis, so the
# voxels stay in TC): a low-grade case with no ET scores 0 for any false ET and 1 for none.
CANDIDATES = ("none", "largest", "min_mm3:100", "min_mm3:1000", "drop_below_mm3:500")
# Thresholds tried with model.tune_thresholds (model.threshold is always among them): coarse, so that
# a few validation cases choose among few options.
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
FILE_NAME = "postprocessing.json"
FILE_LIMIT = 1 << 20  # a few rules per region (seen: /dev/zero or a 6 GiB sparse file ran out of memory)


@dataclass(frozen=True)
class Rule:
    """How one region's probability becomes its mask: ``probability > threshold``, then ``action``."""
    threshold: float
    action: str = "none"

    def __str__(self) -> str:
        return f"{self.action} (threshold {self.threshold:g})"


@dataclass(frozen=True)
class RegionDecision:
    region: str
    action: str
    threshold: float
    val_dice_before: float
    val_dice_after: float
    cases: int


def apply_action(mask: np.ndarray, action: str, spacing: Sequence[float]) -> np.ndarray:
    """One region's binary (x, y, z) mask after ``action`` (face-connected components)."""
    if action == "none" or not mask.any():
        return mask
    if action.startswith("drop_below_mm3:"):
        volume_mm3 = float(mask.sum()) * float(np.prod(spacing))
        return np.zeros_like(mask) if volume_mm3 < float(action.split(":", 1)[1]) else mask
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.transpose(mask).astype(np.uint8))
    components = sitk.ConnectedComponent(image, False)
    if action == "largest":
        relabelled = sitk.RelabelComponent(components, sortByObjectSize=True)
        return np.transpose(sitk.GetArrayFromImage(relabelled)) == 1
    if action.startswith("min_mm3:"):
        voxel_mm3 = float(np.prod(spacing))
        minimum = max(1, int(np.ceil(float(action.split(":", 1)[1]) / voxel_mm3)))
        relabelled = sitk.RelabelComponent(components, minimumObjectSize=minimum)
        return np.transpose(sitk.GetArrayFromImage(relabelled)) > 0
    raise ValueError(f"unknown post-processing action {action!r}")


def apply_decisions(probabilities: np.ndarray, regions: Sequence[str], decisions: dict[str, Rule],
                    spacing: Sequence[float], default_threshold: float) -> np.ndarray:
    """Region masks (x, y, z, R) from probabilities (x, y, z, R), each region by its stored rule
    (a region without one: ``default_threshold``, no action)."""
    out = np.empty(probabilities.shape, dtype=bool)
    for index, region in enumerate(regions):
        rule = decisions.get(region, Rule(default_threshold))
        out[..., index] = apply_action(probabilities[..., index] > rule.threshold, rule.action, spacing)
    return out


def _dice(truth: np.ndarray, prediction: np.ndarray) -> float:
    denominator = truth.sum() + prediction.sum()
    return 1.0 if denominator == 0 else float(2.0 * np.logical_and(truth, prediction).sum() / denominator)


def score_case(truth: np.ndarray, probabilities: np.ndarray, spacing: Sequence[float], regions: Sequence[str],
               thresholds: Sequence[float] = (0.5,),
               candidates: Sequence[str] = CANDIDATES) -> dict[str, dict[Rule, float]]:
    """One validation case: region -> rule (threshold x candidate action) -> Dice
    (truth: (x, y, z, R) masks; probabilities: (x, y, z, R), or masks, which any threshold keeps)."""
    return {region: {Rule(threshold, action): _dice(truth[..., index] > 0,
                                                    apply_action(probabilities[..., index] > threshold, action, spacing))
                     for threshold in thresholds for action in candidates}
            for index, region in enumerate(regions)}


def decide(case_scores: Sequence[dict[str, dict[Rule, float]]], regions: Sequence[str],
           default_threshold: float = 0.5) -> list[RegionDecision]:
    """Per region, the rule with the highest mean Dice over the cases; the default threshold and no
    action unless another rule is strictly better (ties go to the threshold nearest the default)."""
    decisions = []
    for region in regions:
        rules = list(case_scores[0][region])
        means = {rule: float(np.mean([scores[region][rule] for scores in case_scores])) for rule in rules}
        default = Rule(default_threshold)
        best = default
        for rule in sorted(rules, key=lambda r: abs(r.threshold - default_threshold)):  # stable: actions in order
            if means[rule] > means[best]:
                best = rule
        decisions.append(RegionDecision(region, best.action, best.threshold, means[default], means[best],
                                        len(case_scores)))
        log.info("post-processing %s: %s (validation Dice %.4f -> %.4f over %d case(s); tried %s)", region, best,
                 means[default], means[best], len(case_scores),
                 ", ".join(f"{rule.action}@{rule.threshold:g} {means[rule]:.4f}" for rule in rules))
    return decisions


def procedure(threshold: float, mirror_axes: Sequence[int], tune_thresholds: bool = False) -> dict:
    """What turns probabilities into the masks a decision was made on, and what the decision could
    choose from. A decision is only valid for the same procedure: test-time mirroring, for one,
    removes small false components itself."""
    return {"threshold": float(threshold), "mirror_axes": sorted(mirror_axes),
            "thresholds": list(candidate_thresholds(threshold, tune_thresholds))}


def candidate_thresholds(threshold: float, tune: bool) -> tuple[float, ...]:
    """The thresholds validation chooses among: model.threshold alone, or with THRESHOLDS."""
    return tuple(sorted({float(threshold), *THRESHOLDS})) if tune else (float(threshold),)


def save(run_path: Path, checkpoint: str, decisions: Sequence[RegionDecision], inference: dict) -> Path:
    path = Path(run_path) / FILE_NAME
    write_json(path, {"checkpoint": checkpoint, "inference": inference, "split": "val",
                      "candidates": list(CANDIDATES), "regions": {d.region: asdict(d) for d in decisions}})
    return path


def validation_figures(decided: dict) -> dict:
    """Whole-volume validation Dice after and before the stored post-processing (a stored file's
    contents), per region too when there are several: what validation.json reports."""
    regions = decided["regions"]
    figures = {"cases": next(iter(regions.values()))["cases"],
               "dice": float(np.mean([r["val_dice_after"] for r in regions.values()])),
               "dice_raw": float(np.mean([r["val_dice_before"] for r in regions.values()])),
               "postprocessing": {name: str(Rule(r["threshold"], r["action"])) for name, r in regions.items()}}
    if len(regions) > 1:
        figures.update({f"dice_{name}": r["val_dice_after"] for name, r in regions.items()})
    return figures


def stored(run_path: Path) -> dict:
    path = Path(run_path) / FILE_NAME
    return read_regular_json(path, str(path), FILE_LIMIT)


def load(run_path: Path, checkpoint: str, inference: dict) -> dict[str, Rule] | None:
    """region -> rule decided for ``checkpoint`` under the ``inference`` procedure; None when
    there is no such decision yet (a file from before mirroring or threshold tuning existed has
    another procedure: decide again)."""
    path = Path(run_path) / FILE_NAME
    if not path.exists():
        return None
    try:
        data = read_regular_json(path, str(path), FILE_LIMIT)  # never a FIFO, /dev/zero or a sparse GiB
        if data.get("checkpoint") != checkpoint or data.get("inference") != inference:
            return None  # decided for another checkpoint or procedure: decide again
        rules = {region: Rule(float(entry["threshold"]), entry["action"]) for region, entry in data["regions"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise TrainingError(f"{path}: malformed post-processing decision ({exc}); delete it to decide again") from None
    unknown = sorted({rule.action for rule in rules.values()} - set(CANDIDATES))
    if unknown:
        raise TrainingError(f"{path}: unknown post-processing action(s) {', '.join(map(repr, unknown))}; expected one of "
                            f"{', '.join(CANDIDATES)}; delete it to decide again")
    allowed = inference.get("thresholds", [inference["threshold"]])
    outside = sorted({rule.threshold for rule in rules.values()} - set(allowed))
    if outside:
        raise TrainingError(f"{path}: threshold(s) {', '.join(map(str, outside))} outside the candidates "
                            f"{allowed}; delete it to decide again")
    return rules


def describe(rules: dict[str, Rule]) -> dict[str, dict]:
    """The rules as JSON (summaries, reports)."""
    return {region: {"threshold": rule.threshold, "action": rule.action} for region, rule in rules.items()}


def decide_command(settings: Settings) -> str:
    """The command that decides the post-processing of this run later (once the raw volumes are
    reachable): ``evaluate`` on the validation split, predictions not written."""
    key, _ = raw_source(settings)
    return shlex.join(["unet-train", "evaluate", "--split", "val", "--run-dir", str(settings.train.run_dir),
                       "--run-name", settings.train.run_name, "--no-predictions", "--set", f"{key}=DIR"])
