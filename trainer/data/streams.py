"""Training and validation streams: which samples form which global batch, for any worker.

The contract every execution mode relies on (single, Horovod, parameter server):

* Global batch ``s`` of epoch ``e`` is a pure function of ``(seed, e, s)``
  (:class:`TrainSchedule`). Worker ``r`` of ``N`` reads rows ``r, r+N, r+2N, ...`` of it, so
  N workers at batch b see exactly the samples, crops and augmentations of one process at
  batch N*b, shuffled or not.
* A run resumed at step ``s`` of epoch ``e`` continues with the very batches an
  uninterrupted run would have read: the stream for an epoch starts at any step.
* Validation is one deterministic pass over *every* validation case (or an evenly spread,
  case-covering subset when ``train.validation_steps`` caps it), in padded global batches
  that carry each sample's case index, so per-case figures can be pooled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import tensorflow as tf

from trainer.config.kinds import kind_of
from trainer.config.settings import Settings
from trainer.data.pipeline import CropSource, Shard, SliceSource, augment_batch
from trainer.data.prepared import prepared_dataset, raw_dataset
from trainer.data.volumes import case_arrays
from trainer.errors import ConfigError, DataError, TrainingError
from trainer.data.regions import RegionSet

PAD_CASE = -1  # case index of the padding rows that fill a last validation batch


class TrainSchedule:
    """Sample positions of every global batch of an epoch, from (seed, epoch) alone.

    Shuffled: each epoch draws fresh permutations (chained when an epoch needs more samples
    than there are). With ``foreground`` positions and ``foreground_fraction`` f, at least
    round(f * batch) rows of every batch are drawn from them (nnU-Net's foreground
    oversampling), then the batch's rows are shuffled so no worker gets all of them.
    Not shuffled: the samples in order, continuing across epochs.
    """

    def __init__(self, count: int, global_batch: int, steps: int, seed: int, shuffle: bool,
                 foreground: np.ndarray | None = None, foreground_fraction: float = 0.0):
        self.count, self.global_batch, self.steps, self.seed = count, global_batch, steps, seed
        self.shuffle = shuffle
        self.foreground = np.asarray(foreground if foreground is not None else [], np.int64)
        forced = int(round(foreground_fraction * global_batch)) if len(self.foreground) else 0
        self.forced = forced if shuffle else 0

    def epoch(self, epoch: int) -> np.ndarray:
        """(steps, global_batch) int64 sample positions."""
        total = self.steps * self.global_batch
        if not self.shuffle:
            return ((epoch * total + np.arange(total)) % self.count).reshape(self.steps, self.global_batch)
        rng = np.random.default_rng([self.seed, epoch])
        free = self.global_batch - self.forced
        rows = _draw(rng, np.arange(self.count), self.steps * free).reshape(self.steps, free)
        if self.forced:
            forced = _draw(rng, self.foreground, self.steps * self.forced).reshape(self.steps, self.forced)
            rows = rng.permuted(np.concatenate([forced, rows], axis=1), axis=1)
        return rows


def _draw(rng: np.random.Generator, pool: np.ndarray, n: int) -> np.ndarray:
    """n positions from chained permutations of ``pool`` (every sample once before any twice)."""
    rounds = math.ceil(n / len(pool))
    return np.concatenate([rng.permutation(pool) for _ in range(rounds)])[:n]


@dataclass(frozen=True)
class ValidationPlan:
    """The validation samples in order: ``samples[i]`` (a slice, or a crop number) of case ``cases[i]``."""

    case_ids: tuple[str, ...]
    positions: np.ndarray  # source position (2D: slice row; 3D: case position)
    numbers: np.ndarray    # 3D: crop number within the case; 2D: unused (0)
    cases: np.ndarray      # case index into case_ids

    def batches(self, global_batch: int) -> int:
        return math.ceil(len(self.cases) / global_batch)

    def padded(self, global_batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(positions, numbers, cases) padded to whole global batches; padding rows have case -1."""
        pad = self.batches(global_batch) * global_batch - len(self.cases)
        return (np.concatenate([self.positions, np.full(pad, self.positions[0])]),
                np.concatenate([self.numbers, np.zeros(pad, np.int64)]),
                np.concatenate([self.cases, np.full(pad, PAD_CASE)]))


def evenly_spread(count: int, keep: int) -> np.ndarray:
    """``keep`` of ``range(count)``, evenly spaced and deterministic (all when keep >= count)."""
    if keep >= count:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, keep).round().astype(np.int64))


