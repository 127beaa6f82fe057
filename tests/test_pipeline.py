"""Unit tests of the tf.data pipelines: sharding, seeded order, paired augmentation, 3D crops.

Everything is tiny (an 8 x 8 HDF5 written here, 16^3 crops of the session Decathlon fixture)
and single-threaded where it matters, so the file runs in a few seconds.
"""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import tensorflow as tf

from trainer.config.settings import MODALITIES
from trainer.data.decathlon import case_arrays, read_index
from trainer.data.pipeline import PipelineOptions, Shard, augment_batch, crops_dataset, slices_dataset
from trainer.errors import DataError

SIZE = 8
COUNT = 16
BATCH = 4


def options(seed: int = 1, shuffle: bool = True, augment: bool = False, training: bool = True,
            batch: int = BATCH) -> PipelineOptions:
    return PipelineOptions(batch_size=batch, seed=seed, training=training, augment=augment, shuffle=shuffle,
                           parallel_calls=1, prefetch=1)


@pytest.fixture
def indexed_h5(tmp_path):
    """A prepare2d-layout file whose sample i has every image voxel = i (and channel c adds 100 c)."""
    path = tmp_path / "slices.h5"
    with h5py.File(path, "w") as h5:
        for split, count in (("train", COUNT), ("val", 4)):
            group = h5.create_group(split)
            index = np.arange(count, dtype=np.float32)[:, None, None, None]
            channel = 100 * np.arange(len(MODALITIES), dtype=np.float32)
            group["images"] = np.broadcast_to(index + channel, (count, SIZE, SIZE, len(MODALITIES))).copy()
            group["masks"] = np.zeros((count, SIZE, SIZE, 1), np.uint8)
    return path


def sample_ids(images) -> list[int]:
    """The sample index each image of a batch was read from (channel 0 encodes it)."""
    values = images.numpy()[..., 0]
    assert np.all(values == values[:, :1, :1]), "an image mixes samples"
    return [int(v) for v in values[:, 0, 0]]


def first_batches(ds, n: int) -> list[list[int]]:
    return [sample_ids(images) for images, _ in ds.take(n)]


# ---------------------------------------------------------------- Shard.take

