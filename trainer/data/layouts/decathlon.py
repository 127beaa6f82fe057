"""Medical Segmentation Decathlon Task01_BrainTumour: ``dataset.json`` listing 4D NIfTI cases.

``imagesTr/BRATS_001.nii.gz`` (x, y, z, 4: FLAIR, T1w, t1gd, T2w), ``labelsTr/`` with labels 0
background, 1 oedema, 2 non-enhancing tumour, 3 enhancing tumour, ``imagesTs/`` unlabelled. Its
``dataset.json`` has ``modality`` and ``training`` (nnU-Net v2's has ``channel_names`` and
``file_ending`` instead). The readers are trainer.data.decathlon.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from trainer.config.settings import MODALITIES
from trainer.data.decathlon import DecathlonCase, load_case, read_index
from trainer.data.layouts.base import InputCase, Layout, RawCase, dataset_json_keys, visible_files
from trainer.data.nifti import DEFAULT_MAX_VOXELS, Geometry, is_nifti_name, read_volume, strip_nifti_suffix
from trainer.data.normalize import zscore_brain
from trainer.data.regions import DECATHLON
from trainer.errors import DataError

NNUNET_V2_KEYS = {"channel_names", "file_ending"}  # what v2 renamed or added: not a Decathlon description


class DecathlonLayout(Layout):
    name = "decathlon"
    title = "Decathlon Task01_BrainTumour"
    usual_model = "3d"
    convention = DECATHLON
    signature = "holds dataset.json"
    absent = "no Decathlon dataset.json (with 'training' and 'modality')"

    def matches(self, root: Path) -> bool:
        """A folder with dataset.json that is not nnU-Net v2's; an unreadable one is Decathlon's to refuse."""
        keys = dataset_json_keys(root)
        return keys is not None and not keys & NNUNET_V2_KEYS

    def cases(self, root: Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[RawCase, ...]:
        index = read_index(root, max_voxels)
        return tuple(RawCase(c.case_id, self.name, (c.image,), c.label, index.label_set, max_voxels)
                     for c in index.training)

    def read(self, case: RawCase, normalise: bool = True) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
        return load_case(DecathlonCase(case.case_id, case.images[0], case.label), case.label_set, case.max_voxels,
                         normalise)

    def listing(self, root: Path) -> Path:
        return Path(root) / "dataset.json"

    def input_cases(self, folder: Path, claimed: frozenset[Path] = frozenset()) -> list[InputCase]:
        """The 4D NIfTI files in ``folder``; for a Decathlon dataset folder, its imagesTs."""
        folder = Path(folder)
        if self.matches(folder):
            folder = folder / "imagesTs"
            if not folder.is_dir():
                return []
        return [_input(path) for path in visible_files(folder) if path not in claimed]

    def input_case(self, path: Path) -> InputCase | None:
        path = Path(path)
        return None if path.is_dir() or not is_nifti_name(path.name) else _input(path)

    def read_input(self, case: InputCase, max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[np.ndarray, Geometry]:
        volume = read_volume(case.paths[0], np.float32, max_voxels)
        if volume.array.ndim != 4 or volume.array.shape[-1] != len(MODALITIES):
            raise DataError(f"{case.paths[0]}: expected a 4D image with 4 modalities (flair, t1, t1ce, t2), "
                            f"got shape {volume.array.shape}; pass a BraTS case folder for separate files")
        return zscore_brain(volume.array), volume.geometry


def _input(path: Path) -> InputCase:
    return InputCase(strip_nifti_suffix(path.name), DecathlonLayout.name, (path,))
