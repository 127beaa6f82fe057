"""Predict tumour masks for cases on disk, in nnU-Net's conventions (``nnUNetv2_predict -i -o``).

A whole-tumour model writes a binary mask; a region model (WT/TC/ET) writes the nested label
map in the input's own convention: BraTS 0/1/2/4 for a case folder, Decathlon 0/1/2/3 for a 4D
image or nnU-Net channel files. The run's post-processing is applied; a run that has none yet
for this checkpoint and inference procedure decides it first on its validation split, so every
case comes out post-processed, or the closing line says why not.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
from tqdm import tqdm

from trainer.config.settings import Settings
from trainer.data.nifti import read_volume, write_volume
from trainer.errors import DataError, UserError
from trainer.fsutil import atomic_file
from trainer.inference import postprocess
from trainer.inference.engines import describe
from trainer.inference.inputs import CaseInput
from trainer.inference.outputs import check_output_folder
from trainer.inference.predictor import Predictor
from trainer.data.panels import panel
from trainer.data.regions import RegionSet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictOptions:
    out: Path
    nnunet_names: bool = True        # OUT/CASE.nii.gz; False: OUT/CASE_mask.nii.gz (the positional form)
    png: bool = False                # an overlay PNG per case
    save_probabilities: bool = False  # OUT/CASE.npz: float16 (regions, x, y, z) in the source geometry
    resume: bool = False             # --continue: skip cases whose outputs exist and read back whole
    progress: bool = True
    input_folder: Optional[Path] = None  # -i FOLDER: never written into (nor are the cases' own folders)


@dataclass(frozen=True)
class PredictReport:
    written: list[Path]
    predicted: int
    skipped: int
    seconds: float
    engine: str
    postprocessing: str

    def closing_line(self) -> str:
        per_case = f"{self.seconds / self.predicted:.1f} s/case" if self.predicted else "nothing to predict"
        skipped = f", {self.skipped} already done (--continue)" if self.skipped else ""
        return (f"predicted {self.predicted} case(s) in {self.seconds:.1f} s ({per_case}){skipped}; engine: "
                f"{self.engine}; post-processing: {self.postprocessing}")


def output_paths(case: CaseInput, regions: RegionSet, options: PredictOptions) -> dict[str, Path]:
    """Where one case's outputs go, by kind (mask, probabilities, png)."""
    out = Path(options.out)
    if options.nnunet_names:
        paths = {"mask": out / f"{case.name}.nii.gz"}
    else:
        paths = {"mask": out / f"{case.name}_{'mask' if regions.names == ('wt',) else 'labels'}.nii.gz"}
    if options.save_probabilities:
        paths["probabilities"] = out / f"{case.name}.npz"
    if options.png:
        paths["png"] = out / (f"{case.name}.png" if options.nnunet_names else f"{case.name}_overlay.png")
    return paths


def predict_cases(settings: Settings, cases: list[CaseInput], options: PredictOptions,
                  **predictor_options) -> PredictReport:
    regions = RegionSet(settings.model.regions)
    check_outputs(cases, regions, options)  # before the model loads: nothing in an input folder is written
    todo = [case for case in cases if not (options.resume and _finished(output_paths(case, regions, options)))]
    if not todo:
        return PredictReport([], 0, len(cases), 0.0, "none (nothing left to predict)", "as before")
    predictor, checkpoint = Predictor.from_run(settings, **predictor_options)
    decisions, state = _postprocessing(settings, predictor, checkpoint, options.progress)
    written: list[Path] = []
    start = time.perf_counter()
    for case in tqdm(todo, desc="predict", unit="case", disable=not options.progress):
        paths = output_paths(case, regions, options)
        image, geometry, convention = case.load(settings.data.max_voxels)
        probability = predictor.predict_channels(image)
        masks = postprocess.apply_decisions(probability, regions.names, decisions, geometry.spacing,
                                            settings.model.threshold)
        if "probabilities" in paths:
            _write_probabilities(paths["probabilities"], probability, regions.names, geometry.spacing)
        if "png" in paths:
            _write_overlay(paths["png"], image, masks, regions.names)
        # the mask last: --continue takes a case whose mask reads back whole as finished
        write_volume(paths["mask"], regions.file_labels(masks, convention), geometry)
        written += list(paths.values())
    return PredictReport(written, len(todo), len(cases) - len(todo), time.perf_counter() - start,
                         describe(predictor.engine), state)


