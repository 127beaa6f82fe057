"""Score any folder of label maps against a folder of references (``unet-train evaluate-folder``),
as nnU-Net's ``nnUNetv2_evaluate_folder`` does, with ``evaluate``'s metrics and column names.

Cases are matched by file name: a prediction ``CASE.nii.gz`` or evaluate's ``CASE_pred`` / predict's
``CASE_mask`` / ``CASE_labels``; a reference ``CASE.nii.gz`` (nnU-Net's labelsTr, or a Decathlon or
nnU-Net dataset folder, whose labelsTr is taken) or BraTS's ``CASE_seg.nii.gz``, flat or in case
folders (HGG/LGG too). A case on one side only is refused unless allowed (then the intersection is
scored and the summary counts the rest). Shapes must agree; HD95 is in mm, with the reference's
spacing. Labels are BraTS 0/1/2/4 or Decathlon 0/1/2/3 (auto: BraTS when a reference holds a 4),
read into the canonical labels of :mod:`trainer.data.regions`; a folder of binary masks scores the
whole tumour only.

:func:`plan_evaluation` checks everything (names, headers, labels, the output folder) without
TensorFlow; :func:`run_evaluation` scores. Every file is read through :func:`trainer.data.nifti.read_volume`
(regular files only, size capped); the outputs are written whole or not at all.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from trainer.data.brats import check_labels
from trainer.data.nifti import DEFAULT_MAX_VOXELS, is_nifti_name, read_header, read_volume, strip_nifti_suffix
from trainer.data.regions import BRATS, DECATHLON, REGION_NAMES, LabelConvention, RegionSet
from trainer.errors import DataError, UserError
from trainer.fsutil import write_json
from trainer.inference.outputs import check_output_folder

log = logging.getLogger(__name__)
CONVENTIONS = {"brats": BRATS, "decathlon": DECATHLON}
PREDICTION_SUFFIXES = ("_pred", "_mask", "_labels", "_seg")  # evaluate's, predict's, BraTS's own
REFERENCE_SUFFIX = "_seg"
NAMED = 5  # cases named in a refusal


@dataclass(frozen=True)
class Pair:
    case_id: str
    prediction: Path
    reference: Path


@dataclass(frozen=True)
class FolderEvaluation:
    """What :func:`run_evaluation` scores: every input checked, every choice with its reason."""

    predictions: Path
    references: Path
    pairs: tuple[Pair, ...]
    convention: LabelConvention
    labels_how: str
    regions: RegionSet
    regions_how: str
    out: Path
    predictions_without_reference: tuple[str, ...]
    references_without_prediction: tuple[str, ...]
    max_voxels: int = DEFAULT_MAX_VOXELS

    def describe(self) -> str:
        skipped = len(self.predictions_without_reference) + len(self.references_without_prediction)
        return (f"{len(self.pairs)} case(s), {self.convention.name} labels ({self.labels_how}), regions "
                f"{','.join(self.regions.names)} ({self.regions_how})"
                + (f", {skipped} unmatched case(s) not scored" if skipped else ""))


def default_out(predictions: Path) -> Path:
    """``evaluation-<PRED>`` beside the prediction folder: never inside an input."""
    folder = Path(os.path.abspath(predictions))
    if not folder.name:
        raise UserError(f"{predictions}: no default output folder beside it; pass -o OUT")
    return folder.parent / f"evaluation-{folder.name}"


def plan_evaluation(predictions: Path, references: Path, out: Path | None = None, labels: str = "auto",
                    regions: tuple[str, ...] | None = None, allow_missing: bool = False,
                    max_voxels: int = DEFAULT_MAX_VOXELS) -> FolderEvaluation:
    """Match the cases, check every file (header, shape, labels) and the output folder, decide the labels
    and regions; nothing is scored or written. UserError on any bad input."""
    predictions, references = Path(predictions), Path(references)
    named_regions = _named_regions(regions)
    for flag, folder in (("PRED", predictions), ("GT", references)):
        if not folder.is_dir():
            raise DataError(f"{flag} {folder}: not a folder; expected a folder of NIfTI label maps")
    if os.path.samefile(predictions, references):
        raise UserError(f"PRED {predictions} and GT {references} are the same folder")
    reference_root = _reference_root(references)
    reference_files = find_references(reference_root)
    prediction_files = find_predictions(predictions, set(reference_files))
    if not prediction_files:
        raise DataError(f"PRED {predictions}: no NIfTI label maps (.nii/.nii.gz) in it")
    extra = tuple(sorted(set(prediction_files) - set(reference_files)))
    missing = tuple(sorted(set(reference_files) - set(prediction_files)))
    common = sorted(set(prediction_files) & set(reference_files))
    if (extra or missing) and not allow_missing:
        hint = (f"pass --allow-missing to score the {len(common)} case(s) in both" if common
                else "no case is in both: are these the right folders?")
        raise DataError("; ".join(filter(None, (
            _unmatched(len(extra), f"prediction(s) in {predictions} without a reference in {reference_root}", extra),
            _unmatched(len(missing), f"reference(s) in {reference_root} without a prediction in {predictions}",
                       missing)))) + f" ({hint})")
    if not common:
        raise DataError(f"no case has both a prediction in {predictions} and a reference in {reference_root}")
    pairs = tuple(Pair(case, prediction_files[case], reference_files[case]) for case in common)
    flag = "-o"
    if out is None:
        out, flag = default_out(predictions), "-o (default)"
    check_output_folder(Path(out), [predictions, references, reference_root,
                                    *{pair.reference.parent for pair in pairs}], flag)
    for pair in pairs:
        _check_geometry(pair)
    # every label read once before anything is scored: a wrong file is refused before the work starts
    reference_values = {pair.case_id: _values(pair.reference, max_voxels) for pair in pairs}
    convention, labels_how = _convention(pairs, reference_values, labels)
    prediction_values = {pair.case_id: _values(pair.prediction, max_voxels) for pair in pairs}
    for pair in pairs:
        for path, values in ((pair.reference, reference_values[pair.case_id]),
                             (pair.prediction, prediction_values[pair.case_id])):
            if not values <= convention.label_set:
                raise DataError(f"{path}: label value(s) {sorted(values - convention.label_set)} outside the "
                                f"{convention.name} labels {sorted(convention.label_set)} ({labels_how}); see --labels")
    region_set, regions_how = (named_regions, "--regions") if named_regions else _default_regions(prediction_values)
    plan = FolderEvaluation(predictions, reference_root, pairs, convention, labels_how, region_set,
                            regions_how, Path(out), extra if allow_missing else (), missing if allow_missing else (),
                            max_voxels)
    log.info("evaluate-folder: %s", plan.describe())
    return plan


def run_evaluation(plan: FolderEvaluation, progress: bool = True) -> dict:
    """Score every pair; write per_case.csv and summary.json into ``plan.out``; the summary."""
    # TensorFlow (the metrics' confusion counts) loads here, once every input has passed its checks
    from trainer.inference.scores import column_summaries, scores_row, warn_undefined_hd95, write_per_case_csv

    rows, spacing_differs = [], []
    for pair in tqdm(plan.pairs, desc="evaluate-folder", unit="case", disable=not progress):
        reference = read_volume(pair.reference, max_voxels=plan.max_voxels)
        prediction = read_volume(pair.prediction, max_voxels=plan.max_voxels)
        _check_shapes(pair, prediction.array.shape, reference.array.shape)  # the file may have changed since
        truth = plan.regions.masks(_canonical(plan, reference.array, pair.reference))
        masks = plan.regions.masks(_canonical(plan, prediction.array, pair.prediction))
        if not np.allclose(prediction.geometry.spacing, reference.geometry.spacing, rtol=1e-3, atol=1e-5):
            spacing_differs.append(pair.case_id)
        rows.append({"case": pair.case_id, **scores_row(plan.regions, truth, masks, reference.geometry.spacing),
                     "prediction": pair.prediction.name, "reference": os.path.relpath(pair.reference, plan.references)})
    if spacing_differs:
        log.warning("%d case(s) have a prediction spacing other than the reference's (first: %s); HD95 uses the "
                    "reference's", len(spacing_differs), spacing_differs[0])
    columns = [c for c in rows[0] if c not in ("case", "prediction", "reference")]
    summary = {"predictions": os.path.abspath(plan.predictions), "references": os.path.abspath(plan.references),
               "cases": len(rows), "labels": plan.convention.name, "labels_how": plan.labels_how,
               "regions": list(plan.regions.names), "regions_how": plan.regions_how,
               "unmatched": {"predictions_without_reference": len(plan.predictions_without_reference),
                             "references_without_prediction": len(plan.references_without_prediction)},
               "hd95_spacing": "the reference's (mm)", "spacing_differs_cases": len(spacing_differs),
               **column_summaries(rows, columns)}
    warn_undefined_hd95(summary, plan.regions, len(rows))
    write_per_case_csv(plan.out / "per_case.csv", rows)
    write_json(plan.out / "summary.json", summary)
    return summary


def score_folder(predictions: Path, references: Path, progress: bool = False, **options) -> dict:
    """:func:`plan_evaluation` then :func:`run_evaluation`: the summary (for Python callers)."""
    return run_evaluation(plan_evaluation(predictions, references, **options), progress)


def find_references(folder: Path) -> dict[str, Path]:
    """case -> reference file: NIfTI files in ``folder`` (``CASE.nii.gz`` or ``CASE_seg.nii.gz``) and
    ``*_seg`` files in the folders below it (BraTS case folders, HGG/LGG or flat)."""
    found: dict[str, Path] = {}
    for top, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        at_top = Path(top) == Path(folder)
        for name in sorted(files):  # FIFOs and devices too: refused, by name, when read
            if not is_nifti_name(name):
                continue
            stem = strip_nifti_suffix(name)
            is_seg = stem.lower().endswith(REFERENCE_SUFFIX)
            if not (at_top or is_seg):
                continue  # a BraTS case folder's images
            case = stem[:-len(REFERENCE_SUFFIX)] if is_seg else stem
            path = Path(top) / name
            if case in found:
                raise DataError(f"GT {folder}: two references for case {case}: {found[case]} and {path}")
            found[case] = path
    return found


def find_predictions(folder: Path, reference_cases: set[str]) -> dict[str, Path]:
    """case -> prediction file in ``folder`` (not below it): ``CASE`` itself when it is a reference
    case, else ``CASE`` less one of :data:`PREDICTION_SUFFIXES`."""
    found: dict[str, Path] = {}
    with os.scandir(folder) as scan:
        entries = sorted(scan, key=lambda e: e.name)
    for entry in entries:
        if not is_nifti_name(entry.name):
            continue
        stem = strip_nifti_suffix(entry.name)
        stripped = [stem[:-len(s)] for s in PREDICTION_SUFFIXES if stem.lower().endswith(s) and len(stem) > len(s)]
        case = next((c for c in (stem, *stripped) if c in reference_cases), stripped[0] if stripped else stem)
        if case in found:
            raise DataError(f"PRED {folder}: two predictions for case {case}: {found[case].name} and {entry.name}")
        found[case] = Path(entry.path)
    return found


def _reference_root(references: Path) -> Path:
    """A Decathlon / nnU-Net dataset folder stands for its labelsTr."""
    labels = references / "labelsTr"
    with os.scandir(references) as scan:
        flat = any(is_nifti_name(entry.name) for entry in scan)
    if labels.is_dir() and not flat:
        log.info("GT %s: a dataset folder; its references are %s", references, labels)
        return labels
    return references


def _unmatched(count: int, what: str, cases: tuple[str, ...]) -> str:
    if not count:
        return ""
    more = f" and {count - NAMED} more" if count > NAMED else ""
    return f"{count} {what}: {', '.join(cases[:NAMED])}{more}"


def _check_geometry(pair: Pair) -> None:
    """Both files' headers (regular files, NIfTI): 3D and the same shape."""
    prediction, reference = read_header(pair.prediction)[0], read_header(pair.reference)[0]
    for path, shape in ((pair.prediction, prediction), (pair.reference, reference)):
        if len(shape) != 3:
            raise DataError(f"{path}: shape {' x '.join(map(str, shape))}; expected a 3D label map")
    _check_shapes(pair, prediction, reference)


