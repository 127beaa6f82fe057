"""Connected-component post-processing, applied per region only where validation says it helps.

nnU-Net's rule: for each region, try removing every connected component but the largest
(and, here, removing components smaller than a few sizes); keep the action that raises
the mean validation Dice, else do nothing. The decision is stored in the run
(``postprocessing.json``, tied to the checkpoint it was decided for) and applied by
``evaluate`` and ``predict``, so a model's reported figures and its written label maps
always come from the same procedure.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from trainer.errors import TrainingError
from trainer.fsutil import write_json

log = logging.getLogger(__name__)
# Candidate actions, tried on the validation split: "largest" keeps one component; "min_mm3:V"
# removes components smaller than V cubic millimetres (small distant false positives);
# "drop_below_mm3:V" empties the region when its whole predicted volume is under V mm^3, the
# BraTS rule for enhancing tumour (Isensee et al.: ET under 500 voxels becomes necrosis, so the
# voxels stay in TC): a low-grade case with no ET scores 0 for any false ET and 1 for none.
CANDIDATES = ("none", "largest", "min_mm3:100", "min_mm3:1000", "drop_below_mm3:500")
FILE_NAME = "postprocessing.json"


@dataclass(frozen=True)
class RegionDecision:
    region: str
    action: str
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


def apply_decisions(masks: np.ndarray, regions: Sequence[str], decisions: dict[str, str],
                    spacing: Sequence[float]) -> np.ndarray:
    """Region masks (x, y, z, R) with each region's stored action applied."""
    out = np.array(masks, dtype=bool, copy=True)
    for index, region in enumerate(regions):
        out[..., index] = apply_action(out[..., index], decisions.get(region, "none"), spacing)
    return out


def _dice(truth: np.ndarray, prediction: np.ndarray) -> float:
    denominator = truth.sum() + prediction.sum()
    return 1.0 if denominator == 0 else float(2.0 * np.logical_and(truth, prediction).sum() / denominator)


def score_case(truth: np.ndarray, prediction: np.ndarray, spacing: Sequence[float], regions: Sequence[str],
               candidates: Sequence[str] = CANDIDATES) -> dict[str, dict[str, float]]:
    """One validation case: region -> candidate action -> Dice (truth/prediction: (x, y, z, R) masks)."""
    return {region: {action: _dice(truth[..., index] > 0, apply_action(prediction[..., index] > 0, action, spacing))
                     for action in candidates}
            for index, region in enumerate(regions)}


def decide(case_scores: Sequence[dict[str, dict[str, float]]], regions: Sequence[str],
           candidates: Sequence[str] = CANDIDATES) -> list[RegionDecision]:
    """Per region, the candidate with the highest mean Dice over the cases; "none" unless another
    is strictly better."""
    decisions = []
    for region in regions:
        means = {action: float(np.mean([scores[region][action] for scores in case_scores])) for action in candidates}
        best = max(candidates, key=lambda action: means[action])
        if means[best] <= means["none"]:
            best = "none"
        decisions.append(RegionDecision(region, best, means["none"], means[best], len(case_scores)))
        log.info("post-processing %s: %s (validation Dice %.4f -> %.4f over %d case(s); tried %s)", region, best,
                 means["none"], means[best], len(case_scores),
                 ", ".join(f"{action} {means[action]:.4f}" for action in candidates))
    return decisions


def procedure(threshold: float, mirror_axes: Sequence[int]) -> dict:
    """What turns probabilities into the masks a decision was made on. A decision is only valid
    for the same procedure: test-time mirroring, for one, removes small false components itself."""
    return {"threshold": float(threshold), "mirror_axes": sorted(mirror_axes)}


def save(run_path: Path, checkpoint: str, decisions: Sequence[RegionDecision], inference: dict) -> Path:
    path = Path(run_path) / FILE_NAME
    write_json(path, {"checkpoint": checkpoint, "inference": inference, "split": "val",
                      "candidates": list(CANDIDATES), "regions": {d.region: asdict(d) for d in decisions}})
    return path


def stored(run_path: Path) -> dict:
    import json

    return json.loads((Path(run_path) / FILE_NAME).read_text())


def load(run_path: Path, checkpoint: str, inference: dict) -> dict[str, str] | None:
    """region -> action decided for ``checkpoint`` under the ``inference`` procedure; None when
    there is no such decision yet (a file from before mirroring existed has no procedure: decide again)."""
    import json

    path = Path(run_path) / FILE_NAME
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("checkpoint") != checkpoint or data.get("inference") != inference:
            return None  # decided for another checkpoint or procedure: decide again
        actions = {region: entry["action"] for region, entry in data["regions"].items()}
    except (ValueError, KeyError, TypeError) as exc:
        raise TrainingError(f"{path}: malformed post-processing decision ({exc}); delete it to decide again") from None
    unknown = sorted(set(actions.values()) - set(CANDIDATES))
    if unknown:
        raise TrainingError(f"{path}: unknown post-processing action(s) {', '.join(map(repr, unknown))}; expected one of "
                            f"{', '.join(CANDIDATES)}; delete it to decide again")
    return actions
