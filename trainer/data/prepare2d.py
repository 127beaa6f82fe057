"""A raw dataset (either layout) -> one chunked HDF5 of normalised 128 x 128 axial slices, split by patient.

Streams one case at a time (a worker pool reads and normalises, the parent appends to
resizable datasets), so memory stays at a few cases whatever the dataset size. The file
is written under a temporary name and renamed only when complete.

Layout, per split group ``train`` / ``val`` / ``test``::

    images (N, S, S, 4) float32   all four modalities (flair, t1, t1ce, t2); training picks channels
    labels (N, S, S) uint8        canonical labels (trainer.data.regions): 0 bg, 1 oedema, 2 core, 3 enhancing
    region_voxels (N, 3) int32    WT, TC, ET voxels per slice (tumour-aware sampling, panels)
    case   (N,) int32             index into ``case_ids``
    slice  (N,) int16             axial index z in the source volume
    case_ids (n,) str

Format 1 (before regions) stored only a whole-tumour ``masks`` dataset; it is refused with
the command that rebuilds the file.
"""
from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import cv2
import h5py
import numpy as np
from tqdm import tqdm

from trainer.config.settings import MODALITIES
from trainer.data.datasets import RawCase, RawDataset
from trainer.data.split import SPLITS
from trainer.fsutil import atomic_file, refuse_existing
from trainer.data.regions import REGION_NAMES, RegionSet, region_voxels

FORMAT_VERSION = 2


@dataclass(frozen=True)
class PrepareRequest:
    out: Path
    split: dict[str, list[str]]  # case ids per part (train / val / test): the prepared dataset's
    image_size: int = 128
    workers: int = 0
    overwrite: bool = False


def resize_slices(volume: np.ndarray, size: int) -> np.ndarray:
    """(x, y, z, c) float -> (z, size, size, c) by area interpolation (the 2D model's input)."""
    slices = np.moveaxis(volume, 2, 0)
    return np.stack([_resize(s, size, cv2.INTER_AREA) for s in slices]).astype(np.float32)


def resize_label_slices(canonical: np.ndarray, size: int) -> np.ndarray:
    """(x, y, z) canonical labels -> (z, size, size) uint8 labels.

    Each nested region (WT ⊇ TC ⊇ ET) is area-averaged and thresholded at 0.5 on its own,
    then the label map is rebuilt: the thresholded fractions stay nested, so no region is
    invented or lost by nearest-neighbour picking of one label.
    """
    regions = RegionSet(REGION_NAMES)
    fractions = resize_slices(regions.masks(canonical).astype(np.float32), size)
    return regions.label_map(fractions >= 0.5)


def brain_slices(image: np.ndarray) -> np.ndarray:
    """Indices z of axial slices that contain any brain voxel."""
    return np.flatnonzero(np.any(image != 0, axis=(0, 1, 3)))


OPENCV_MAX_CHANNELS = 4  # cv2.resize's area interpolation takes at most 4 channels when shrinking


def _resize(image: np.ndarray, size: int, interpolation: int) -> np.ndarray:
    """(H, W, C) -> (size, size, C), any C: resized 4 channels at a time (context slices make 20)."""
    parts = [cv2.resize(np.ascontiguousarray(image[..., first:first + OPENCV_MAX_CHANNELS]), (size, size),
                        interpolation=interpolation).reshape(size, size, -1)
             for first in range(0, image.shape[-1], OPENCV_MAX_CHANNELS)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)


def _convert_case(args: tuple[RawCase, int]) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    case, size = args
    image, labels, _ = case.load()  # z-scored: the background stays exactly 0
    keep = brain_slices(image)
    return case.case_id, resize_slices(image[:, :, keep], size), resize_label_slices(labels[:, :, keep], size), keep


def prepare_slices(dataset: RawDataset, request: PrepareRequest, progress: bool = True) -> dict[str, int]:
    """Convert every case and write it to its part of the split; returns slice counts per part."""
    refuse_existing(request.out, request.overwrite)
    cases = dataset.cases
    split = request.split
    split_of = {case_id: name for name, ids in split.items() for case_id in ids}
    counts = {name: 0 for name in SPLITS}
    size = request.image_size
    workers = request.workers or min(multiprocessing.cpu_count(), len(cases))
    with atomic_file(request.out, request.overwrite) as tmp, h5py.File(tmp, "w") as h5:
        h5.attrs.update(format_version=FORMAT_VERSION, modalities=list(MODALITIES), image_size=size,
                        layout=dataset.layout)
        groups = {name: _create_group(h5, name, size, split[name]) for name in SPLITS}
        index_of = {name: {cid: i for i, cid in enumerate(split[name])} for name in SPLITS}
        jobs = [(case, size) for case in cases]
        bar = tqdm(total=len(jobs), desc=f"prepare slices ({dataset.layout})", unit="case", disable=not progress)
        with multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else _Serial() as pool:
            for case_id, images, labels, z in pool.imap(_convert_case, jobs):
                name = split_of[case_id]
                _append(groups[name], images, labels, index_of[name][case_id], z)
                counts[name] += len(z)
                bar.update()
        bar.close()
    return counts


def _create_group(h5: h5py.File, name: str, size: int, case_ids: list[str]) -> h5py.Group:
    group = h5.create_group(name)
    channels = len(MODALITIES)
    group.create_dataset("images", shape=(0, size, size, channels), maxshape=(None, size, size, channels),
                         dtype="float32", chunks=(1, size, size, channels), compression="lzf")
    group.create_dataset("labels", shape=(0, size, size), maxshape=(None, size, size),
                         dtype="uint8", chunks=(1, size, size), compression="lzf")  # random access
    group.create_dataset("region_voxels", shape=(0, len(REGION_NAMES)), maxshape=(None, len(REGION_NAMES)),
                         dtype="int32", chunks=(4096, len(REGION_NAMES)))
    group.create_dataset("case", shape=(0,), maxshape=(None,), dtype="int32", chunks=(4096,))
    group.create_dataset("slice", shape=(0,), maxshape=(None,), dtype="int16", chunks=(4096,))
    group.create_dataset("case_ids", data=np.array(case_ids, dtype=object), dtype=h5py.string_dtype())
    return group


def _append(group: h5py.Group, images: np.ndarray, labels: np.ndarray, case_index: int, z: np.ndarray) -> None:
    start = group["images"].shape[0]
    stop = start + len(z)
    for key, values in (("images", images), ("labels", labels), ("region_voxels", region_voxels(labels, (1, 2))),
                        ("case", np.full(len(z), case_index, np.int32)), ("slice", z.astype(np.int16))):
        group[key].resize(stop, axis=0)
        group[key][start:stop] = values


class _Serial:
    """Stand-in for a Pool when one worker is enough (tests, one case)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def imap(fn, items):
        return map(fn, items)