def _check_shapes(pair: Pair, prediction: tuple[int, ...], reference: tuple[int, ...]) -> None:
    if tuple(prediction) != tuple(reference):
        raise DataError(f"case {pair.case_id}: prediction {pair.prediction} is {' x '.join(map(str, prediction))}, "
                        f"reference {pair.reference} is {' x '.join(map(str, reference))}; expected the same shape")


def _values(path: Path, max_voxels: int) -> set[int]:
    array = read_volume(path, max_voxels=max_voxels).array
    allowed = BRATS.label_set | DECATHLON.label_set
    return set(np.unique(check_labels(array, allowed, path)).tolist())


def _convention(pairs: tuple[Pair, ...], values: dict[str, set[int]], labels: str) -> tuple[LabelConvention, str]:
    if labels != "auto":
        if labels not in CONVENTIONS:
            raise UserError(f"--labels {labels}: expected one of auto, {', '.join(CONVENTIONS)}")
        return CONVENTIONS[labels], f"--labels {labels}"
    with_four = [pair.reference.name for pair in pairs if 4 in values[pair.case_id]]
    if with_four:
        return BRATS, f"auto: {with_four[0]} holds label 4"
    seen = set().union(*values.values())
    if 3 not in seen and 2 in seen:
        log.warning("no reference holds label 3 or 4: read as Decathlon (tumour core = 2, 3); pass --labels brats "
                    "if these are BraTS files (tumour core = 1, 4)")
        return DECATHLON, "auto: no reference holds label 4 (nor 3: pass --labels brats if they are BraTS files)"
    return DECATHLON, "auto: no reference holds label 4"


def _named_regions(regions: tuple[str, ...] | None) -> RegionSet | None:
    if regions is None:
        return None
    try:
        return RegionSet(tuple(regions))
    except ValueError:
        raise UserError(f"--regions {','.join(regions)}: expected distinct names among {', '.join(REGION_NAMES)}, "
                        f"comma-separated") from None


def _default_regions(prediction_values: dict[str, set[int]]) -> tuple[RegionSet, str]:
    """All three, or the whole tumour alone when every prediction is a binary mask."""
    if all(values <= {0, 1} for values in prediction_values.values()):
        log.info("every prediction holds only 0/1: binary masks, scored as the whole tumour only")
        return RegionSet(("wt",)), "predictions are binary masks (only 0/1): whole tumour only"
    return RegionSet(REGION_NAMES), "default"


def _canonical(plan: FolderEvaluation, array: np.ndarray, path: Path) -> np.ndarray:
    try:
        return plan.convention.canonical(check_labels(array, plan.convention.label_set, path))
    except DataError as exc:
        raise DataError(f"{exc}; read as {plan.convention.name} labels ({plan.labels_how}); see --labels") from None
