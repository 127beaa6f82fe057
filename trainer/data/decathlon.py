"""Medical Segmentation Decathlon Task01_BrainTumour: dataset.json, 4D NIfTI, optional cache.

The 3D pipeline reads cases straight from the NIfTI files, or from a cache of normalised
float32 ``.npy`` copies (memory-mapped, so a crop reads only the bytes it needs).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from trainer.config.settings import MODALITIES, SplitSettings
from trainer.data.brats import check_labels
from trainer.data.nifti import DEFAULT_MAX_VOXELS, Geometry, read_volume
from trainer.data.normalize import zscore_brain
from trainer.data.split import load_split, save_split, split_cases
from trainer.errors import DataError, UserError
from trainer.fsutil import atomic_dir, refuse_existing
from trainer.regions import DECATHLON

log = logging.getLogger(__name__)

# Decathlon modality order in the 4th axis, in our channel names.
DECATHLON_CHANNELS = ("flair", "t1", "t1ce", "t2")
DEFAULT_LABEL_SET = DECATHLON.label_set
# Bumped when the cached arrays change meaning (2: canonical label maps instead of WT masks);
# a cache stamped with another version is stale and read from the NIfTI source instead.
CACHE_FORMAT = 2


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
              max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
    """Normalised (x, y, z, 4) float32 image, canonical labels (x, y, z) uint8 (or None), geometry."""
    volume = read_volume(case.image, np.float32, max_voxels)
    if volume.array.ndim != 4 or volume.array.shape[-1] != len(DECATHLON_CHANNELS):
        raise DataError(f"{case.image}: expected a 4D image (x, y, z, {len(DECATHLON_CHANNELS)}), "
                        f"got shape {volume.array.shape}")
    image = zscore_brain(volume.array)
    mask = None
    if case.label is not None:
        labels = read_volume(case.label, max_voxels=max_voxels)
        if labels.array.shape != image.shape[:3]:
            raise DataError(f"{case.label}: label shape {labels.array.shape} differs from image shape "
                            f"{image.shape[:3]}")
        mask = DECATHLON.canonical(check_labels(labels.array, label_set, case.label))
    return image, mask, volume.geometry


@dataclass(frozen=True)
class CaseArrays:
    """Where a case's normalised image and canonical labels live: the cache (memory-mapped) or its NIfTI."""

    case: DecathlonCase
    image_file: Path | None = None
    labels_file: Path | None = None
    max_voxels: int = DEFAULT_MAX_VOXELS

    def load(self, label_set: frozenset[int] = DEFAULT_LABEL_SET) -> tuple[np.ndarray, np.ndarray]:
        if self.image_file is not None:
            return np.load(self.image_file, mmap_mode="r"), np.load(self.labels_file, mmap_mode="r")
        image, mask, _ = load_case(self.case, label_set, self.max_voxels)
        return image, mask


def build_cache(index: DecathlonIndex, cache_dir: Path, progress: bool = True,
                overwrite: bool = False) -> list[CaseArrays]:
    """Write normalised .npy copies of every training case into ``cache_dir``, all or nothing.

    The cache is built in a temporary folder beside ``cache_dir`` and renamed into place only
    when every case is written: a bad case must not leave a partial cache, which
    :func:`case_arrays` would silently mix with NIfTI reads. An existing ``cache_dir`` is
    refused unless ``overwrite``; then its still up-to-date cases are hard-linked (or
    copied) into the new cache instead of being recomputed.
    """
    cache_dir = Path(cache_dir)
    previous = cache_dir if overwrite and cache_dir.is_dir() else None
    with atomic_dir(cache_dir, overwrite) as tmp:
        for case in tqdm(index.training, desc="cache decathlon", unit="case", disable=not progress):
            names = _cache_names(case.case_id)
            source = _source_stamp(case)
            if previous is not None and _reuse_cached(previous, tmp, names, source):
                continue
            image, mask, _ = load_case(case, index.label_set, index.max_voxels)
            np.save(tmp / names[0], image)
            np.save(tmp / names[1], mask)
            (tmp / names[2]).write_text(json.dumps(source))
    return [CaseArrays(case, *(cache_dir / name for name in _cache_names(case.case_id)[:2]))
            for case in index.training]


