"""tf.data input pipelines: 2D slices from HDF5, 3D crops from Decathlon volumes.

Shared properties, so every execution mode sees the same numbers:
- Sharding by (rank, size) before shuffling: workers read disjoint samples, and every
  shard has the same length so all ranks run the same number of steps.
- Infinite (repeated) streams; an epoch is ``steps`` batches chosen by the caller.
- Determinism for a seed: shuffles are seeded and every random choice (augmentation,
  crop position) is a stateless function of (seed, sample counter), so parallel maps
  cannot reorder randomness.
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
from trainer.data.decathlon import CaseArrays, channel_indices
from trainer.errors import DataError


@dataclass(frozen=True)
class Shard:
    """Which slice of the data this process reads: worker ``rank`` of ``size``."""

    rank: int = 0
    size: int = 1

    def take(self, count: int) -> np.ndarray:
        """Disjoint, equal-length positions for this shard (the remainder is dropped)."""
        per_shard = count // self.size
        if per_shard == 0:
            raise DataError(f"{count} sample(s) cannot be split across {self.size} workers")
        return np.arange(count)[self.rank::self.size][:per_shard]


@dataclass(frozen=True)
class PipelineOptions:
    batch_size: int
    seed: int
    training: bool
    augment: bool
    shuffle: bool
    shuffle_buffer: int = 2048
    parallel_calls: int = 0
    prefetch: int = 0

    @property
    def tf_parallel(self) -> int:
        return self.parallel_calls or tf.data.AUTOTUNE

    @property
    def tf_prefetch(self) -> int:
        return self.prefetch or tf.data.AUTOTUNE


# ---------------------------------------------------------------- 2D: HDF5 slices

class _H5Reader:
    """One read-only h5py handle per process, shared by tf.data threads under a lock."""

    def __init__(self, path: Path, split: str, channels: Sequence[int]):
        self.path, self.split, self.channels = str(path), split, list(channels)
        self._file: h5py.File | None = None
        self._lock = threading.Lock()

    def _group(self) -> h5py.Group:
        if self._file is None:
            self._file = h5py.File(self.path, "r")
        return self._file[self.split]

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # h5py needs increasing, unique indices; a batch spanning two epochs may repeat one.
        unique, inverse = np.unique(indices, return_inverse=True)
        with self._lock:
            group = self._group()
            images = group["images"][unique]
            masks = group["masks"][unique]
        return (images[inverse][..., self.channels].astype(np.float32),
                masks[inverse].astype(np.float32))


def slice_count(h5_path: Path, split: str) -> int:
    try:
        with h5py.File(h5_path, "r") as h5:
            return int(h5[split]["images"].shape[0])
    except FileNotFoundError:
        raise DataError(f"{h5_path}: prepared slices not found (run 'unet-train prepare --format brats')") from None
    except (OSError, KeyError) as exc:
        raise DataError(f"{h5_path}: not a prepared slices file (no '{split}' group: {exc})") from None


def slices_dataset(h5_path: Path, split: str, channels: Sequence[str], shard: Shard,
                   options: PipelineOptions) -> tuple[tf.data.Dataset, int]:
    """Batches of (image (b, S, S, C), mask (b, S, S, 1)); returns (dataset, samples in this shard)."""
    positions = shard.take(slice_count(h5_path, split))
    reader = _H5Reader(h5_path, split, [MODALITIES.index(c) for c in channels])
    with h5py.File(h5_path, "r") as h5:
        size = int(h5[split]["images"].shape[1])
    ds = tf.data.Dataset.from_tensor_slices(positions)
    if options.shuffle and options.training:
        ds = ds.shuffle(min(len(positions), options.shuffle_buffer), seed=options.seed,
                        reshuffle_each_iteration=True)
    ds = ds.repeat().batch(options.batch_size, drop_remainder=True)

    def read(indices):
        images, masks = tf.numpy_function(reader.read, [indices], [tf.float32, tf.float32])
        images.set_shape([options.batch_size, size, size, len(channels)])
        masks.set_shape([options.batch_size, size, size, 1])
        return images, masks

    ds = ds.map(read, num_parallel_calls=options.tf_parallel, deterministic=True)
    ds = _maybe_augment(ds, options, spatial_dims=2)
    return ds.prefetch(options.tf_prefetch), len(positions)


# ---------------------------------------------------------------- 3D: Decathlon crops

class _CropSampler:
    """Tumour-centred crops (``tumour_fraction`` of them) and random crops inside the brain.

    Random crops are drawn within the brain's bounding box (non-zero voxels), as nnU-Net
    crops to the non-zero region: uniform over the whole 240 x 240 x 155 volume most would be
    air, and the model would hardly see the healthy tissue it must learn to leave unlabelled.
    """

    def __init__(self, cases: Sequence[CaseArrays], crop: tuple[int, int, int], channels: Sequence[int],
                 tumour_fraction: float, seed: int, label_set):
        self.cases, self.crop, self.channels = list(cases), tuple(crop), list(channels)
        self.tumour_fraction, self.seed, self.label_set = tumour_fraction, seed, label_set
        self._tumour_voxels: dict[int, np.ndarray] = {}
        self._brain_boxes: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def sample(self, case_position: np.int64, counter: np.int64) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, int(counter)])
        image, mask = self.cases[int(case_position)].load(self.label_set)
        shape = np.asarray(mask.shape)
        crop = np.asarray(self.crop)
        if rng.random() < self.tumour_fraction:
            voxels = self._tumour(int(case_position), mask)
            centre = voxels[rng.integers(len(voxels))] if len(voxels) else rng.integers(0, shape)
            start = np.asarray(centre) - crop // 2
        else:
            low, high = self._brain_box(int(case_position), image)
            first = np.clip(low, 0, np.maximum(shape - crop, 0))
            last = np.clip(high + 1 - crop, first, np.maximum(shape - crop, 0))
            start = rng.integers(first, last + 1)
        start = np.clip(start, 0, np.maximum(shape - crop, 0))
        window = tuple(slice(s, s + c) for s, c in zip(start, crop))
        image_crop = np.asarray(image[window])[..., self.channels]
        mask_crop = np.asarray(mask[window])[..., None]
        pad = [(0, int(c - n)) for c, n in zip(crop, mask_crop.shape[:3])] + [(0, 0)]
        if any(p[1] for p in pad):
            image_crop, mask_crop = np.pad(image_crop, pad), np.pad(mask_crop, pad)
        return image_crop.astype(np.float32), mask_crop.astype(np.float32)

    def _brain_box(self, position: int, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inclusive (low, high) corners of the non-zero voxels (the whole volume if none)."""
        if position not in self._brain_boxes:
            brain = np.argwhere(np.any(np.asarray(image) != 0, axis=-1))
            if len(brain):
                self._brain_boxes[position] = brain.min(axis=0), brain.max(axis=0)
            else:
                self._brain_boxes[position] = np.zeros(3, np.int64), np.asarray(image.shape[:3]) - 1
        return self._brain_boxes[position]

    def _tumour(self, position: int, mask: np.ndarray) -> np.ndarray:
        if position not in self._tumour_voxels:
            self._tumour_voxels[position] = np.argwhere(np.asarray(mask) > 0).astype(np.int16)
        return self._tumour_voxels[position]


