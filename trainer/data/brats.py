"""Find BraTS cases on disk (2017-2020 layouts, .nii or .nii.gz, any suffix case)."""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.config.settings import MODALITIES
from trainer.data.nifti import DEFAULT_MAX_VOXELS, Volume, is_nifti_name, read_volume, strip_nifti_suffix
from trainer.errors import DataError

BRATS_LABEL_SET = frozenset({0, 1, 2, 4})
_SUFFIX = re.compile(r"_(flair|t1ce|t1|t2|seg)$", re.IGNORECASE)


@dataclass(frozen=True)
class BratsCase:
    case_id: str
    folder: Path
    images: dict[str, Path]  # modality -> file
    seg: Path | None


def is_brats_file(name: str) -> bool:
    """A BraTS case's file by name: ``*_flair/_t1/_t1ce/_t2/_seg.nii[.gz]``, any case, no ``._*`` file."""
    return is_nifti_name(name) and bool(_SUFFIX.search(strip_nifti_suffix(name)))


def discover_brats(root: Path, require_seg: bool = True) -> list[BratsCase]:
    """Every case folder below ``root`` (HGG/LGG split or flat), sorted by case id."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: BraTS folder not found")
    cases = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found: dict[str, Path] = {}
        for name in sorted(files):
            if not is_nifti_name(name):
                continue
            match = _SUFFIX.search(strip_nifti_suffix(name))
            if not match:
                continue
            key = match.group(1).lower()
            if key in found:
                raise DataError(f"{Path(folder) / name}: second '{key}' file in the case folder "
                                f"(already have {found[key].name})")
            found[key] = Path(folder) / name
        if found:
            cases.append(_make_case(Path(folder), found, require_seg))
    if not cases:
        raise DataError(f"{root}: no BraTS cases found (expected case folders holding "
                        f"*_flair/_t1/_t1ce/_t2[/_seg].nii[.gz])")
    ids = [case.case_id for case in cases]
    if len(set(ids)) != len(ids):
        dup = sorted(i for i, seen in Counter(ids).items() if seen > 1)[0]
        raise DataError(f"{root}: case id {dup!r} appears in more than one folder")
    return sorted(cases, key=lambda case: case.case_id)


def _make_case(folder: Path, found: dict[str, Path], require_seg: bool) -> BratsCase:
    for modality in MODALITIES:
        if modality not in found:
            raise DataError(f"{folder}: missing modality '{modality}' "
                            f"(expected a file ending _{modality}.nii or _{modality}.nii.gz)")
    if require_seg and "seg" not in found:
        raise DataError(f"{folder}: missing segmentation (expected a file ending _seg.nii.gz); "
                        f"unlabelled validation cases cannot be used for training")
    return BratsCase(case_id=folder.name, folder=folder,
                     images={m: found[m] for m in MODALITIES}, seg=found.get("seg"))


def read_brats_case(case: BratsCase, modalities=MODALITIES, max_voxels: int = DEFAULT_MAX_VOXELS
                    ) -> tuple[np.ndarray, np.ndarray | None, Volume]:
    """(x, y, z, c) float32 image, (x, y, z) uint8 labels (or None), and the first volume (geometry)."""
    volumes = [read_volume(case.images[m], np.float32, max_voxels) for m in modalities]
    first = volumes[0]
    for volume in volumes[1:]:
        if volume.array.shape != first.array.shape:
            raise DataError(f"{volume.path}: shape {volume.array.shape} differs from "
                            f"{first.path.name} {first.array.shape}")
    image = np.stack([v.array for v in volumes], axis=-1)
    labels = None
    if case.seg is not None:
        seg = read_volume(case.seg, max_voxels=max_voxels)
        if seg.array.shape != first.array.shape:
            raise DataError(f"{case.seg}: seg shape {seg.array.shape} differs from image shape "
                            f"{first.array.shape}")
        labels = check_labels(seg.array, BRATS_LABEL_SET, case.seg)
    return image, labels, first


def check_labels(array: np.ndarray, allowed: frozenset[int], path: Path) -> np.ndarray:
    if np.issubdtype(array.dtype, np.floating) and not np.all(array == np.round(array)):
        raise DataError(f"{path}: non-integer label values; expected {sorted(allowed)}")
    values = set(np.unique(array).astype(int).tolist())
    extra = values - allowed
    if extra:
        raise DataError(f"{path}: label value(s) {sorted(extra)} outside the dataset's label set "
                        f"{sorted(allowed)}")
    return array.astype(np.uint8, copy=False)
