"""A dataset's fingerprint: what a plan is derived from, and what looks wrong in it.

Shapes and spacings come from every case's headers (cheap); intensities and labels from the
volumes of up to ``max_cases`` cases, spread evenly over the set (reading a few hundred BraTS
cases would take longer than the plan is worth). Each warning is one line naming the case.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from trainer.config.settings import MODALITIES
from trainer.data.datasets import RawDataset
from trainer.data.nifti import read_header
from trainer.errors import DataError
from trainer.data.regions import REGION_NAMES, RegionSet

ANISOTROPY = 3.0        # nnU-Net's threshold: a spacing 3x another is "anisotropic"
SPACING_TOLERANCE = 0.01
OUTLIER_TAIL = 3.0      # a bright tail (p99.5 / p50) this many times the set's typical one


@dataclass
class DatasetFingerprint:
    source: str
    layout: str
    cases: int
    sampled_cases: int
    shapes: dict[str, int]                 # "240x240x155" -> cases
    spacing: dict[str, list[float]]        # per axis: min, median, max (mm)
    brain_extent: dict[str, list[float]]   # per axis, voxels of the brain's bounding box: min, median, max
    intensity: dict[str, dict[str, float]]  # modality -> p0.5, p50, p99.5 (inside the brain, medians over cases)
    labels: list[int]                      # canonical labels seen
    foreground_share: dict[str, float]     # region -> mean share of brain voxels
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def median_shape(self) -> tuple[int, int, int]:
        return tuple(int(round(v[1])) for v in self.brain_extent.values())  # type: ignore[return-value]

    def rows(self) -> list[tuple[str, str]]:
        shapes = ", ".join(f"{s} ({n})" for s, n in sorted(self.shapes.items(), key=lambda kv: -kv[1])[:3])
        spacing = " x ".join(f"{v[1]:g}" for v in self.spacing.values())
        extent = " x ".join(f"{v[1]:.0f}" for v in self.brain_extent.values())
        share = ", ".join(f"{r} {v:.1%}" for r, v in self.foreground_share.items())
        return [("dataset", f"{self.source} ({self.layout}, {self.cases} cases, {self.sampled_cases} read)"),
                ("shapes", shapes), ("spacing", f"{spacing} mm (median)"), ("brain extent", f"{extent} voxels"),
                ("foreground", f"{share} of the brain"), ("warnings", str(len(self.warnings)))]


def fingerprint(dataset: RawDataset, max_cases: int = 20, progress: bool = True) -> DatasetFingerprint:
    warnings: list[str] = []
    headers = {}
    for case in dataset.cases:
        shapes_spacings = [read_header(path) for path in case.images]
        headers[case.case_id] = (shapes_spacings[0][0][:3], shapes_spacings[0][1][:3])
        if len({s[:3] for s, _ in shapes_spacings}) > 1:
            warnings.append(f"{case.case_id}: its modality files differ in shape "
                            f"({', '.join('x'.join(map(str, s[:3])) for s, _ in shapes_spacings)})")
    shapes = Counter("x".join(map(str, shape)) for shape, _ in headers.values())
    spacings = np.array([spacing for _, spacing in headers.values()], dtype=np.float64)
    median_spacing = np.median(spacings, axis=0)
    for case_id, (shape, spacing) in headers.items():
        if max(spacing) / max(min(spacing), 1e-6) >= ANISOTROPY:
            warnings.append(f"{case_id}: anisotropic spacing {' x '.join(f'{s:g}' for s in spacing)} mm "
                            f"(largest >= {ANISOTROPY:g}x smallest)")
        elif np.any(np.abs(np.asarray(spacing) - median_spacing) > SPACING_TOLERANCE * median_spacing):
            warnings.append(f"{case_id}: spacing {' x '.join(f'{s:g}' for s in spacing)} mm differs from the set's "
                            f"median {' x '.join(f'{s:g}' for s in median_spacing)} mm (mixed spacing: resample, "
                            f"or the model sees structures at different scales)")
    if len(shapes) > 1:
        common = shapes.most_common(1)[0][0]
        odd = [cid for cid, (shape, _) in headers.items() if "x".join(map(str, shape)) != common]
        warnings.append(f"{odd[0]}: shape {'x'.join(map(str, headers[odd[0]][0]))}, while most cases are {common} "
                        f"(mixed shapes: {len(odd)} case(s) differ)")

    sample = _spread(dataset.cases, max_cases)
    extents, intensities, shares, labels_seen = [], {m: [] for m in MODALITIES}, [], set()
    regions = RegionSet(REGION_NAMES)
    for case in tqdm(sample, desc="fingerprint", unit="case", disable=not progress):
        try:
            image, labels, _ = case.load(normalise=False)
        except DataError as exc:
            warnings.append(f"{case.case_id}: unreadable ({exc})")
            continue
        brain = np.any(image != 0, axis=-1)
        if not brain.any():
            warnings.append(f"{case.case_id}: no brain voxels (every intensity is 0)")
            continue
        nonzero = np.argwhere(brain)
        extents.append(nonzero.max(axis=0) - nonzero.min(axis=0) + 1)
        for index, modality in enumerate(MODALITIES):
            values = image[..., index][brain]
            intensities[modality].append(np.percentile(values, [0.5, 50, 99.5]))
        if labels is not None:
            labels_seen |= set(np.unique(labels).astype(int).tolist())
            masks = regions.masks(labels)
            share = masks.reshape(-1, len(REGION_NAMES)).sum(axis=0) / brain.sum()
            shares.append(share)
            if not masks[..., 0].any():
                warnings.append(f"{case.case_id}: empty case (no tumour label at all)")
    for modality, rows in intensities.items():
        if len(rows) < 3:
            continue
        # Scale-free: MRI intensities have no unit, so a case is an outlier when its bright tail,
        # relative to its own median, is far beyond the set's (hot spots, spikes, unscaled data).
        tails = np.array([row[2] / max(abs(row[1]), 1e-6) for row in rows])
        typical = float(np.median(tails))
        for case, tail in zip(sample, tails):
            if tail > OUTLIER_TAIL * typical:
                warnings.append(f"{case.case_id}: {modality} intensity outlier (99.5th percentile {tail:.1f}x its "
                                f"median inside the brain; the set's typical case: {typical:.1f}x)")
    extent = np.array(extents, dtype=np.float64) if extents else np.zeros((1, 3))
    return DatasetFingerprint(
        source=str(dataset.root), layout=dataset.layout, cases=len(dataset.cases), sampled_cases=len(sample),
        shapes=dict(shapes),
        spacing={axis: _summary(spacings[:, i]) for i, axis in enumerate("xyz")},
        brain_extent={axis: _summary(extent[:, i]) for i, axis in enumerate("xyz")},
        intensity={m: dict(zip(("p0.5", "p50", "p99.5"), np.median(np.array(rows), axis=0).round(4).tolist()))
                   for m, rows in intensities.items() if rows},
        labels=sorted(labels_seen),
        foreground_share=dict(zip(REGION_NAMES, np.mean(shares, axis=0).round(5).tolist())) if shares else {},
        warnings=warnings)


def _summary(values: np.ndarray) -> list[float]:
    return [round(float(np.min(values)), 3), round(float(np.median(values)), 3), round(float(np.max(values)), 3)]


def _spread(items, count: int):
    if len(items) <= count:
        return list(items)
    return [items[i] for i in np.unique(np.linspace(0, len(items) - 1, count).round().astype(int))]
