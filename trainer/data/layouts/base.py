"""What a dataset layout is: the ``Layout`` interface, the two plain records every layout gives, and
the registry of layouts.

* ``RawCase``: one labelled case of a raw dataset (what ``prepare``, ``plan``, training and
  evaluation read). Plain data, so it pickles to prepare's spawn workers; it finds its layout by
  name when it is read.
* ``InputCase``: one unlabelled case for ``predict`` (a BraTS case folder, a 4D NIfTI, a set of
  channel files ...), read the same way.

Whatever the layout, a case reads as a (x, y, z, 4) float32 image in the order flair, t1, t1ce, t2
(z-scored over the brain unless asked otherwise), canonical labels (trainer.data.regions) and the
source geometry.

The registry (``LAYOUTS``, filled by trainer/data/layouts/__init__.py) is ordered: where two layouts
could both claim something, the first wins (BraTS case folders, then nnU-Net channel files
``CASE_0000``, then any other NIfTI as a Decathlon 4D image).
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from trainer.data.description import read_description
from trainer.data.nifti import DEFAULT_MAX_VOXELS, Geometry, is_nifti_name
from trainer.data.regions import LabelConvention
from trainer.errors import DataError


@dataclass(frozen=True)
class RawCase:
    """One labelled case of a raw dataset (picklable: prepare's workers get it)."""

    case_id: str
    layout: str                # the registered layout's name
    images: tuple[Path, ...]   # the files the layout reads: four modality files, or one 4D file
    label: Path | None
    label_set: frozenset[int]  # the values its label file may hold (the layout's convention)
    max_voxels: int = DEFAULT_MAX_VOXELS

    def load(self, normalise: bool = True) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
        """(x, y, z, 4) float32 image (z-scored over the brain, or as stored), canonical labels
        (x, y, z) uint8 or None, geometry."""
        return named(self.layout).read(self, normalise)

    def stamp(self) -> dict:
        """What a cache of this case was made from: each file's name, size and modification time
        (not its path: the same files reached through another path, a symlink or a mount, match)."""
        files = [*self.images, *([self.label] if self.label is not None else [])]
        return {"files": [[Path(p).name, (info := os.stat(p)).st_size, info.st_mtime_ns] for p in files]}


@dataclass(frozen=True)
class InputCase:
    """One case to predict: its name (the output's file name), its layout and its image files."""

    name: str
    kind: str                # the layout's name
    paths: tuple[Path, ...]  # four modality files in the order flair, t1, t1ce, t2, or one 4D file

    def load(self, max_voxels: int = DEFAULT_MAX_VOXELS
             ) -> tuple[np.ndarray, Geometry, LabelConvention]:
        """(normalised (x, y, z, 4) image, geometry, the convention its predictions are written in)."""
        layout = named(self.kind)
        image, geometry = layout.read_input(self, max_voxels)
        return image, geometry, layout.convention

    def folders(self) -> list[Path]:
        """The folders that are input for this case (an output folder must be none of them)."""
        return named(self.kind).input_folders(self)


class Layout(ABC):
    """One on-disk dataset layout. Instances are stateless; register one in trainer/data/layouts."""

    name: ClassVar[str]                    # "brats": settings, manifests, --format
    title: ClassVar[str]                   # "BraTS 2017-2020": for people
    usual_model: ClassVar[str]             # the model prepare prepares for when none is named
    convention: ClassVar[LabelConvention]  # how its label files (and predictions written for it) number regions
    signature: ClassVar[str]               # what tells its folders apart: "{folder} {signature}, so it is a ..."
    absent: ClassVar[str]                  # what detection says of a folder that is not of this layout

    @abstractmethod
    def matches(self, root: Path) -> bool:
        """Whether the folder ``root`` is a dataset of this layout, by what it holds (cheap: no volume read)."""

    @abstractmethod
    def cases(self, root: Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[RawCase, ...]:
        """Its labelled cases, sorted by id, every file checked to exist; bad data raise DataError."""

    @abstractmethod
    def read(self, case: RawCase, normalise: bool = True) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
        """One labelled case: image, canonical labels (or None), geometry."""

    def listing(self, root: Path) -> Path:
        """The file that lists its cases, or the folder that holds them (for messages)."""
        return Path(root)

    @abstractmethod
    def input_cases(self, folder: Path, claimed: frozenset[Path] = frozenset()) -> list[InputCase]:
        """``predict -i FOLDER``: the cases in this layout's form in ``folder`` (or, for a dataset
        folder of this layout, its unlabelled test cases), leaving out files in ``claimed``."""

    @abstractmethod
    def input_case(self, path: Path) -> InputCase | None:
        """A positional ``predict`` input: the case ``path`` names, or None when it is not this layout's form."""

    @abstractmethod
    def read_input(self, case: InputCase, max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[np.ndarray, Geometry]:
        """One input case: normalised image and geometry."""

    def input_folders(self, case: InputCase) -> list[Path]:
        return sorted({Path(path).parent for path in case.paths})


def visible_files(folder: Path) -> list[Path]:
    """The NIfTI files directly in ``folder``, sorted, without hidden or macOS AppleDouble ``._*`` files."""
    return [path for path in sorted(Path(folder).iterdir())
            if not path.name.startswith(".") and path.is_file() and is_nifti_name(path.name)]


def dataset_json_keys(root: Path) -> set[str] | None:
    """The top-level keys of ``root/dataset.json``: None when there is no such file, an empty set when it
    is unreadable or not a JSON object (the layout that reads it says what is wrong)."""
    if not (Path(root) / "dataset.json").is_file():
        return None
    try:
        return set(read_description(root, "a dataset folder")[1])
    except DataError:
        return set()


# The registry: every layout, in order (trainer/data/layouts/__init__.py registers them).
LAYOUTS: list[Layout] = []


def register(layout: Layout) -> Layout:
    """Add a layout at the end of the list (a name registered twice is a programming error)."""
    if any(known.name == layout.name for known in LAYOUTS):
        raise ValueError(f"layout {layout.name!r} is registered twice")
    LAYOUTS.append(layout)
    return layout


def registered() -> tuple[Layout, ...]:
    return tuple(LAYOUTS)


def names() -> tuple[str, ...]:
    return tuple(layout.name for layout in LAYOUTS)


def named(name: str) -> Layout:
    for layout in LAYOUTS:
        if layout.name == name:
            return layout
    raise DataError(f"unknown dataset layout {name!r}; known layouts: {', '.join(names())}")


def detect(root: Path) -> Layout:
    """The layout of the dataset folder ``root``, told apart by what the folder holds."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found (expected a folder in one of the layouts "
                        f"{', '.join(names())})")
    for layout in LAYOUTS:
        if layout.matches(root):
            return layout
    found_none = "; ".join(f"{layout.name}: {layout.absent}" for layout in LAYOUTS)
    raise DataError(f"{root}: not a dataset folder of a known layout ({found_none})")
