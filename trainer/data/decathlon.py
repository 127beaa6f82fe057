"""Medical Segmentation Decathlon Task01_BrainTumour: dataset.json, 4D NIfTI, optional cache.

The 3D pipeline reads cases straight from the NIfTI files, or from a cache of normalised
float32 ``.npy`` copies (memory-mapped, so a crop reads only the bytes it needs).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from trainer.config.settings import MODALITIES, SplitSettings
from trainer.data.brats import check_labels
from trainer.data.nifti import Geometry, read_volume
from trainer.data.normalize import whole_tumour, zscore_brain
from trainer.data.split import load_split, save_split, split_cases
from trainer.errors import DataError, UserError
from trainer.fsutil import atomic_file

# Decathlon modality order in the 4th axis, in our channel names.
DECATHLON_CHANNELS = ("flair", "t1", "t1ce", "t2")
DEFAULT_LABEL_SET = frozenset({0, 1, 2, 3})


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


def read_index(root: Path) -> DecathlonIndex:
    """Parse and check ``dataset.json``; every referenced file must exist (.nii or .nii.gz)."""
    root = Path(root)
    path = root / "dataset.json"
    if not path.is_file():
        raise DataError(f"{path}: not found (expected the Decathlon Task01_BrainTumour folder)")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise DataError(f"{path}: file is empty; expected the Decathlon dataset description")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    for key in ("training", "labels", "modality"):
        if key not in meta:
            raise DataError(f"{path}: missing key '{key}'")
    if not isinstance(meta["training"], list) or not meta["training"]:
        raise DataError(f"{path}: 'training' must be a non-empty list of {{image, label}} entries")
    try:
        label_set = frozenset(int(k) for k in meta["labels"])
    except (TypeError, ValueError, AttributeError):
        raise DataError(f"{path}: 'labels' must map integer values to names") from None
    if len(meta["modality"]) != len(DECATHLON_CHANNELS):
        raise DataError(f"{path}: expected {len(DECATHLON_CHANNELS)} modalities, got {len(meta['modality'])}")
    training = []
    for number, entry in enumerate(meta["training"]):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DataError(f"{path}: training[{number}] must be an object with 'image' and 'label'")
        training.append(DecathlonCase(_case_id(entry["image"]), _resolve(root, entry["image"], path),
                                      _resolve(root, entry["label"], path)))
    test = [DecathlonCase(_case_id(item), _resolve(root, item, path), None)
            for item in meta.get("test", []) if isinstance(item, str)]
    return DecathlonIndex(root, tuple(sorted(training, key=lambda c: c.case_id)), tuple(test), label_set)


def _case_id(relative: str) -> str:
    name = Path(relative).name
    return name.split(".nii")[0]


def _resolve(root: Path, relative: str, source: Path) -> Path:
    """``./imagesTr/X.nii.gz`` relative to the dataset root; accept the .nii variant on disk."""
    if not isinstance(relative, str) or not relative:
        raise DataError(f"{source}: expected a relative file path, got {relative!r}")
    path = (root / relative).resolve()
    if path.is_file():
        return path
    for alternative in (path.with_suffix(""), Path(str(path) + ".gz")):
        if alternative.name.endswith((".nii", ".nii.gz")) and alternative.is_file():
            return alternative
    raise DataError(f"{source}: references {relative}, but {path} does not exist")


def channel_indices(channels: tuple[str, ...]) -> list[int]:
    return [DECATHLON_CHANNELS.index(c) for c in channels]


def load_case(case: DecathlonCase, label_set: frozenset[int] = DEFAULT_LABEL_SET
              ) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
    """Normalised (x, y, z, 4) float32 image, WT mask (x, y, z) uint8 (or None), geometry."""
    volume = read_volume(case.image, np.float32)
    if volume.array.ndim != 4 or volume.array.shape[-1] != len(DECATHLON_CHANNELS):
        raise DataError(f"{case.image}: expected a 4D image (x, y, z, {len(DECATHLON_CHANNELS)}), "
                        f"got shape {volume.array.shape}")
    image = zscore_brain(volume.array)
    mask = None
    if case.label is not None:
        labels = read_volume(case.label)
        if labels.array.shape != image.shape[:3]:
            raise DataError(f"{case.label}: label shape {labels.array.shape} differs from image shape "
                            f"{image.shape[:3]}")
        mask = whole_tumour(check_labels(labels.array, label_set, case.label))
    return image, mask, volume.geometry


@dataclass(frozen=True)
class CaseArrays:
    """Where a case's normalised arrays live: the cache (memory-mapped) or its NIfTI."""

    case: DecathlonCase
    image_file: Path | None = None
    mask_file: Path | None = None

    def load(self, label_set: frozenset[int] = DEFAULT_LABEL_SET) -> tuple[np.ndarray, np.ndarray]:
        if self.image_file is not None:
            return np.load(self.image_file, mmap_mode="r"), np.load(self.mask_file, mmap_mode="r")
        image, mask, _ = load_case(self.case, label_set)
        return image, mask


