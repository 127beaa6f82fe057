"""What ``predict`` accepts, in the forms users already have on disk: each registered layout's
(trainer.data.layouts) unlabelled cases.

* a BraTS case folder (``CASE/CASE_flair.nii.gz`` ... ``_t2``): labels written in BraTS' 0/1/2/4;
* a 4D NIfTI (Decathlon ``imagesTr/BRATS_001.nii.gz``, channels last): labels in 0/1/2/3;
* nnU-Net channel files, ``CASE_0000.nii.gz`` ... ``CASE_0003.nii.gz`` (what ``nnUNetv2_predict -i``
  reads): in the channel order of the nnU-Net dataset.json beside their folder, else Decathlon
  Task01's (FLAIR, T1, T1ce, T2); labels in 0/1/2/3.

``-i FOLDER`` takes every case in the folder, in any of these forms (a Decathlon or nnU-Net dataset
folder: its imagesTs); positional paths name one case each (a case folder, a 4D NIfTI, or one of a
case's channel files).
"""
from __future__ import annotations

from pathlib import Path

from trainer.data.layouts import InputCase, registered
from trainer.data.nifti import is_nifti_name
from trainer.errors import DataError

CaseInput = InputCase  # the name predict has always used


def case_from_path(path: Path) -> CaseInput:
    """A positional input: a BraTS case folder, a 4D NIfTI, or one of a case's channel files."""
    path = Path(path)
    if path.is_dir() or is_nifti_name(path.name):
        for layout in registered():
            case = layout.input_case(path)
            if case is not None:
                return case
    raise DataError(f"{path}: expected a BraTS case folder, a 4D .nii/.nii.gz, or a CASE_0000.nii.gz "
                    f"channel file")


def cases_in_folder(folder: Path) -> list[CaseInput]:
    """Every case in ``-i FOLDER``: channel-file groups, 4D NIfTI files and BraTS case folders."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: -i expects a folder of cases (CASE_0000.nii.gz ... files, 4D NIfTI files "
                        f"or BraTS case folders)")
    cases: list[CaseInput] = []
    claimed: set[Path] = set()  # a file is one layout's: the first to take it (nnU-Net's before any 4D NIfTI)
    for layout in registered():
        found = layout.input_cases(folder, frozenset(claimed))
        claimed.update(path for case in found for path in case.paths)
        cases += found
    if not cases:
        raise DataError(f"{folder}: no cases found (expected CASE_0000.nii.gz ... CASE_0003.nii.gz files, 4D "
                        f"NIfTI files or BraTS case folders)")
    names = [case.name for case in cases]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DataError(f"{folder}: case {repeated[0]!r} is given twice (two inputs would write one output)")
    return sorted(cases, key=lambda case: case.name)