@dataclass
class Streams:
    """What the training loop reads, for one worker."""

    shard: Shard
    global_batch: int
    steps_per_epoch: int
    validation: ValidationPlan
    train_samples: int
    input_shape: tuple[int, ...]
    regions: RegionSet
    _train: Callable[[int, int], tf.data.Dataset]
    _validation: Callable[[], tf.data.Dataset]
    _panels: Callable[[int], tuple[np.ndarray, np.ndarray]]

    @property
    def batch(self) -> int:
        """Rows this worker reads of each global batch."""
        return self.global_batch // self.shard.size

    @property
    def validation_steps(self) -> int:
        return self.validation.batches(self.global_batch)

    def train(self, epoch: int, first_step: int = 0) -> tf.data.Dataset:
        """This worker's batches of ``epoch``, from ``first_step`` to the epoch's end."""
        return self._train(epoch, first_step)

    def validation_batches(self) -> tf.data.Dataset:
        """This worker's (images, masks, case index) validation batches, in a fixed order."""
        return self._validation()

    def panel_samples(self, count: int = 4) -> tuple[np.ndarray, np.ndarray]:
        """Images and masks that show tumour, from distinct validation cases (TensorBoard)."""
        return self._panels(count)


def build_streams(settings: Settings, shard: Shard, global_batch: int) -> Streams:
    """The 2D (prepared slices) or 3D (crops of prepared volumes) streams for worker ``shard``."""
    if global_batch % shard.size:
        raise ConfigError(f"global batch {global_batch} does not split over {shard.size} workers")
    regions = RegionSet(settings.model.regions)
    build = _slice_streams if kind_of(settings.train.model).slices else _crop_streams
    return build(settings, shard, global_batch, regions)


def _steps(settings: Settings, samples: int, global_batch: int) -> int:
    steps = settings.train.steps_per_epoch or samples // global_batch
    if steps < 1:
        raise DataError(f"{samples} training sample(s) do not fill one global batch of {global_batch}; "
                        f"set train.steps_per_epoch (samples are then reused) or lower train.batch_size")
    return steps


def _validation_budget(settings: Settings, global_batch: int, cases: int) -> int | None:
    """Samples allowed by train.validation_steps (None = all), never fewer than one per case."""
    steps = settings.train.validation_steps
    if not steps:
        return None
    budget = steps * global_batch
    if budget < cases:
        raise ConfigError(f"train.validation_steps={steps} x global batch {global_batch} = {budget} sample(s) "
                          f"cannot cover the {cases} validation cases; raise it or set 0 (whole split)")
    return budget


def _slice_streams(settings: Settings, shard: Shard, global_batch: int, regions: RegionSet) -> Streams:
    data, train = settings.data, settings.train
    context = settings.model.context_slices_2d, settings.model.context_stride_2d
    slices = prepared_dataset(settings).slices_file(data.image_size)
    train_source = SliceSource(slices, "train", data.channels, regions, *context)
    val_source = SliceSource(slices, "val", data.channels, regions, *context)
    steps = _steps(settings, train_source.count, global_batch)
    schedule = TrainSchedule(train_source.count, global_batch, steps, train.seed, data.shuffle,
                             train_source.tumour_positions(), data.tumour_slice_fraction)
    plan = _slice_validation_plan(val_source, _validation_budget(settings, global_batch,
                                                                 len(val_source.case_ids)))
    shape = train_source.image_shape
    reader = _batch_reader(lambda positions, _: train_source.read(positions), shape, len(regions))
    val_reader = _batch_reader(lambda positions, _: val_source.read(positions), shape, len(regions))

    def panels(count: int):
        rows = _most_tumour_per_case(val_source.case, val_source.region_voxels[:, 0], count)
        return val_source.read(rows)

    return Streams(shard, global_batch, steps, plan, train_source.count, shape, regions,
                   _train_stream(schedule, shard, reader, settings, spatial_dims=2),
                   _validation_stream(plan, shard, global_batch, val_reader, data), panels)


