"""What ``predict`` accepts, in the forms users already have on disk.

* a BraTS case folder (``CASE/CASE_flair.nii.gz`` ... ``_t2``): labels written in BraTS' 0/1/2/4;
* a 4D NIfTI (Decathlon ``imagesTr/BRATS_001.nii.gz``, channels last): labels in 0/1/2/3;
* nnU-Net channel files, ``CASE_0000.nii.gz`` ... ``CASE_0003.nii.gz`` (what ``nnUNetv2_predict -i``
  reads): FLAIR, T1, T1ce, T2 in that order, Decathlon Task01's channel order; labels in 0/1/2/3.

``-i FOLDER`` takes every case in the folder, in any of these forms; positional paths name one
case each (a case folder, a 4D NIfTI, or one of a case's channel files).
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.config.settings import MODALITIES
from trainer.data.brats import BratsCase, discover_brats, read_brats_case
from trainer.data.nifti import DEFAULT_MAX_VOXELS, Geometry, is_nifti_name, read_volume, strip_nifti_suffix
from trainer.data.normalize import zscore_brain
from trainer.errors import DataError
from trainer.regions import BRATS, LabelConvention

CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>[0-9]{4})$")
CHANNEL_ORDER = MODALITIES  # _0000 = flair, _0001 = t1, _0002 = t1ce, _0003 = t2


@dataclass(frozen=True)
class CaseInput:
    """One case to predict: its name (the output's file name) and where its images are."""

    name: str
    kind: str  # "brats" | "4d" | "channels"
    paths: tuple[Path, ...]

    def load(self, max_voxels: int = DEFAULT_MAX_VOXELS
             ) -> tuple[np.ndarray, Geometry, LabelConvention | None]:
        """(normalised (x, y, z, 4) image, geometry, label convention: BraTS, or None = canonical 0/1/2/3)."""
        if self.kind == "4d":
            volume = read_volume(self.paths[0], np.float32, max_voxels)
            if volume.array.ndim != 4 or volume.array.shape[-1] != len(MODALITIES):
                raise DataError(f"{self.paths[0]}: expected a 4D image with 4 modalities (flair, t1, t1ce, t2), "
                                f"got shape {volume.array.shape}; pass a BraTS case folder for separate files")
            return zscore_brain(volume.array), volume.geometry, None
        case = BratsCase(self.name, self.paths[0].parent, dict(zip(MODALITIES, self.paths)), None)
        image, _, first = read_brats_case(case, max_voxels=max_voxels)
        return zscore_brain(image), first.geometry, BRATS if self.kind == "brats" else None


def case_from_path(path: Path) -> CaseInput:
    """A positional input: a BraTS case folder, a 4D NIfTI, or one of a case's channel files."""
    path = Path(path)
    if path.is_dir():
        cases = discover_brats(path, require_seg=False)
        if len(cases) != 1:
            raise DataError(f"{path}: expected one BraTS case folder, found {len(cases)} cases (use -i FOLDER "
                            f"for a folder of cases)")
        return _brats_input(cases[0])
    if not is_nifti_name(path.name):
        raise DataError(f"{path}: expected a BraTS case folder, a 4D .nii/.nii.gz, or a CASE_0000.nii.gz "
                        f"channel file")
    match = CHANNEL_FILE.match(strip_nifti_suffix(path.name))
    if match:
        siblings = [p for p in path.parent.iterdir() if _channel_match(p, match.group("case"))]
        return _channel_input(match.group("case"), siblings, path.parent)
    return CaseInput(strip_nifti_suffix(path.name), "4d", (path,))


def cases_in_folder(folder: Path) -> list[CaseInput]:
    """Every case in ``-i FOLDER``: channel-file groups, 4D NIfTI files and BraTS case folders."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: -i expects a folder of cases (CASE_0000.nii.gz ... files, 4D NIfTI files "
                        f"or BraTS case folders)")
    groups: dict[str, list[Path]] = defaultdict(list)
    cases: list[CaseInput] = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):  # macOS AppleDouble ._* files, hidden folders
            continue
        if path.is_dir():
            cases += [_brats_input(case) for case in discover_brats(path, require_seg=False)]
        elif is_nifti_name(path.name):
            match = CHANNEL_FILE.match(strip_nifti_suffix(path.name))
            if match:
                groups[match.group("case")].append(path)
            else:
                cases.append(CaseInput(strip_nifti_suffix(path.name), "4d", (path,)))
    cases += [_channel_input(name, paths, folder) for name, paths in groups.items()]
    if not cases:
        raise DataError(f"{folder}: no cases found (expected CASE_0000.nii.gz ... CASE_0003.nii.gz files, 4D "
                        f"NIfTI files or BraTS case folders)")
    names = [case.name for case in cases]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DataError(f"{folder}: case {repeated[0]!r} is given twice (two inputs would write one output)")
    return sorted(cases, key=lambda case: case.name)


def _brats_input(case: BratsCase) -> CaseInput:
    return CaseInput(case.case_id, "brats", tuple(case.images[m] for m in MODALITIES))


def _channel_match(path: Path, case: str) -> bool:
    if path.name.startswith(".") or not is_nifti_name(path.name):
        return False
    match = CHANNEL_FILE.match(strip_nifti_suffix(path.name))
    return bool(match) and match.group("case") == case


def _channel_input(case: str, paths: list[Path], folder: Path) -> CaseInput:
    by_channel: dict[int, Path] = {}
    for path in paths:
        channel = int(CHANNEL_FILE.match(strip_nifti_suffix(path.name)).group("channel"))
        if channel in by_channel:
            raise DataError(f"{path}: second file for channel {channel:04d} of case {case!r} "
                            f"(already have {by_channel[channel].name})")
        by_channel[channel] = path
    expected = list(range(len(CHANNEL_ORDER)))
    if sorted(by_channel) != expected:
        have = ", ".join(f"_{c:04d}" for c in sorted(by_channel)) or "none"
        raise DataError(f"{folder}: case {case!r} has channel files {have}; expected exactly _0000 ... _0003 "
                        f"({', '.join(CHANNEL_ORDER)})")
    return CaseInput(case, "channels", tuple(by_channel[c] for c in expected))
