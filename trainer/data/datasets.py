"""The one seam between on-disk layouts and everything else.

A raw dataset is a folder in one of the registered layouts (trainer.data.layouts: BraTS 2017-2020,
Decathlon Task01, nnU-Net v2 raw), told apart by what it holds. Every case reads the same way,
whatever the layout: a z-scored (x, y, z, 4) image in the order flair, t1, t1ce, t2, canonical
labels (trainer.data.regions) and the source geometry. So both models train, evaluate and predict on
every layout; which *prepared* data a model trains on (slices for 2D, volumes for 3D) is the model's
business, not the layout's.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer.data.layouts import LAYOUT_NAMES, RawCase, detect, named
from trainer.data.nifti import DEFAULT_MAX_VOXELS
from trainer.data.regions import LabelConvention

LAYOUTS = LAYOUT_NAMES
__all__ = ["LAYOUTS", "RawCase", "RawDataset", "detect_layout"]


def detect_layout(root: Path) -> str:
    """The name of the registered layout that the folder ``root`` is in (DataError when none)."""
    return detect(root).name


@dataclass(frozen=True)
class RawDataset:
    layout: str
    root: Path
    cases: tuple[RawCase, ...]  # labelled cases, sorted by id
    convention: LabelConvention  # how its label files spell the regions

    @classmethod
    def open(cls, root: Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> "RawDataset":
        root = Path(root)
        layout = detect(root)
        return cls(layout.name, root, layout.cases(root, max_voxels), layout.convention)

    def by_id(self) -> dict[str, RawCase]:
        return {case.case_id: case for case in self.cases}

    def describe(self) -> str:
        """The file that lists the cases (Decathlon's dataset.json) or the folder that holds them."""
        return f"{named(self.layout).listing(self.root)} ({self.layout}, {len(self.cases)} labelled cases)"