def _cache_names(case_id: str) -> tuple[str, str, str]:
    return f"{case_id}.image.npy", f"{case_id}.labels.npy", f"{case_id}.source.json"


def _reuse_cached(previous: Path, target: Path, names: tuple[str, str, str], source: dict) -> bool:
    """Link a case's files from the previous cache when its stamp matches the source NIfTI."""
    if not all((previous / name).is_file() for name in names) or not _stamp_matches(previous / names[2], source):
        return False
    for name in names:
        try:
            os.link(previous / name, target / name)
        except OSError:  # e.g. a filesystem without hard links
            shutil.copy2(previous / name, target / name)
    return True


def case_arrays(index: DecathlonIndex, cache_dir: Path | None) -> dict[str, CaseArrays]:
    """Per case: the cache when it is complete and still matches its NIfTI source (path and
    modification time, as stamped by prepare), else the NIfTI source itself."""
    result, stale = {}, []
    for case in index.training:
        image_file = mask_file = None
        if cache_dir is not None:
            image_name, labels_name, stamp_name = (Path(cache_dir) / n for n in _cache_names(case.case_id))
            if image_name.exists() and labels_name.exists() and _stamp_matches(stamp_name, _source_stamp(case)):
                image_file, mask_file = image_name, labels_name
            elif image_name.exists() or stamp_name.exists():
                stale.append(case.case_id)
        result[case.case_id] = CaseArrays(case, image_file, mask_file, index.max_voxels)
    if stale:
        log.warning("%s: cache of %d case(s) (%s) is older than its NIfTI source or than this unet-train's cache "
                    "format; reading the source "
                    "instead (refresh: unet-train prepare --format decathlon --overwrite)", cache_dir, len(stale),
                    ", ".join(stale[:3]) + (", ..." if len(stale) > 3 else ""))
    return result


def _source_stamp(case: DecathlonCase) -> dict:
    return {"format": CACHE_FORMAT, "image": str(case.image), "image_mtime": os.stat(case.image).st_mtime,
            "label": str(case.label), "label_mtime": os.stat(case.label).st_mtime}


def _stamp_matches(stamp: Path, source: dict) -> bool:
    try:
        return json.loads(stamp.read_text()) == source
    except (OSError, ValueError):
        return False


def prepare_decathlon(root: Path, cache_dir: Path | None, split: SplitSettings, split_file: Path,
                      progress: bool = True, overwrite: bool = False,
                      max_voxels: int = DEFAULT_MAX_VOXELS) -> dict[str, list[str]]:
    """Validate every training case (by loading it), optionally cache it, save the split.

    An existing split file that would change is kept unless ``overwrite`` (a silently
    reshuffled split would leak test cases into training); an identical one is accepted.
    An existing cache folder is refused unless ``overwrite`` (checked before any work).
    """
    index = read_index(root, max_voxels)
    cases = split_cases([c.case_id for c in index.training], split.val_fraction,
                        split.test_fraction, split.seed)
    if Path(split_file).exists() and not overwrite and load_split(split_file) != cases:
        raise UserError(f"{split_file}: a different split already exists (pass --overwrite to replace it)")
    if cache_dir is not None:
        refuse_existing(Path(cache_dir), overwrite)
        build_cache(index, cache_dir, progress, overwrite)
    else:
        for case in tqdm(index.training, desc="check decathlon", unit="case", disable=not progress):
            load_case(case, index.label_set, index.max_voxels)
    save_split(split_file, cases, split.seed, root)
    return cases


__all__ = ["DecathlonCase", "DecathlonIndex", "read_index", "load_case", "build_cache",
           "case_arrays", "prepare_decathlon", "channel_indices", "MODALITIES"]
