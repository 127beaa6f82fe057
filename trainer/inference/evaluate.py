"""Per-case evaluation on the held-out split, per region, with predictions written in source geometry.

Figures are reported after the run's post-processing (decided on the validation split the
first time a checkpoint is evaluated, see :mod:`trainer.inference.postprocess`), and before it
as ``*_raw`` columns, so its effect (on HD95 above all) is visible.
"""
from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

from trainer.config.settings import Settings
from trainer.data.datasets import RawDataset
from trainer.data.prepared import iter_cases, raw_dataset
from trainer.data.nifti import write_volume
from trainer.errors import DataError
from trainer.fsutil import write_json
from trainer.inference import postprocess
from trainer.inference.engines import describe
from trainer.inference.outputs import check_output_folder
from trainer.inference.predictor import Predictor
from trainer.inference.scores import case_row, column_summaries, warn_undefined_hd95, write_per_case_csv
from trainer.data.regions import RegionSet

log = logging.getLogger(__name__)


def default_evaluation_folder(settings: Settings, split_name: str) -> Path:
    """runs/R/evaluation for the test split (the held-out figures), runs/R/evaluation-<split> for
    another: scoring the validation split never replaces the test figures."""
    return settings.run_path / ("evaluation" if split_name == "test" else f"evaluation-{split_name}")


def evaluate(settings: Settings, split_name: str = "test", limit: int | None = None, out: Path | None = None,
             save_predictions: bool = True, progress: bool = True, **predictor_options) -> dict:
    out = Path(out or default_evaluation_folder(settings, split_name))
    dataset = raw_dataset(settings)
    # never into (or around) the dataset it reads: its root, image and label folders
    check_output_folder(out, [dataset.root, *(path.parent for case in dataset.cases
                                              for path in (*case.images, case.label) if path is not None)], "--out")
    count, cases = iter_cases(settings, split_name, limit, dataset)  # checks the split first: cheaper than a model
    if count == 0:
        raise DataError(f"split '{split_name}' has no cases to evaluate")
    regions = RegionSet(settings.model.regions)
    predictor, checkpoint = Predictor.from_run(settings, **predictor_options)
    decisions = postprocessing_for(settings, predictor, checkpoint, progress, dataset)
    rows = []
    for case in tqdm(cases, total=count, desc=f"evaluate {split_name}", unit="case", disable=not progress):
        probabilities = predictor.predict_channels(case.image)
        raw = probabilities > settings.model.threshold
        masks = postprocess.apply_decisions(probabilities, regions.names, decisions, case.geometry.spacing,
                                            settings.model.threshold)
        rows.append({"case": case.case_id, **case_row(regions, regions.masks(case.labels), raw, masks,
                                                      case.geometry.spacing)})
        if save_predictions:
            write_volume(out / "predictions" / f"{case.case_id}_pred.nii.gz",
                         regions.file_labels(masks, dataset.convention), case.geometry)
    columns = [c for c in rows[0] if c != "case"]
    summary = {"checkpoint": checkpoint, "engine": describe(predictor.engine), "split": split_name,
               "cases": len(rows), "model": settings.train.model, "dataset": dataset.describe(), "regions": list(regions.names),
               "postprocessing": postprocess.describe(decisions), **column_summaries(rows, columns)}
    warn_undefined_hd95(summary, regions, len(rows))
    write_per_case_csv(out / "per_case.csv", rows)
    write_json(out / "summary.json", summary)
    return summary


def validation_report(settings: Settings, progress: bool = True, **predictor_options) -> dict | None:
    """The best checkpoint on the whole validation volumes, before and after the post-processing
    decided on them (deciding it now if needed): the figure a test set should be expected to show.

    Training calls this once it ends, so that ``predict`` right after ``train`` already applies
    the run's post-processing, and the run's logged validation Dice describes the same
    procedure that writes its predictions."""
    dataset = raw_dataset(settings)
    if iter_cases(settings, "val", None, dataset)[0] == 0:
        log.warning("no validation cases: no validation report, no post-processing")
        return None
    predictor, checkpoint = Predictor.from_run(settings, **predictor_options)
    postprocessing_for(settings, predictor, checkpoint, progress, dataset)
    return {"checkpoint": checkpoint, "engine": describe(predictor.engine), "split": "val",
            **postprocess.validation_figures(postprocess.stored(settings.run_path))}


def postprocessing_for(settings: Settings, predictor: Predictor, checkpoint: str, progress: bool,
                       dataset: RawDataset | None = None) -> dict[str, postprocess.Rule]:
    """The run's post-processing for ``checkpoint``: stored, or decided now on the validation split."""
    inference = run_procedure(settings, predictor)
    stored = postprocess.load(settings.run_path, checkpoint, inference)
    if stored is not None:
        return stored
    regions = RegionSet(settings.model.regions)
    count, cases = iter_cases(settings, "val", None, dataset)
    if count == 0:
        log.warning("no validation cases: no post-processing")
        return {region: postprocess.Rule(settings.model.threshold) for region in regions.names}
    scores = []
    for case in tqdm(cases, total=count, desc="post-processing (val)", unit="case", disable=not progress):
        probabilities = predictor.predict_channels(case.image)
        scores.append(postprocess.score_case(regions.masks(case.labels), probabilities, case.geometry.spacing,
                                             regions.names, inference["thresholds"]))
    decisions = postprocess.decide(scores, regions.names, settings.model.threshold)
    path = postprocess.save(settings.run_path, checkpoint, decisions, inference)
    log.info("post-processing decided on %d validation case(s), stored in %s", count, path)
    return {d.region: postprocess.Rule(d.threshold, d.action) for d in decisions}


def run_procedure(settings: Settings, predictor: Predictor) -> dict:
    """The inference procedure a run's post-processing is decided for and applied under."""
    return postprocess.procedure(settings.model.threshold, predictor.mirrored_axes(),
                                 settings.model.tune_thresholds(settings.train.model))