def crops_dataset(cases: Sequence[CaseArrays], crop: tuple[int, int, int], channels: Sequence[str],
                  tumour_fraction: float, shard: Shard, options: PipelineOptions,
                  label_set=frozenset({0, 1, 2, 3})) -> tuple[tf.data.Dataset, int]:
    """Batches of (image (b, X, Y, Z, C), mask (b, X, Y, Z, 1)) crops; returns (dataset, cases in shard)."""
    positions = shard.take(len(cases))
    sampler = _CropSampler(cases, crop, channel_indices(tuple(channels)), tumour_fraction,
                           options.seed, label_set)
    ds = tf.data.Dataset.from_tensor_slices(positions)
    if options.shuffle and options.training:
        ds = ds.shuffle(len(positions), seed=options.seed, reshuffle_each_iteration=True)
    ds = ds.repeat().enumerate()

    def load(counter, position):
        image, mask = tf.numpy_function(sampler.sample, [position, counter], [tf.float32, tf.float32])
        image.set_shape([*crop, len(channels)])
        mask.set_shape([*crop, 1])
        return image, mask

    ds = ds.map(load, num_parallel_calls=options.tf_parallel, deterministic=True)
    ds = ds.batch(options.batch_size, drop_remainder=True)
    ds = _maybe_augment(ds, options, spatial_dims=3)
    return ds.prefetch(options.tf_prefetch), len(positions)


# ---------------------------------------------------------------- augmentation

def _maybe_augment(ds: tf.data.Dataset, options: PipelineOptions, spatial_dims: int) -> tf.data.Dataset:
    if not (options.training and options.augment):
        return ds
    seed = options.seed

    def augment(step, batch):
        images, masks = batch
        return augment_batch(images, masks, tf.stack([tf.constant(seed, tf.int64), step]), spatial_dims)

    return ds.enumerate().map(augment, num_parallel_calls=options.tf_parallel, deterministic=True)


def augment_batch(images: tf.Tensor, masks: tf.Tensor, seed: tf.Tensor, spatial_dims: int):
    """Per-sample random flips on every spatial axis and a 90-degree rotation in the axial plane.

    Stateless and vectorised: the choices are a pure function of ``seed``.
    """
    batch = tf.shape(images)[0]
    data = tf.concat([images, tf.cast(masks, images.dtype)], axis=-1)
    for axis in range(1, spatial_dims + 1):
        flip = tf.random.stateless_uniform([batch], seed=seed + axis) < 0.5
        data = tf.where(_per_sample(flip, data), tf.reverse(data, axis=[axis]), data)
    if data.shape[1] == data.shape[2]:  # square axial plane: rotations keep the shape
        k = tf.random.stateless_uniform([batch], seed=seed + 10, maxval=4, dtype=tf.int32)
        rotated = data
        for quarter in range(1, 4):
            rotated_once = tf.experimental.numpy.rot90(data, k=quarter, axes=(1, 2))
            rotated = tf.where(_per_sample(tf.equal(k, quarter), data), rotated_once, rotated)
        data = rotated
    channels = images.shape[-1]
    return data[..., :channels], data[..., channels:]


def _per_sample(flags: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    return tf.reshape(flags, [-1] + [1] * (len(like.shape) - 1))
