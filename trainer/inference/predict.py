"""Predict WT masks for NIfTI inputs: BraTS case folders or 4D (Decathlon-style) images."""
from __future__ import annotations

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
from trainer.inference.predictor import Predictor
from trainer.panels import panel


def load_input(path: Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[str, np.ndarray, Geometry]:
    """(name, normalised (x, y, z, 4) image, geometry) from a case folder or a 4D NIfTI."""
    path = Path(path)
    if path.is_dir():
        cases = discover_brats(path, require_seg=False)
        if len(cases) != 1:
            raise DataError(f"{path}: expected one BraTS case folder, found {len(cases)} cases")
        image, _, first = read_brats_case(cases[0], max_voxels=max_voxels)
        return cases[0].case_id, zscore_brain(image), first.geometry
    if not is_nifti_name(path.name):
        raise DataError(f"{path}: expected a BraTS case folder or a .nii/.nii.gz file")
    volume = read_volume(path, np.float32, max_voxels)
    if volume.array.ndim != 4 or volume.array.shape[-1] != 4:
        raise DataError(f"{path}: expected a 4D image with 4 modalities (flair, t1, t1ce, t2), "
                        f"got shape {volume.array.shape}; pass a BraTS case folder for separate files")
    return strip_nifti_suffix(path.name), zscore_brain(volume.array), volume.geometry


def predict_files(settings: Settings, inputs: list[Path], out: Path, **predictor_options) -> list[Path]:
    predictor, _ = Predictor.from_run(settings, **predictor_options)
    written = []
    for path in inputs:
        name, image, geometry = load_input(path, settings.data.max_voxels)
        probability = predictor.predict(image)
        mask = (probability > settings.model.threshold).astype(np.uint8)
        mask_path = Path(out) / f"{name}_mask.nii.gz"
        write_volume(mask_path, mask, geometry)
        z = int(np.argmax(mask.sum(axis=(0, 1)))) if mask.any() else image.shape[2] // 2
        picture = panel(image[:, :, z, 0].T, None, mask[:, :, z].T)  # transpose: x across, y down
        png_path = Path(out) / f"{name}_overlay.png"
        with atomic_file(png_path) as tmp:  # the temp name ends in .png, so OpenCV picks PNG
            if not cv2.imwrite(str(tmp), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)):
                raise DataError(f"{png_path}: could not write PNG")
        written += [mask_path, png_path]
    return written