def build_cache(index: DecathlonIndex, cache_dir: Path, progress: bool = True) -> list[CaseArrays]:
    """Write normalised .npy copies of every training case (skipping up-to-date ones)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    arrays = []
    for case in tqdm(index.training, desc="cache decathlon", unit="case", disable=not progress):
        image_file = cache_dir / f"{case.case_id}.image.npy"
        mask_file = cache_dir / f"{case.case_id}.mask.npy"
        stamp = cache_dir / f"{case.case_id}.source.json"
        source = {"image": str(case.image), "image_mtime": os.stat(case.image).st_mtime,
                  "label": str(case.label), "label_mtime": os.stat(case.label).st_mtime}
        if not (image_file.exists() and mask_file.exists() and _stamp_matches(stamp, source)):
            image, mask, _ = load_case(case, index.label_set)
            for target, values in ((image_file, image), (mask_file, mask)):
                with atomic_file(target) as tmp, open(tmp, "wb") as handle:
                    np.save(handle, values)
            with atomic_file(stamp) as tmp:
                tmp.write_text(json.dumps(source))
        arrays.append(CaseArrays(case, image_file, mask_file))
    return arrays


def case_arrays(index: DecathlonIndex, cache_dir: Path | None) -> dict[str, CaseArrays]:
    """Per case: the cache when it is complete for that case, else the NIfTI source."""
    result = {}
    for case in index.training:
        image_file = mask_file = None
        if cache_dir is not None:
            candidate = Path(cache_dir) / f"{case.case_id}.image.npy"
            if candidate.exists() and candidate.with_name(f"{case.case_id}.mask.npy").exists():
                image_file, mask_file = candidate, candidate.with_name(f"{case.case_id}.mask.npy")
        result[case.case_id] = CaseArrays(case, image_file, mask_file)
    return result


def _stamp_matches(stamp: Path, source: dict) -> bool:
    try:
        return json.loads(stamp.read_text()) == source
    except (OSError, ValueError):
        return False


def prepare_decathlon(root: Path, cache_dir: Path | None, split: SplitSettings, split_file: Path,
                      progress: bool = True, overwrite: bool = False) -> dict[str, list[str]]:
    """Validate every training case (by loading it), optionally cache it, save the split.

    Re-running is idempotent; an existing split file that would change is kept unless
    ``overwrite`` (a silently reshuffled split would leak test cases into training).
    """
    index = read_index(root)
    cases = split_cases([c.case_id for c in index.training], split.val_fraction,
                        split.test_fraction, split.seed)
    if Path(split_file).exists() and not overwrite and load_split(split_file) != cases:
        raise UserError(f"{split_file}: a different split already exists (pass --overwrite to replace it)")
    if cache_dir is not None:
        build_cache(index, cache_dir, progress)
    else:
        for case in tqdm(index.training, desc="check decathlon", unit="case", disable=not progress):
            load_case(case, index.label_set)
    save_split(split_file, cases, split.seed, root)
    return cases


__all__ = ["DecathlonCase", "DecathlonIndex", "read_index", "load_case", "build_cache",
           "case_arrays", "prepare_decathlon", "channel_indices", "MODALITIES"]