def _slice_validation_plan(source: SliceSource, budget: int | None) -> ValidationPlan:
    rows = []
    cases = np.unique(source.case)
    for case in cases:
        case_rows = np.flatnonzero(source.case == case)
        if budget is not None:  # an equal share per case, spread over the case's slices
            share = max(1, budget // len(cases))
            case_rows = case_rows[evenly_spread(len(case_rows), share)]
        rows.append(case_rows)
    positions = np.concatenate(rows)
    return ValidationPlan(tuple(source.case_ids), positions, np.zeros(len(positions), np.int64),
                          source.case[positions])


def _most_tumour_per_case(case_of: np.ndarray, tumour: np.ndarray, count: int) -> np.ndarray:
    """The row with the most tumour of each case, for the ``count`` cases with the largest ones."""
    best = {}
    for row in np.argsort(-tumour, kind="stable"):
        best.setdefault(int(case_of[row]), int(row))
    rows = sorted(best.values(), key=lambda r: -tumour[r])[:count]
    return np.asarray(sorted(rows), np.int64)


def _crop_streams(settings: Settings, shard: Shard, global_batch: int, regions: RegionSet) -> Streams:
    data, train = settings.data, settings.train
    prepared = prepared_dataset(settings)
    dataset = raw_dataset(settings, prepared)
    split = prepared.split
    arrays = case_arrays(dataset, prepared.volume_cache())
    missing = [c for c in split["train"] + split["val"] if c not in arrays]
    if missing:
        raise TrainingError(f"{prepared.manifest_path}: case {missing[0]} is not a labelled case of "
                            f"{dataset.describe()} (re-run prepare)")
    if not split["train"] or not split["val"]:
        raise DataError(f"{prepared.manifest_path}: needs at least one training and one validation case")
    train_source = CropSource([arrays[c] for c in split["train"]], data.crop_size, data.channels, regions,
                              data.tumour_crop_fraction, train.seed)
    val_source = CropSource([arrays[c] for c in split["val"]], data.crop_size, data.channels, regions,
                            data.tumour_crop_fraction, train.seed)
    # A 3D "sample" is a case, of which there are few: an epoch is at least one step of random crops.
    steps = train.steps_per_epoch or max(1, train_source.count // global_batch)
    schedule = TrainSchedule(train_source.count, global_batch, steps, train.seed, data.shuffle)
    cases = len(split["val"])
    per_case = data.val_crops_per_case
    budget = _validation_budget(settings, global_batch, cases)
    if budget is not None:
        per_case = max(1, min(per_case, budget // cases))
    plan = ValidationPlan(tuple(split["val"]), np.repeat(np.arange(cases), per_case),
                          np.tile(np.arange(per_case), cases), np.repeat(np.arange(cases), per_case))
    shape = train_source.image_shape
    reader = _batch_reader(train_source.read, shape, len(regions))
    val_reader = _batch_reader(val_source.read_validation, shape, len(regions))

    def panels(count: int):
        chosen = np.arange(min(count, cases))
        return val_source.read_validation(chosen, np.zeros(len(chosen), np.int64))

    return Streams(shard, global_batch, steps, plan, train_source.count, shape, regions,
                   _train_stream(schedule, shard, reader, settings, spatial_dims=3),
                   _validation_stream(plan, shard, global_batch, val_reader, data), panels)


def _batch_reader(read, image_shape: tuple[int, ...], regions: int):
    """A tf.data map function around a numpy ``read(positions, numbers) -> (images, masks)``."""
    def read_batch(positions, numbers):
        images, masks = tf.numpy_function(read, [positions, numbers], [tf.float32, tf.float32])
        images.set_shape([None, *image_shape])
        masks.set_shape([None, *image_shape[:-1], regions])
        return images, masks
    return read_batch


def _train_stream(schedule: TrainSchedule, shard: Shard, read_batch, settings: Settings,
                  spatial_dims: int) -> Callable[[int, int], tf.data.Dataset]:
    data, seed = settings.data, settings.train.seed
    batch, global_batch, steps = schedule.global_batch // shard.size, schedule.global_batch, schedule.steps

    def stream(epoch: int, first_step: int = 0) -> tf.data.Dataset:
        positions = shard.part(schedule.epoch(epoch).T).T[first_step:]  # (steps left, b)
        serials = epoch * steps + np.arange(first_step, steps, dtype=np.int64)  # global step numbers
        # Each sample's serial number in the run (3D: its crop's counter), the same in every mode.
        numbers = serials[:, None] * global_batch + shard.part(np.arange(global_batch))[None, :]
        ds = tf.data.Dataset.from_tensor_slices((serials, positions, numbers))

        def load(serial, rows, counters):
            images, masks = read_batch(rows, counters)
            images.set_shape([batch, *images.shape[1:]])
            masks.set_shape([batch, *masks.shape[1:]])
            if data.augment:
                images, masks = augment_batch(images, masks, tf.stack([tf.constant(seed, tf.int64), serial]),
                                              spatial_dims, shard)
            return images, masks

        ds = ds.map(load, num_parallel_calls=data.parallel_calls or tf.data.AUTOTUNE, deterministic=True)
        return ds.prefetch(data.prefetch or tf.data.AUTOTUNE)

    return stream


def _validation_stream(plan: ValidationPlan, shard: Shard, global_batch: int, read_batch,
                       data) -> Callable[[], tf.data.Dataset]:
    batch = global_batch // shard.size
    positions, numbers, cases = (shard.part(a.reshape(-1, global_batch).T).T
                                 for a in plan.padded(global_batch))

    def stream() -> tf.data.Dataset:
        ds = tf.data.Dataset.from_tensor_slices((positions, numbers, cases))

        def load(rows, counters, case):
            images, masks = read_batch(rows, counters)
            images.set_shape([batch, *images.shape[1:]])
            masks.set_shape([batch, *masks.shape[1:]])
            return images, masks, case

        ds = ds.map(load, num_parallel_calls=data.parallel_calls or tf.data.AUTOTUNE, deterministic=True)
        return ds.prefetch(data.prefetch or tf.data.AUTOTUNE)

    return stream


__all__ = ["Streams", "TrainSchedule", "ValidationPlan", "build_streams", "evenly_spread", "PAD_CASE"]
