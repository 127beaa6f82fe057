"""Build the training and validation streams for a model kind from typed settings."""
from __future__ import annotations

from dataclasses import dataclass

import tensorflow as tf

from trainer.config.settings import DataSettings, Settings
from trainer.data.decathlon import case_arrays, read_index
from trainer.data.pipeline import PipelineOptions, Shard, crops_dataset, slices_dataset
from trainer.data.split import load_split
from trainer.errors import TrainingError


@dataclass(frozen=True)
class TrainData:
    train: tf.data.Dataset
    val: tf.data.Dataset
    steps_per_epoch: int
    validation_steps: int
    train_samples: int  # in this shard
    val_samples: int
    input_shape: tuple[int, ...]


def _options(data: DataSettings, batch_size: int, seed: int, training: bool) -> PipelineOptions:
    return PipelineOptions(batch_size=batch_size, seed=seed, training=training, augment=data.augment,
                           shuffle=data.shuffle, shuffle_buffer=data.shuffle_buffer,
                           parallel_calls=data.parallel_calls, prefetch=data.prefetch)


def build_datasets(settings: Settings, shard: Shard, seed_offset: int = 0) -> TrainData:
    """``seed_offset`` (e.g. the resume epoch) keeps a resumed run from replaying epoch 0's order."""
    data, train = settings.data, settings.train
    batch = train.batch_size
    # Each shard draws its own shuffles, crops and augmentations: identical random choices on
    # every rank would make N workers see N correlated copies of the same augmentation.
    seed = train.seed + seed_offset + 1_000_003 * shard.rank
    if train.model == "2d":
        train_ds, n_train = slices_dataset(data.slices_h5, "train", data.channels, shard,
                                           _options(data, batch, seed, True))
        val_ds, n_val = slices_dataset(data.slices_h5, "val", data.channels, shard,
                                       _options(data, batch, seed, False))
        input_shape = (data.image_size, data.image_size, len(data.channels))
    else:
        index = read_index(data.decathlon_dir, data.max_voxels)
        split = load_split(data.decathlon_split)
        arrays = case_arrays(index, data.cache_dir)
        missing = [c for c in split["train"] + split["val"] if c not in arrays]
        if missing:
            raise TrainingError(f"{data.decathlon_split}: case {missing[0]} is not in "
                                f"{data.decathlon_dir / 'dataset.json'} (re-run prepare)")
        train_ds, n_train = crops_dataset([arrays[c] for c in split["train"]], data.crop_size, data.channels,
                                          data.tumour_crop_fraction, shard, _options(data, batch, seed, True),
                                          index.label_set)
        val_ds, n_val = crops_dataset([arrays[c] for c in split["val"]], data.crop_size, data.channels,
                                      1.0, shard, _options(data, batch, seed + 1, False), index.label_set)
        input_shape = (*data.crop_size, len(data.channels))
    steps = train.steps_per_epoch or max(1, n_train // batch)
    val_steps = train.validation_steps or max(1, n_val // batch)
    return TrainData(train_ds, val_ds, steps, val_steps, n_train, n_val, input_shape)
