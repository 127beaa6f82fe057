"""BraTS tumour regions and the two label conventions, converted at the I/O edge only.

Inside unet-train every label map uses one *canonical* convention, the Decathlon one:
0 background, 1 oedema, 2 non-enhancing core / necrosis, 3 enhancing tumour. BraTS files
(0, 1 necrotic core, 2 oedema, 4 enhancing) are converted when read and converted back when
predictions are written, so a model, a cache or a metric never needs to know where its
data came from.

The evaluated regions are nested, as in the BraTS challenge:
whole tumour WT = {1, 2, 3} ⊇ tumour core TC = {2, 3} ⊇ enhancing tumour ET = {3}
(in BraTS terms WT = {1, 2, 4}, TC = {1, 4}, ET = {4}). A region model has one sigmoid
output per region (trained region-wise, as nnU-Net does for BraTS).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

RegionName = Literal["wt", "tc", "et"]
REGION_NAMES: tuple[str, ...] = ("wt", "tc", "et")
# canonical labels that belong to each region
REGION_LABELS: dict[str, frozenset[int]] = {"wt": frozenset({1, 2, 3}), "tc": frozenset({2, 3}),
                                            "et": frozenset({3})}
CANONICAL_LABELS = frozenset({0, 1, 2, 3})


@dataclass(frozen=True)
class LabelConvention:
    """How one dataset family numbers the sub-regions, and the map to/from canonical labels."""

    name: str
    to_canonical: dict[int, int]

    @property
    def label_set(self) -> frozenset[int]:
        return frozenset(self.to_canonical)

    def canonical(self, labels: np.ndarray) -> np.ndarray:
        """Source labels (already checked against ``label_set``) -> canonical uint8 labels."""
        lookup = np.zeros(max(self.to_canonical) + 1, np.uint8)
        for source, target in self.to_canonical.items():
            lookup[source] = target
        return lookup[np.asarray(labels, dtype=np.intp)]

    def source(self, canonical: np.ndarray) -> np.ndarray:
        """Canonical labels -> this convention's labels (uint8), e.g. for written predictions."""
        lookup = np.zeros(4, np.uint8)
        for source, target in self.to_canonical.items():
            lookup[target] = source
        return lookup[np.asarray(canonical, dtype=np.intp)]


BRATS = LabelConvention("brats", {0: 0, 2: 1, 1: 2, 4: 3})
DECATHLON = LabelConvention("decathlon", {0: 0, 1: 1, 2: 2, 3: 3})


@dataclass(frozen=True)
class RegionSet:
    """The regions a model predicts, in output-channel order (``model.regions``)."""

    names: tuple[str, ...] = ("wt",)

    def __post_init__(self):
        unknown = [n for n in self.names if n not in REGION_NAMES]
        if unknown or not self.names or len(set(self.names)) != len(self.names):
            raise ValueError(f"regions must be distinct names among {list(REGION_NAMES)}, got {list(self.names)}")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def nested(self) -> bool:
        """True when the set is a prefix of WT ⊇ TC ⊇ ET (then a label map can be rebuilt)."""
        return self.names == REGION_NAMES[:len(self.names)]

    def masks(self, canonical: np.ndarray) -> np.ndarray:
        """Canonical labels (...) -> region masks (..., R) uint8."""
        labels = np.asarray(canonical)
        return np.stack([np.isin(labels, sorted(REGION_LABELS[n])) for n in self.names], axis=-1).astype(np.uint8)

    def label_map(self, masks: np.ndarray) -> np.ndarray:
        """Binary region masks (..., R) -> canonical labels, nesting enforced (ET ⊆ TC ⊆ WT).

        A voxel's label is that of the innermost region predicted there *within* the outer
        ones: an ET voxel outside the predicted TC is not trusted as tumour core. With only
        WT the map is the binary mask (label 1).
        """
        masks = np.asarray(masks) > 0
        by_name = {name: masks[..., i] for i, name in enumerate(self.names)}
        wt = by_name.get("wt", np.zeros(masks.shape[:-1], bool))
        tc = by_name.get("tc", np.zeros_like(wt)) & wt
        et = by_name.get("et", np.zeros_like(wt)) & tc
        labels = np.zeros(wt.shape, np.uint8)
        labels[wt] = 1
        labels[tc] = 2
        labels[et] = 3
        return labels

    def file_labels(self, masks: np.ndarray, convention: LabelConvention | None) -> np.ndarray:
        """What a prediction file holds: a whole-tumour model's binary mask (0/1); a region model's
        label map, nested (ET within TC within WT), in ``convention`` (None: canonical = Decathlon)."""
        if self.names == ("wt",):
            return (np.asarray(masks)[..., 0] > 0).astype(np.uint8)
        labels = self.label_map(masks)
        return convention.source(labels) if convention is not None else labels


def region_voxels(canonical: np.ndarray, axes: Sequence[int]) -> np.ndarray:
    """Voxels of WT, TC and ET summed over ``axes`` (per slice / per case statistics)."""
    return RegionSet(REGION_NAMES).masks(canonical).sum(axis=tuple(axes), dtype=np.int64)
