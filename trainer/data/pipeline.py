"""Sample sources and augmentation: 2D slices from HDF5, 3D crops from Decathlon volumes.

A *source* turns sample positions into arrays; *which* positions form which batch is
decided in :mod:`trainer.data.streams`. Properties every execution mode relies on:
- Every random choice (crop position, augmentation) is a stateless function of the
  sample's place in the *global* batch, so worker r of N reading its slice of a global
  batch gets exactly the arrays a single process reading the whole batch gets.
- Nothing loads a whole dataset: HDF5 is read a batch at a time; 3D volumes are
  memory-mapped from the cache (or read per crop from NIfTI).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import tensorflow as tf

from trainer.config.settings import MODALITIES
from trainer.data.context import neighbour_rows
from trainer.data.decathlon import channel_indices
from trainer.data.volumes import CaseArrays
from trainer.errors import DataError
from trainer.fsutil import check_regular
from trainer.data.regions import RegionSet

SLICES_FORMAT = 2
LABEL_CHUNK_CACHE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Shard:
    """Worker ``rank`` of ``size``: it reads rows rank, rank + size, ... of each global batch."""

    rank: int = 0
    size: int = 1

    def part(self, rows: np.ndarray) -> np.ndarray:
        """This worker's rows of a global batch (first axis; the length divides evenly)."""
        return rows[self.rank::self.size]


# ---------------------------------------------------------------- 2D: HDF5 slices

