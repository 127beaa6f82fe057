"""The one seam between on-disk layouts and everything else.

A raw dataset is a folder in either real layout, told apart by what it holds: a Decathlon
Task01 folder has ``dataset.json`` (4D NIfTI + label files, labels 0/1/2/3), anything else is
read as BraTS 2017-2020 (case folders of four modality files + ``_seg``, labels 0/1/2/4). Every
case reads the same way, whatever the layout: a z-scored (x, y, z, 4) image in the order
flair, t1, t1ce, t2, canonical labels (trainer.regions) and the source geometry. So both
models train, evaluate and predict on both layouts; which *prepared* data a model trains on
(slices for 2D, volumes for 3D) is the model's business, not the layout's.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from trainer.config.settings import MODALITIES, Settings
from trainer.data.brats import BRATS_LABEL_SET, BratsCase, discover_brats, read_brats_case
from trainer.data.decathlon import DecathlonCase, load_case, read_index
from trainer.data.nifti import DEFAULT_MAX_VOXELS, Geometry
from trainer.data.normalize import zscore_brain
from trainer.data.split import load_split, split_path_for
from trainer.errors import DataError
from trainer.regions import BRATS, DECATHLON, LabelConvention

LAYOUTS = ("brats", "decathlon")


def detect_layout(root: Path) -> str:
    """'decathlon' for a folder holding dataset.json, else 'brats'."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found (expected a BraTS folder or a Decathlon Task01 folder "
                        f"holding dataset.json)")
    return "decathlon" if (root / "dataset.json").exists() else "brats"


@dataclass(frozen=True)
class RawCase:
    """One labelled case of a raw dataset, in either layout (picklable: prepare's workers get it)."""

    case_id: str
    layout: str
    images: tuple[Path, ...]  # brats: the flair, t1, t1ce, t2 files; decathlon: one 4D file
    label: Path | None
    label_set: frozenset[int]
    max_voxels: int = DEFAULT_MAX_VOXELS

    def load(self, normalise: bool = True) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
        """(x, y, z, 4) float32 image (z-scored over the brain, or as stored), canonical labels
        (x, y, z) uint8 or None, geometry."""
        if self.layout == "decathlon":
            return load_case(DecathlonCase(self.case_id, self.images[0], self.label), self.label_set,
                             self.max_voxels, normalise)
        case = BratsCase(self.case_id, self.images[0].parent, dict(zip(MODALITIES, self.images)), self.label)
        image, labels, first = read_brats_case(case, MODALITIES, self.max_voxels)
        return (zscore_brain(image) if normalise else image, None if labels is None else BRATS.canonical(labels),
                first.geometry)

    def stamp(self) -> dict:
        """What a cache of this case was made from (paths and modification times)."""
        files = [*self.images, *([self.label] if self.label is not None else [])]
        return {"files": [str(p) for p in files], "mtimes": [os.stat(p).st_mtime for p in files]}


@dataclass(frozen=True)
class RawDataset:
    layout: str
    root: Path
    cases: tuple[RawCase, ...]  # labelled cases, sorted by id
    convention: LabelConvention  # how its label files spell the regions

    @classmethod
    def open(cls, root: Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> "RawDataset":
        root = Path(root)
        layout = detect_layout(root)
        if layout == "decathlon":
            index = read_index(root, max_voxels)
            cases = tuple(RawCase(c.case_id, layout, (c.image,), c.label, index.label_set, max_voxels)
                          for c in index.training)
            return cls(layout, root, cases, DECATHLON)
        found = discover_brats(root, require_seg=True)
        cases = tuple(RawCase(c.case_id, layout, tuple(c.images[m] for m in MODALITIES), c.seg, BRATS_LABEL_SET,
                              max_voxels) for c in found)
        return cls(layout, root, cases, BRATS)

    def by_id(self) -> dict[str, RawCase]:
        return {case.case_id: case for case in self.cases}

    def describe(self) -> str:
        """The file that lists the cases (Decathlon's dataset.json) or the folder that holds them."""
        where = self.root / "dataset.json" if self.layout == "decathlon" else self.root
        return f"{where} ({self.layout}, {len(self.cases)} labelled cases)"


# What each model trains on: its prepared data, the split file beside it, and the setting that
# names the raw dataset the split was made from.
@dataclass(frozen=True)
class PreparedData:
    raw_key: str      # data.brats_dir | data.decathlon_dir: the model's raw dataset (either layout)
    kind: str         # "slices" (HDF5) | "volumes" (a .npy cache, optional)

    @property
    def raw_field(self) -> str:
        """The raw_key's field in the data section (brats_dir | decathlon_dir)."""
        return self.raw_key.split(".")[1]

    def raw_dir(self, settings: Settings) -> Path:
        return Path(getattr(settings.data, self.raw_field))

    def split_file(self, settings: Settings) -> Path:
        data = settings.data
        return split_path_for(data.slices_h5) if self.kind == "slices" else Path(data.decathlon_split)

    def path(self, settings: Settings) -> Path:
        """The prepared data themselves (for messages): the slices file or the split of the volumes."""
        return Path(settings.data.slices_h5) if self.kind == "slices" else self.split_file(settings)


PREPARED = {"2d": PreparedData("data.brats_dir", "slices"), "3d": PreparedData("data.decathlon_dir", "volumes")}


def prepared_for(settings: Settings) -> PreparedData:
    return PREPARED[settings.train.model]


def raw_source(settings: Settings) -> tuple[str, Path]:
    """The setting and the folder that hold the model's raw, whole volumes (either layout)."""
    prepared = prepared_for(settings)
    return prepared.raw_key, prepared.raw_dir(settings)


def raw_dataset(settings: Settings) -> RawDataset:
    return RawDataset.open(raw_source(settings)[1], settings.data.max_voxels)


@dataclass(frozen=True)
class LabelledCase:
    case_id: str
    image: np.ndarray   # normalised (x, y, z, 4)
    labels: np.ndarray  # canonical labels (x, y, z) uint8
    geometry: Geometry


def split_cases_of(settings: Settings, split_name: str, dataset: RawDataset) -> list[RawCase]:
    """The raw cases of one split of the model's prepared data, checked against the dataset."""
    split_file = prepared_for(settings).split_file(settings)
    ids = load_split(split_file)[split_name]
    by_id = dataset.by_id()
    missing = [i for i in ids if i not in by_id]
    if missing:  # e.g. a split made from another dataset: say so before loading a model
        raise DataError(f"{split_file}: split case {missing[0]} is not a labelled case of {dataset.describe()}")
    return [by_id[i] for i in ids]


def iter_cases(settings: Settings, split_name: str, limit: int | None,
               dataset: RawDataset | None = None) -> tuple[int, Iterator[LabelledCase]]:
    """The split's cases, read one at a time from the raw dataset (either layout)."""
    dataset = dataset or raw_dataset(settings)
    cases = split_cases_of(settings, split_name, dataset)
    cases = cases[:limit] if limit else cases

    def read():
        for case in cases:
            image, labels, geometry = case.load()
            yield LabelledCase(case.case_id, image, labels, geometry)
    return len(cases), read()
