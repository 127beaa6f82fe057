"""Raw BraTS -> one chunked HDF5 of normalised 128 x 128 axial slices (+ split JSON).

Streams one case at a time (a worker pool reads and normalises, the parent appends to
resizable datasets), so memory stays at a few cases whatever the dataset size. The file
is written under a temporary name and renamed only when complete.

Layout, per split group ``train`` / ``val`` / ``test``::

    images (N, S, S, 4) float32   all four modalities (flair, t1, t1ce, t2); training picks channels
    masks  (N, S, S, 1) uint8     whole tumour (label > 0)
    case   (N,) int32             index into ``case_ids``
    slice  (N,) int16             axial index z in the source volume
    case_ids (n,) str
"""
from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import cv2
import h5py
import numpy as np
from tqdm import tqdm

from trainer.config.settings import MODALITIES, SplitSettings
from trainer.data.brats import BratsCase, discover_brats, read_brats_case
from trainer.data.nifti import DEFAULT_MAX_VOXELS
from trainer.data.normalize import whole_tumour, zscore_brain
from trainer.data.split import SPLITS, save_split, split_cases, split_path_for
from trainer.fsutil import atomic_file, refuse_existing

FORMAT_VERSION = 1


@dataclass(frozen=True)
class PrepareRequest:
    src: Path
    out: Path
    image_size: int = 128
    split: SplitSettings = SplitSettings()
    workers: int = 0
    overwrite: bool = False
    max_voxels: int = DEFAULT_MAX_VOXELS


def resize_slices(volume: np.ndarray, size: int) -> np.ndarray:
    """(x, y, z, c) float -> (z, size, size, c) by area interpolation (the 2D model's input)."""
    slices = np.moveaxis(volume, 2, 0)
    return np.stack([_resize(s, size, cv2.INTER_AREA) for s in slices]).astype(np.float32)


def resize_mask_slices(mask: np.ndarray, size: int) -> np.ndarray:
    """(x, y, z) binary -> (z, size, size, 1) uint8: area-average then threshold at 0.5."""
    fractions = resize_slices(mask[..., None].astype(np.float32), size)
    return (fractions >= 0.5).astype(np.uint8)


def brain_slices(image: np.ndarray) -> np.ndarray:
    """Indices z of axial slices that contain any brain voxel."""
    return np.flatnonzero(np.any(image != 0, axis=(0, 1, 3)))


def _resize(image: np.ndarray, size: int, interpolation: int) -> np.ndarray:
    resized = cv2.resize(image, (size, size), interpolation=interpolation)
    return resized.reshape(size, size, image.shape[-1])


def _convert_case(args: tuple[BratsCase, int, int]) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    case, size, max_voxels = args
    image, labels, _ = read_brats_case(case, MODALITIES, max_voxels)
    keep = brain_slices(image)
    normalised = zscore_brain(image)[:, :, keep]
    mask = whole_tumour(labels)[:, :, keep]
    return case.case_id, resize_slices(normalised, size), resize_mask_slices(mask, size), keep


def prepare_brats(request: PrepareRequest, progress: bool = True) -> dict[str, int]:
    """Convert, split by patient and write; returns slice counts per split."""
    refuse_existing(request.out, request.overwrite)
    split_file = split_path_for(request.out)
    refuse_existing(split_file, request.overwrite)
    cases = discover_brats(request.src, require_seg=True)
    split = split_cases([c.case_id for c in cases], request.split.val_fraction,
                        request.split.test_fraction, request.split.seed)
    split_of = {case_id: name for name, ids in split.items() for case_id in ids}
    counts = {name: 0 for name in SPLITS}
    size = request.image_size
    workers = request.workers or min(multiprocessing.cpu_count(), len(cases))
    with atomic_file(request.out, request.overwrite) as tmp, h5py.File(tmp, "w") as h5:
        h5.attrs.update(format_version=FORMAT_VERSION, modalities=list(MODALITIES), image_size=size,
                        source=str(request.src), split_seed=request.split.seed)
        groups = {name: _create_group(h5, name, size, split[name]) for name in SPLITS}
        index_of = {name: {cid: i for i, cid in enumerate(split[name])} for name in SPLITS}
        jobs = [(case, size, request.max_voxels) for case in cases]
        bar = tqdm(total=len(jobs), desc="prepare brats", unit="case", disable=not progress)
        with multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else _Serial() as pool:
            for case_id, images, masks, z in pool.imap(_convert_case, jobs):
                name = split_of[case_id]
                _append(groups[name], images, masks, index_of[name][case_id], z)
                counts[name] += len(z)
                bar.update()
        bar.close()
    save_split(split_file, split, request.split.seed, request.src)
    return counts


def _create_group(h5: h5py.File, name: str, size: int, case_ids: list[str]) -> h5py.Group:
    group = h5.create_group(name)
    channels = len(MODALITIES)
    group.create_dataset("images", shape=(0, size, size, channels), maxshape=(None, size, size, channels),
                         dtype="float32", chunks=(1, size, size, channels), compression="lzf")
    group.create_dataset("masks", shape=(0, size, size, 1), maxshape=(None, size, size, 1),
                         dtype="uint8", chunks=(64, size, size, 1), compression="lzf")
    group.create_dataset("case", shape=(0,), maxshape=(None,), dtype="int32", chunks=(4096,))
    group.create_dataset("slice", shape=(0,), maxshape=(None,), dtype="int16", chunks=(4096,))
    group.create_dataset("case_ids", data=np.array(case_ids, dtype=object), dtype=h5py.string_dtype())
    return group


def _append(group: h5py.Group, images: np.ndarray, masks: np.ndarray, case_index: int, z: np.ndarray) -> None:
    start = group["images"].shape[0]
    stop = start + len(z)
    for key, values in (("images", images), ("masks", masks),
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
