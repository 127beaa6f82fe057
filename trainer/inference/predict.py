"""Predict tumour masks for NIfTI inputs: BraTS case folders or 4D (Decathlon-style) images.

A whole-tumour model writes a binary mask; a region model (WT/TC/ET) writes the nested label
map in the input's own convention: BraTS 0/1/2/4 for a case folder, Decathlon 0/1/2/3 for a
4D image. The run's post-processing decision is applied, as in ``evaluate``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from trainer.config.settings import Settings
from trainer.data.brats import discover_brats, read_brats_case
from trainer.data.nifti import (DEFAULT_MAX_VOXELS, Geometry, is_nifti_name, read_volume, strip_nifti_suffix,
                                write_volume)
from trainer.data.normalize import zscore_brain
from trainer.errors import DataError
from trainer.fsutil import atomic_file
from trainer.inference import postprocess
from trainer.inference.predictor import Predictor
from trainer.panels import panel
from trainer.regions import BRATS, LabelConvention, RegionSet

log = logging.getLogger(__name__)


def load_input(path: Path, max_voxels: int = DEFAULT_MAX_VOXELS
               ) -> tuple[str, np.ndarray, Geometry, LabelConvention | None]:
    """(name, normalised (x, y, z, 4) image, geometry, label convention: BraTS for a case folder,
    None (canonical = Decathlon) for a 4D NIfTI) from a case folder or a 4D NIfTI."""
    path = Path(path)
    if path.is_dir():
        cases = discover_brats(path, require_seg=False)
        if len(cases) != 1:
            raise DataError(f"{path}: expected one BraTS case folder, found {len(cases)} cases")
        image, _, first = read_brats_case(cases[0], max_voxels=max_voxels)
        return cases[0].case_id, zscore_brain(image), first.geometry, BRATS
    if not is_nifti_name(path.name):
        raise DataError(f"{path}: expected a BraTS case folder or a .nii/.nii.gz file")
    volume = read_volume(path, np.float32, max_voxels)
    if volume.array.ndim != 4 or volume.array.shape[-1] != 4:
        raise DataError(f"{path}: expected a 4D image with 4 modalities (flair, t1, t1ce, t2), "
                        f"got shape {volume.array.shape}; pass a BraTS case folder for separate files")
    return strip_nifti_suffix(path.name), zscore_brain(volume.array), volume.geometry, None


def predict_files(settings: Settings, inputs: list[Path], out: Path, **predictor_options) -> list[Path]:
    regions = RegionSet(settings.model.regions)
    predictor, checkpoint = Predictor.from_run(settings, **predictor_options)
    inference = postprocess.procedure(settings.model.threshold, predictor.mirrored_axes())
    decisions = postprocess.load(settings.run_path, checkpoint, inference)
    if decisions is None:
        log.warning("%s: no post-processing decided for %s with threshold %s and mirror_axes %s yet "
                    "('unet-train evaluate' decides it on the validation split); writing the raw masks",
                    settings.run_path, checkpoint, inference["threshold"], inference["mirror_axes"])
        decisions = {}
    written = []
    for path in inputs:
        name, image, geometry, convention = load_input(path, settings.data.max_voxels)
        raw = predictor.predict_channels(image) > settings.model.threshold
        masks = postprocess.apply_decisions(raw, regions.names, decisions, geometry.spacing)
        mask_path = Path(out) / f"{name}_{'mask' if regions.names == ('wt',) else 'labels'}.nii.gz"
        write_volume(mask_path, regions.file_labels(masks, convention), geometry)
        tumour = masks[..., 0]
        z = int(np.argmax(tumour.sum(axis=(0, 1)))) if tumour.any() else image.shape[2] // 2
        plane = np.transpose(masks[:, :, z], (1, 0, 2))  # transpose: x across, y down
        picture = panel(image[:, :, z, 0].T, None, plane, regions.names)
        png_path = Path(out) / f"{name}_overlay.png"
        with atomic_file(png_path) as tmp:  # the temp name ends in .png, so OpenCV picks PNG
            if not cv2.imwrite(str(tmp), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)):
                raise DataError(f"{png_path}: could not write PNG")
        written += [mask_path, png_path]
    return written