@pytest.mark.parametrize("count,size", [(10, 1), (10, 3), (16, 4), (7, 7), (9, 2)])
def test_shard_take_is_disjoint_equal_and_in_range(count, size):
    parts = [Shard(rank, size).take(count) for rank in range(size)]
    assert {len(p) for p in parts} == {count // size}
    union = np.concatenate(parts)
    assert len(set(union.tolist())) == len(union)  # disjoint
    assert union.min() >= 0 and union.max() < count


def test_shard_take_refuses_fewer_samples_than_workers():
    with pytest.raises(DataError, match="cannot be split across 4 workers"):
        Shard(0, 4).take(3)


# ---------------------------------------------------------------- 2D slices

def test_slices_read_the_selected_channels_in_order(indexed_h5):
    ds, n = slices_dataset(indexed_h5, "train", ("t2", "flair"), Shard(), options(shuffle=False))
    images, masks = next(iter(ds))
    assert n == COUNT
    assert images.shape == (BATCH, SIZE, SIZE, 2) and masks.shape == (BATCH, SIZE, SIZE, 1)
    assert images.numpy()[0, 0, 0].tolist() == [300.0, 0.0]  # t2 is modality 3, flair modality 0
    assert [int(v) for v in images.numpy()[:, 0, 0, 1]] == [0, 1, 2, 3]


def test_slices_same_seed_same_order_and_other_seed_other_order(indexed_h5):
    def batches(seed):
        ds, _ = slices_dataset(indexed_h5, "train", ("flair",), Shard(), options(seed=seed))
        return first_batches(ds, 8)  # two epochs of 4 batches

    first = batches(7)
    assert batches(7) == first
    assert batches(8) != first
    epoch0, epoch1 = sum(first[:4], []), sum(first[4:], [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(COUNT))  # each epoch is a permutation
    assert epoch0 != list(range(COUNT))  # actually shuffled
    assert epoch0 != epoch1  # reshuffled each epoch


def test_slices_validation_is_not_shuffled(indexed_h5):
    ds, _ = slices_dataset(indexed_h5, "train", ("flair",), Shard(), options(seed=7, training=False))
    assert sum(first_batches(ds, 4), []) == list(range(COUNT))


def test_two_shards_read_disjoint_samples(indexed_h5):
    seen = []
    for rank in range(2):
        ds, n = slices_dataset(indexed_h5, "train", ("flair",), Shard(rank, 2), options(seed=3 + rank))
        assert n == COUNT // 2
        seen.append(set(sum(first_batches(ds, 4), [])))  # two shard-epochs
    assert len(seen[0]) == len(seen[1]) == COUNT // 2
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(COUNT))


# ---------------------------------------------------------------- augmentation

def paired_batch(spatial_shape, batch=6, seed=0):
    """Random binary masks; image channel 0 is the mask, channel 1 a position-encoding ramp."""
    rng = np.random.default_rng(seed)
    masks = (rng.random((batch, *spatial_shape, 1)) < 0.3).astype(np.float32)
    ramp = np.arange(np.prod(spatial_shape), dtype=np.float32).reshape(spatial_shape)
    ramp = np.broadcast_to(ramp[None, ..., None], masks.shape)
    return tf.constant(np.concatenate([masks, ramp], axis=-1)), tf.constant(masks)


@pytest.mark.parametrize("spatial_shape", [(8, 8), (6, 6, 4), (8, 6, 4)])
def test_augment_applies_the_same_transform_to_image_and_mask(spatial_shape):
    images, masks = paired_batch(spatial_shape)
    changed = 0
    for step in range(4):
        seed = tf.constant([11, step], tf.int64)
        out_images, out_masks = augment_batch(images, masks, seed, spatial_dims=len(spatial_shape))
        assert out_images.shape == images.shape and out_masks.shape == masks.shape
        np.testing.assert_array_equal(out_images.numpy()[..., :1], out_masks.numpy())
        # The ramp channel is a permutation of the positions: a pure flip/rotation, no resampling.
        np.testing.assert_array_equal(np.sort(out_images.numpy()[..., 1].reshape(len(images), -1), axis=1),
                                      np.sort(images.numpy()[..., 1].reshape(len(images), -1), axis=1))
        again = augment_batch(images, masks, seed, spatial_dims=len(spatial_shape))
        np.testing.assert_array_equal(again[0].numpy(), out_images.numpy())
        np.testing.assert_array_equal(again[1].numpy(), out_masks.numpy())
        changed += int(np.sum(np.any(out_images.numpy() != images.numpy(),
                                     axis=tuple(range(1, images.ndim)))))
    assert changed > 0, "augmentation never changed a sample"


def test_augment_is_per_sample_and_seed_dependent():
    images, masks = paired_batch((8, 8), batch=16)
    a = augment_batch(images, masks, tf.constant([1, 0], tf.int64), spatial_dims=2)[0].numpy()
    b = augment_batch(images, masks, tf.constant([2, 0], tf.int64), spatial_dims=2)[0].numpy()
    assert not np.array_equal(a, b)
    ramps = a[..., 1].reshape(16, -1)
    assert len({r.tobytes() for r in ramps}) > 1  # samples of one batch get different transforms


def test_augment_off_for_validation_and_on_for_training(indexed_h5):
    # Constant-per-sample images are flip-invariant, so look at the pipeline wiring through masks.
    with h5py.File(indexed_h5, "r+") as h5:
        masks = h5["train"]["masks"]
        masks[:, 0, :3, 0] = 1  # an asymmetric mark in one corner row
    val, _ = slices_dataset(indexed_h5, "train", ("flair",), Shard(), options(augment=True, training=False))
    train, _ = slices_dataset(indexed_h5, "train", ("flair",), Shard(), options(augment=True, shuffle=False))
    reference = np.zeros((SIZE, SIZE), np.float32)
    reference[0, :3] = 1
    for _, batch_masks in val.take(4):
        assert all(np.array_equal(m[..., 0], reference) for m in batch_masks.numpy())
    moved = [not np.array_equal(m[..., 0], reference) for _, ms in train.take(4) for m in ms.numpy()]
    assert any(moved)


# ---------------------------------------------------------------- 3D crops

@pytest.fixture(scope="module")
def decathlon_cases(decathlon_dataset):
    index = read_index(decathlon_dataset)
    arrays = case_arrays(index, None)  # NIfTI reads: no cache to build
    return [arrays[c.case_id] for c in index.training], index.label_set


def test_crops_have_the_crop_shape_and_tumour_centred_crops_hold_tumour(decathlon_cases):
    cases, label_set = decathlon_cases
    crop = (16, 12, 8)
    ds, n = crops_dataset(cases, crop, ("flair", "t2"), 1.0, Shard(), options(seed=4, batch=2), label_set)
    assert n == len(cases)
    for images, masks in ds.take(3):
        assert images.shape == (2, *crop, 2) and masks.shape == (2, *crop, 1)
        assert set(np.unique(masks.numpy())) <= {0.0, 1.0}
        assert np.all(masks.numpy().reshape(2, -1).sum(axis=1) > 0), "a tumour-centred crop has no tumour"


def test_crops_are_deterministic_for_a_seed(decathlon_cases):
    cases, label_set = decathlon_cases

    def first(seed):
        ds, _ = crops_dataset(cases, (16, 16, 16), ("flair",), 0.0, Shard(), options(seed=seed, batch=2),
                              label_set)
        return next(iter(ds))[0].numpy()

    a = first(9)
    np.testing.assert_array_equal(first(9), a)
    assert not np.array_equal(first(10), a)


def test_random_crops_stay_inside_the_brain(tmp_path):
    """Non-tumour crops come from the brain's bounding box, not the air around the head."""
    from trainer.data.decathlon import CaseArrays, DecathlonCase

    image = np.zeros((48, 48, 32, 4), np.float32)
    image[20:36, 24:40, 10:26] = 1.0  # a 16^3 "brain" in one corner of a mostly empty volume
    np.save(tmp_path / "c.image.npy", image)
    np.save(tmp_path / "c.mask.npy", np.zeros((48, 48, 32), np.uint8))
    case = CaseArrays(DecathlonCase("c", tmp_path / "c.nii.gz", None), tmp_path / "c.image.npy",
                      tmp_path / "c.mask.npy")
    ds, _ = crops_dataset([case], (16, 16, 16), ("flair",), 0.0, Shard(), options(seed=3, batch=4))
    for images, _ in ds.take(3):
        assert np.all(images.numpy() == 1.0), "a random crop left the brain's bounding box"