class SliceSource:
    """One split of a prepared slices file: per-slice metadata in memory, pixels read per batch.

    One read-only h5py handle per process, shared by tf.data threads under a lock.
    """

    def __init__(self, path: Path, split: str, channels: Sequence[str], regions: RegionSet, context: int = 0,
                 context_stride: int = 1):
        self.path, self.split, self.regions, self.context = Path(path), split, regions, context
        self.context_stride = context_stride
        self.channels = [MODALITIES.index(c) for c in channels]
        try:
            check_regular(self.path, f"{self.path}: prepared slices")  # h5py would hang on a FIFO
            with h5py.File(self.path, "r") as h5:
                version = int(h5.attrs.get("format_version", 1))
                if version != SLICES_FORMAT:
                    raise DataError(f"{self.path}: prepared slices of format {version}, this unet-train reads "
                                    f"format {SLICES_FORMAT} (label maps for the BraTS regions); rebuild it with "
                                    f"'unet-train prepare --format brats --overwrite'")
                group = h5[split]
                self.count = int(group["images"].shape[0])
                self.size = int(group["images"].shape[1])
                self.case = group["case"][()].astype(np.int64)
                self.z = group["slice"][()].astype(np.int64) if context else None  # only context needs z
                self.case_ids = [c.decode() if isinstance(c, bytes) else str(c) for c in group["case_ids"][()]]
                self.region_voxels = group["region_voxels"][()].astype(np.int64)
        except FileNotFoundError:
            raise DataError(f"{self.path}: prepared slices not found; run 'unet-train prepare --src DIR --model "
                            f"2d --out {self.path.parent}'") from None
        except (OSError, KeyError) as exc:
            raise DataError(f"{self.path}: not a prepared slices file (no '{split}' data: {exc})") from None
        if self.count == 0:
            raise DataError(f"{self.path}: the '{split}' split holds no slices")
        self._file: h5py.File | None = None
        self._datasets: tuple[h5py.Dataset, h5py.Dataset] | None = None
        self._lock = threading.Lock()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.size, self.size, len(self.channels) * (2 * self.context + 1)

    def tumour_positions(self) -> np.ndarray:
        """Slices that hold whole tumour (for tumour-aware sampling)."""
        return np.flatnonzero(self.region_voxels[:, 0] > 0)

    def read(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(images (n, S, S, C) float32, region masks (n, S, S, R) float32) for ``positions``."""
        unique, inverse = np.unique(np.asarray(positions, np.int64), return_inverse=True)
        with self._lock:
            if self._datasets is None:
                # A chunk cache that holds a file's label chunks (64 slices each in files prepared
                # before labels were chunked per slice), so random slices do not re-inflate them.
                # The cache lives with an open dataset: the handles stay open (opening
                # group["labels"] per batch started every batch with an empty cache: 27 ms of
                # inflating instead of 1 ms, 2D batch of 16).
                self._file = h5py.File(self.path, "r", rdcc_nbytes=LABEL_CHUNK_CACHE_BYTES)
                group = self._file[self.split]
                self._datasets = (group["images"], group["labels"])
            neighbours = neighbour_rows(unique, self.case, self.z, self.context, self.context_stride) if self.context else unique[:, None]
            needed = np.unique(neighbours[neighbours >= 0])
            images = _read_rows(self._datasets[0], needed)[..., self.channels].astype(np.float32)
            labels = _read_rows(self._datasets[1], unique)
        masks = self.regions.masks(labels[inverse]).astype(np.float32)
        at = np.searchsorted(needed, np.maximum(neighbours, 0))
        planes = [np.where((neighbours[:, column] >= 0)[:, None, None, None], images[at[:, column]], 0.0)
                  for column in range(neighbours.shape[1])]
        return np.concatenate(planes, axis=-1)[inverse].astype(np.float32), masks


def _read_rows(dataset: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """``dataset[rows]`` one row at a time: h5py's fancy indexing built a point selection that
    took 5x longer for 16 scattered slices (87 ms against 17 ms, 2D batch of 16)."""
    out = np.empty((len(rows), *dataset.shape[1:]), dataset.dtype)
    for at, row in enumerate(rows):
        dataset.read_direct(out, np.s_[int(row)], np.s_[at])
    return out


# ---------------------------------------------------------------- 3D: Decathlon crops

class CropSource:
    """Tumour-centred crops (``tumour_fraction`` of them) and random crops inside the brain.

    Random crops are drawn within the brain's bounding box (non-zero voxels), as nnU-Net
    crops to the non-zero region: uniform over the whole 240 x 240 x 155 volume most would be
    air, and the model would hardly see the healthy tissue it must learn to leave unlabelled.
    A crop is a pure function of (case, counter): the counter is the sample's serial number
    in the run, so the same global sample is the same crop in every mode.
    """

    def __init__(self, cases: Sequence[CaseArrays], crop: tuple[int, int, int], channels: Sequence[str],
                 regions: RegionSet, tumour_fraction: float, seed: int):
        self.cases, self.crop, self.channels = list(cases), tuple(crop), channel_indices(tuple(channels))
        self.regions, self.tumour_fraction, self.seed = regions, tumour_fraction, seed
        self._tumour_voxels: dict[int, np.ndarray] = {}
        self._brain_boxes: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return len(self.cases)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return (*self.crop, len(self.channels))

    def read(self, positions: np.ndarray, counters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Training crops: (images (n, X, Y, Z, C), region masks (n, X, Y, Z, R)) float32."""
        pairs = [self._random_crop(int(p), int(c)) for p, c in zip(positions, counters)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def read_validation(self, positions: np.ndarray, numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Validation crops: crop 0 of a case is centred on its tumour's centre, the others
        alternate between tumour voxels and the brain (fixed per (case, number), never per epoch)."""
        pairs = [self._validation_crop(int(p), int(k)) for p, k in zip(positions, numbers)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def _random_crop(self, position: int, counter: int):
        rng = np.random.default_rng([self.seed, counter])
        return self._crop_from(position, rng, tumour=rng.random() < self.tumour_fraction)

    def _validation_crop(self, position: int, number: int):
        if number == 0:
            image, labels = self.cases[position].load()
            voxels = self._tumour(position, labels)
            if len(voxels):  # the tumour voxel nearest the tumour's centre of mass
                centre = voxels[np.argmin(((voxels - voxels.mean(axis=0)) ** 2).sum(axis=1))]
                return self._window(image, labels, np.asarray(centre) - np.asarray(self.crop) // 2)
        rng = np.random.default_rng([self.seed, 1 << 40, position, number])
        return self._crop_from(position, rng, tumour=number % 2 == 0)

    def _crop_from(self, position: int, rng: np.random.Generator, tumour: bool):
        image, labels = self.cases[position].load()
        shape, crop = np.asarray(labels.shape), np.asarray(self.crop)
        if tumour:
            voxels = self._tumour(position, labels)
            centre = voxels[rng.integers(len(voxels))] if len(voxels) else rng.integers(0, shape)
            start = np.asarray(centre) - crop // 2
        else:
            low, high = self._brain_box(position, image)
            first = np.clip(low, 0, np.maximum(shape - crop, 0))
            last = np.clip(high + 1 - crop, first, np.maximum(shape - crop, 0))
            start = rng.integers(first, last + 1)
        return self._window(image, labels, start)

    def _window(self, image, labels, start):
        shape, crop = np.asarray(labels.shape), np.asarray(self.crop)
        start = np.clip(start, 0, np.maximum(shape - crop, 0))
        window = tuple(slice(s, s + c) for s, c in zip(start, crop))
        image_crop = np.asarray(image[window])[..., self.channels]
        mask_crop = self.regions.masks(np.asarray(labels[window]))
        pad = [(0, int(c - n)) for c, n in zip(crop, mask_crop.shape[:3])] + [(0, 0)]
        if any(p[1] for p in pad):
            image_crop, mask_crop = np.pad(image_crop, pad), np.pad(mask_crop, pad)
        return image_crop.astype(np.float32), mask_crop.astype(np.float32)

    def _brain_box(self, position: int, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inclusive (low, high) corners of the non-zero voxels (the whole volume if none)."""
        with self._lock:
            if position not in self._brain_boxes:
                brain = np.argwhere(np.any(np.asarray(image) != 0, axis=-1))
                if len(brain):
                    self._brain_boxes[position] = brain.min(axis=0), brain.max(axis=0)
                else:
                    self._brain_boxes[position] = np.zeros(3, np.int64), np.asarray(image.shape[:3]) - 1
            return self._brain_boxes[position]

    def _tumour(self, position: int, labels: np.ndarray) -> np.ndarray:
        with self._lock:
            if position not in self._tumour_voxels:
                self._tumour_voxels[position] = np.argwhere(np.asarray(labels) > 0).astype(np.int16)
            return self._tumour_voxels[position]


# ---------------------------------------------------------------- augmentation

def augment_batch(images: tf.Tensor, masks: tf.Tensor, seed: tf.Tensor, spatial_dims: int,
                  shard: Shard = Shard()):
    """Per-sample random flips on every spatial axis, then a 90-degree rotation in the axial plane.

    Stateless: the choices are a pure function of ``seed`` and of each sample's row in the global
    batch (this batch holds ``shard``'s rows of it), so a worker's rows of a global batch are
    augmented exactly as the same rows are in a single process. The choices are drawn in
    TensorFlow; each sample is then moved once, as a numpy view of its flips and rotation. Doing it
    with tf.where over the whole batch per axis and per quarter turn cost 13 copies of the batch,
    27 of the 73 ms a 2D batch of 16 took in the input pipeline, time taken from the 2 cores that
    train.
    """
    total = images.shape[0] * shard.size

    def draws(offset: int, **kwargs):
        return tf.random.stateless_uniform([total], seed=seed + offset, **kwargs)[shard.rank::shard.size]

    flips = tf.stack([draws(axis) < 0.5 for axis in range(1, spatial_dims + 1)], axis=1)
    if images.shape[1] == images.shape[2]:  # square axial plane: rotations keep the shape
        quarters = draws(10, maxval=4, dtype=tf.int32)
    else:
        quarters = tf.zeros(tf.shape(images)[:1], tf.int32)
    out_images, out_masks = tf.numpy_function(_flip_and_rotate, [images, masks, flips, quarters],
                                              [images.dtype, masks.dtype], stateful=False)
    out_images.set_shape(images.shape)
    out_masks.set_shape(masks.shape)
    return out_images, out_masks


def _flip_and_rotate(images: np.ndarray, masks: np.ndarray, flips: np.ndarray,
                     quarters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each sample flipped on its flagged spatial axes, then turned ``quarters`` times in the
    axial (first two spatial axes) plane, copied once into the output."""
    out_images, out_masks = np.empty_like(images), np.empty_like(masks)
    for row in range(len(images)):
        axes = tuple(int(a) for a in np.flatnonzero(flips[row]))
        for source, out in ((images, out_images), (masks, out_masks)):
            sample = np.flip(source[row], axes) if axes else source[row]
            out[row] = np.rot90(sample, int(quarters[row]), axes=(0, 1))
    return out_images, out_masks
