"""Medical Segmentation Decathlon Task01_BrainTumour: dataset.json and its 4D NIfTI cases.

Only the layout: reading the index and one case. Either model trains on it through
trainer.data.datasets.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from trainer.config.settings import MODALITIES
from trainer.data.brats import check_labels
from trainer.data.description import read_description
from trainer.data.nifti import DEFAULT_MAX_VOXELS, Geometry, read_volume
from trainer.data.normalize import zscore_brain
from trainer.errors import DataError
from trainer.data.regions import DECATHLON


# Decathlon modality order in the 4th axis, in our channel names.
DECATHLON_CHANNELS = ("flair", "t1", "t1ce", "t2")
DEFAULT_LABEL_SET = DECATHLON.label_set


@dataclass(frozen=True)
class DecathlonCase:
    case_id: str
    image: Path
    label: Path | None


@dataclass(frozen=True)
class DecathlonIndex:
    root: Path
    training: tuple[DecathlonCase, ...]
    test: tuple[DecathlonCase, ...]
    label_set: frozenset[int]
    max_voxels: int = DEFAULT_MAX_VOXELS  # data.max_voxels: every read of these cases is capped by it


def read_index(root: Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> DecathlonIndex:
    """Parse and check ``dataset.json``; every referenced file must exist (.nii or .nii.gz)."""
    root = Path(root)
    path, meta = read_description(root, "the Decathlon Task01_BrainTumour folder")
    for key in ("training", "labels", "modality"):
        if key not in meta:
            raise DataError(f"{path}: missing key '{key}'")
    if not isinstance(meta["training"], list) or not meta["training"]:
        raise DataError(f"{path}: 'training' must be a non-empty list of {{image, label}} entries")
    if not isinstance(meta["labels"], dict):
        raise DataError(f"{path}: 'labels' must map integer values to names, got {_kind(meta['labels'])}")
    try:
        label_set = frozenset(int(k) for k in meta["labels"])
    except (TypeError, ValueError):
        raise DataError(f"{path}: 'labels' must map integer values to names") from None
    if not isinstance(meta["modality"], dict):
        raise DataError(f"{path}: 'modality' must map channel numbers to names, got {_kind(meta['modality'])}")
    if len(meta["modality"]) != len(DECATHLON_CHANNELS):
        raise DataError(f"{path}: expected {len(DECATHLON_CHANNELS)} modalities, got {len(meta['modality'])}")
    training = []
    for number, entry in enumerate(meta["training"]):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DataError(f"{path}: training[{number}] must be an object with 'image' and 'label'")
        # Resolve (and so type-check) both paths before deriving the case id from the image name.
        image = _resolve(root, entry["image"], path, f"training[{number}].image")
        label = _resolve(root, entry["label"], path, f"training[{number}].label")
        training.append(DecathlonCase(_case_id(entry["image"]), image, label))
    ids = [case.case_id for case in training]
    if len(set(ids)) != len(ids):
        duplicate = sorted(i for i, seen in Counter(ids).items() if seen > 1)[0]
        raise DataError(f"{path}: case {duplicate} is listed more than once in 'training'")
    test_entries = meta.get("test", [])
    if not isinstance(test_entries, list):
        raise DataError(f"{path}: 'test' must be a list of image paths, got {_kind(test_entries)}")
    test = []
    for number, item in enumerate(test_entries):
        image = _resolve(root, item, path, f"test[{number}]")  # type-checks item before _case_id
        test.append(DecathlonCase(_case_id(item), image, None))
    return DecathlonIndex(root, tuple(sorted(training, key=lambda c: c.case_id)), tuple(test), label_set,
                          max_voxels)


def _case_id(relative: str) -> str:
    name = Path(relative).name
    return name.split(".nii")[0]


def _kind(value) -> str:
    """A JSON value's type as the user wrote it (null, list, number, ...), for error messages."""
    return {type(None): "null", list: "a list", dict: "an object", str: "a string", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _resolve(root: Path, relative: str, source: Path, key: str) -> Path:
    """``./imagesTr/X.nii.gz`` relative to the dataset root; accept the .nii variant on disk.

    Confined to the dataset folder by the path's own text: no absolute path, no ``..``. (A
    symlink the dataset's owner placed inside the folder is still followed.)"""
    if not isinstance(relative, str) or not relative:
        raise DataError(f"{source}: {key}: expected a relative file path, got {json.dumps(relative)}")
    parts = PurePosixPath(relative).parts
    if PurePosixPath(relative).is_absolute() or ".." in parts or not [p for p in parts if p != "."]:
        raise DataError(f"{source}: {key}: {json.dumps(relative)} is outside the dataset folder; expected a "
                        f"path inside {root} such as ./imagesTr/BRATS_001.nii.gz")
    path = (root / relative).resolve()
    if path.is_file():
        return path
    for alternative in (path.with_suffix(""), Path(str(path) + ".gz")):
        if alternative.name.endswith((".nii", ".nii.gz")) and alternative.is_file():
            return alternative
    raise DataError(f"{source}: references {relative}, but {path} does not exist")


def channel_indices(channels: tuple[str, ...]) -> list[int]:
    return [DECATHLON_CHANNELS.index(c) for c in channels]


def load_case(case: DecathlonCase, label_set: frozenset[int] = DEFAULT_LABEL_SET,
              max_voxels: int = DEFAULT_MAX_VOXELS, normalise: bool = True
              ) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
    """(x, y, z, 4) float32 image (z-scored, or as stored), canonical labels (x, y, z) uint8 (or None),
    geometry."""
    volume = read_volume(case.image, np.float32, max_voxels)
    if volume.array.ndim != 4 or volume.array.shape[-1] != len(DECATHLON_CHANNELS):
        raise DataError(f"{case.image}: expected a 4D image (x, y, z, {len(DECATHLON_CHANNELS)}), "
                        f"got shape {volume.array.shape}")
    image = zscore_brain(volume.array) if normalise else volume.array
    mask = None
    if case.label is not None:
        labels = read_volume(case.label, max_voxels=max_voxels)
        if labels.array.shape != image.shape[:3]:
            raise DataError(f"{case.label}: label shape {labels.array.shape} differs from image shape "
                            f"{image.shape[:3]}")
        mask = DECATHLON.canonical(check_labels(labels.array, label_set, case.label))
    return image, mask, volume.geometry


__all__ = ["DecathlonCase", "DecathlonIndex", "read_index", "load_case", "channel_indices", "MODALITIES"]