def check_outputs(cases: list[CaseInput], regions: RegionSet, options: PredictOptions) -> None:
    """Refuse an -o that is, lies in or holds -i or a case's folder (a BraTS case folder's parent too: the
    folder of cases; the dataset folder around them), or whose output file would be an input file."""
    folders = [options.input_folder] if options.input_folder is not None else []
    for case in cases:
        folders += case.folders()  # a BraTS case folder's parent too: the folder of cases
    # a Decathlon / nnU-Net dataset's own folder is input too: -o labelsTr beside -i imagesTr would
    # write CASE.nii.gz over the ground truth of the same name
    folders += [folder.parent for folder in folders if (folder.parent / "dataset.json").is_file()]
    outputs = [path for case in cases for path in output_paths(case, regions, options).values()]
    check_output_folder(options.out, folders, "-o", [p for case in cases for p in case.paths], outputs)


def _postprocessing(settings: Settings, predictor: Predictor, checkpoint: str,
                    progress: bool) -> tuple[dict[str, postprocess.Rule], str]:
    """The run's decisions for this checkpoint and procedure, decided now when there are none yet."""
    from trainer.inference.evaluate import postprocessing_for, run_procedure
    from trainer.inference.postprocess import decide_command

    inference = run_procedure(settings, predictor)
    decisions = postprocess.load(settings.run_path, checkpoint, inference)
    if decisions is not None:
        return decisions, _describe(decisions)
    log.info("%s: no post-processing decided yet for %s (threshold %s, mirror axes %s): deciding it on the "
             "validation split", settings.run_path, checkpoint, inference["threshold"], inference["mirror_axes"])
    try:
        decisions = postprocessing_for(settings, predictor, checkpoint, progress)
    except UserError as exc:
        state = f"NONE, raw masks written ({exc}); decide it with: {decide_command(settings)}"
        log.warning("post-processing: %s", state)
        return {}, state
    return decisions, _describe(decisions)


def _describe(decisions: dict[str, postprocess.Rule]) -> str:
    return ", ".join(f"{region} {rule}" for region, rule in decisions.items()) or "none"


def _finished(paths: dict[str, Path]) -> bool:
    """Every output of a case exists and reads back whole (a truncated file is predicted again)."""
    try:
        for kind, path in paths.items():
            if not path.is_file():
                return False
            if kind == "mask":
                read_volume(path)
            elif kind == "probabilities":
                with np.load(path) as archive:
                    archive["probabilities"]
            elif kind == "png" and cv2.imread(str(path)) is None:
                return False
    except (DataError, OSError, ValueError, KeyError):
        return False
    return True


def _write_probabilities(path: Path, probability: np.ndarray, names: tuple[str, ...],
                         spacing: tuple[float, ...]) -> None:
    """As nnU-Net's --save_probabilities: one float16 map per region, in the source geometry."""
    with atomic_file(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, probabilities=np.moveaxis(probability, -1, 0).astype(np.float16),
                            regions=np.asarray(names), spacing=np.asarray(spacing, dtype=np.float64),
                            axes=np.asarray("region,x,y,z"))


def _write_overlay(path: Path, image: np.ndarray, masks: np.ndarray, names: tuple[str, ...]) -> None:
    tumour = masks[..., 0]
    z = int(np.argmax(tumour.sum(axis=(0, 1)))) if tumour.any() else image.shape[2] // 2
    plane = np.transpose(masks[:, :, z], (1, 0, 2))  # transpose: x across, y down
    picture = panel(image[:, :, z, 0].T, None, plane, names)
    with atomic_file(path) as tmp:  # the temp name ends in .png, so OpenCV picks PNG
        if not cv2.imwrite(str(tmp), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)):
            raise DataError(f"{path}: could not write PNG")
