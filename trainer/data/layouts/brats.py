"""BraTS challenge training data, 2017-2020: case folders of four modality files and ``_seg``.

``CASE/CASE_{flair,t1,t1ce,t2,seg}.nii[.gz]``, with or without the HGG/LGG level, the suffix in any
case; labels 0, 1 necrotic/non-enhancing core, 2 oedema, 4 enhancing (no 3). Validation releases
have no ``_seg``: they are predict inputs, not training cases. The readers are trainer.data.brats.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from trainer.config.settings import MODALITIES
from trainer.data.brats import BRATS_LABEL_SET, BratsCase, discover_brats, is_brats_file, read_brats_case
from trainer.data.layouts.base import InputCase, Layout, RawCase
from trainer.data.nifti import DEFAULT_MAX_VOXELS, Geometry
from trainer.data.normalize import zscore_brain
from trainer.data.regions import BRATS
from trainer.errors import DataError


class BratsLayout(Layout):
    name = "brats"
    title = "BraTS 2017-2020"
    usual_model = "2d"
    convention = BRATS
    signature = "has no dataset.json"
    absent = "no BraTS cases (case folders holding *_flair/_t1/_t1ce/_t2[/_seg].nii[.gz])"

    def matches(self, root: Path) -> bool:
        return not (Path(root) / "dataset.json").exists() and _holds_brats_files(root)

    def cases(self, root: Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[RawCase, ...]:
        return tuple(RawCase(c.case_id, self.name, tuple(c.images[m] for m in MODALITIES), c.seg, BRATS_LABEL_SET,
                             max_voxels) for c in discover_brats(root, require_seg=True))

    def read(self, case: RawCase, normalise: bool = True) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
        found = BratsCase(case.case_id, case.images[0].parent, dict(zip(MODALITIES, case.images)), case.label)
        image, labels, first = read_brats_case(found, MODALITIES, case.max_voxels)
        return (zscore_brain(image) if normalise else image, None if labels is None else BRATS.canonical(labels),
                first.geometry)

    def input_cases(self, folder: Path, claimed: frozenset[Path] = frozenset()) -> list[InputCase]:
        """Every case folder below the sub-folders of ``folder`` (a folder of cases, HGG/LGG or flat); a
        sub-folder with no BraTS-named file (a Decathlon or nnU-Net imagesTs, say) is not BraTS's."""
        cases = []
        for sub in sorted(Path(folder).iterdir()):
            if sub.name.startswith(".") or not sub.is_dir() or not _holds_brats_files(sub):
                continue
            cases += [_input(case) for case in discover_brats(sub, require_seg=False)
                      if not claimed & set(case.images.values())]
        return cases

    def input_case(self, path: Path) -> InputCase | None:
        path = Path(path)
        if not path.is_dir():
            return None
        cases = discover_brats(path, require_seg=False)
        if len(cases) != 1:
            raise DataError(f"{path}: expected one BraTS case folder, found {len(cases)} cases (use -i FOLDER "
                            f"for a folder of cases)")
        return _input(cases[0])

    def read_input(self, case: InputCase, max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[np.ndarray, Geometry]:
        found = BratsCase(case.name, case.paths[0].parent, dict(zip(MODALITIES, case.paths)), None)
        image, _, first = read_brats_case(found, max_voxels=max_voxels)
        return zscore_brain(image), first.geometry

    def input_folders(self, case: InputCase) -> list[Path]:
        """The case folder and the folder of cases around it."""
        folder = case.paths[0].parent
        return [folder, folder.parent]


def _input(case: BratsCase) -> InputCase:
    return InputCase(case.case_id, BratsLayout.name, tuple(case.images[m] for m in MODALITIES))


def _holds_brats_files(root: Path) -> bool:
    """Whether any BraTS-named NIfTI (``*_flair.nii.gz`` ... ``*_seg.nii``) lies below ``root``."""
    for _, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(is_brats_file(name) for name in files):
            return True
    return False
