"""Unit tests of the input streams: global batches, worker slices, seeded order, resume,
case-covering validation, paired augmentation and 3D crops.

Everything is tiny (an 8 x 8 HDF5 written here, 16^3 crops of the session Decathlon fixture),
so the file runs in seconds.
"""
from __future__ import annotations

import h5py
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from trainer.config.settings import MODALITIES, DataSettings, ModelSettings, Settings, TrainSettings
from trainer.data.datasets import RawCase, RawDataset
from trainer.data.volumes import CaseArrays, case_arrays
from trainer.data.pipeline import CropSource, Shard, augment_batch
from trainer.data.streams import PAD_CASE, TrainSchedule, build_streams
from trainer.errors import ConfigError
from trainer.data.regions import RegionSet

SIZE = 8
COUNT = 16
VAL_CASES = (3, 2, 5)  # slices per validation case
BATCH = 4


@pytest.fixture
def indexed_h5(tmp_path):
    """A prepare2d-layout file whose sample i has every image voxel = i (and channel c adds 100 c).

    Training slices 0, 5, 10 and 15 hold tumour; validation has three cases of 3, 2 and 5 slices."""
    path = tmp_path / "slices.h5"
    with h5py.File(path, "w") as h5:
        h5.attrs["format_version"] = 2
        for split, cases in (("train", (COUNT,)), ("val", VAL_CASES)):
            count = sum(cases)
            group = h5.create_group(split)
            index = np.arange(count, dtype=np.float32)[:, None, None, None]
            channel = 100 * np.arange(len(MODALITIES), dtype=np.float32)
            group["images"] = np.broadcast_to(index + channel, (count, SIZE, SIZE, len(MODALITIES))).copy()
            labels = np.zeros((count, SIZE, SIZE), np.uint8)
            if split == "train":
                labels[::5, 2:4, 2:4] = 3
            else:
                labels[:, 0, :3] = 1  # an asymmetric mark in one corner row
            group["labels"] = labels
            group["region_voxels"] = np.stack([(labels > 0).sum(axis=(1, 2)), (labels >= 2).sum(axis=(1, 2)),
                                               (labels == 3).sum(axis=(1, 2))], axis=1).astype(np.int32)
            group["case"] = np.repeat(np.arange(len(cases)), cases).astype(np.int32)
            group["case_ids"] = np.array([f"{split}{i}" for i in range(len(cases))], dtype=object)
    return path


def _dataset_around(h5_path) -> Path:
    """The slices file as the 16 x 16 slices of a prepared dataset folder (its raw source unused)."""
    from trainer.data.prepared import PreparedDataset

    folder = Path(h5_path).parent
    PreparedDataset(root=folder, source=folder, layout="brats", split={"train": [], "val": [], "test": []},
                    split_settings={}, fingerprint={}, slices={"16": {"file": Path(h5_path).name}}).save()
    return folder


def settings_for(h5_path, batch=BATCH, shuffle=True, augment=False, steps=0, validation_steps=0,
                 tumour_fraction=0.0, seed=1, regions=("wt",)) -> Settings:
    data = DataSettings(dataset=_dataset_around(h5_path), channels=("flair",), image_size=16, shuffle=shuffle,
                        augment=augment,
                        tumour_slice_fraction=tumour_fraction, parallel_calls=1, prefetch=1)
    return Settings(data=data, model=ModelSettings(regions=regions),
                    train=TrainSettings(batch_size=batch, steps_per_epoch=steps, validation_steps=validation_steps,
                                        seed=seed))


def sample_ids(images) -> list[int]:
    """The sample index each image of a batch was read from (channel 0 encodes it)."""
    values = np.asarray(images)[..., 0]
    assert np.all(values == values[:, :1, :1]), "an image mixes samples"
    return [int(v) for v in values[:, 0, 0]]


def epoch_ids(streams, epoch, first_step=0) -> list[list[int]]:
    return [sample_ids(images) for images, _ in streams.train(epoch, first_step)]


# ---------------------------------------------------------------- global batches and worker slices

def test_shard_part_splits_a_global_batch_into_equal_disjoint_rows():
    rows = np.arange(12)
    parts = [Shard(rank, 3).part(rows) for rank in range(3)]
    assert [p.tolist() for p in parts] == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]


def test_schedule_same_seed_same_order_other_seed_other_order_reshuffled_each_epoch():
    first = TrainSchedule(COUNT, 4, 4, seed=7, shuffle=True)
    assert np.array_equal(first.epoch(0), TrainSchedule(COUNT, 4, 4, seed=7, shuffle=True).epoch(0))
    assert not np.array_equal(first.epoch(0), TrainSchedule(COUNT, 4, 4, seed=8, shuffle=True).epoch(0))
    epoch0, epoch1 = first.epoch(0).ravel(), first.epoch(1).ravel()
    assert sorted(epoch0) == sorted(epoch1) == list(range(COUNT))  # each epoch is a permutation
    assert epoch0.tolist() != list(range(COUNT)) and epoch0.tolist() != epoch1.tolist()


def test_schedule_without_shuffle_reads_in_order_across_epochs():
    schedule = TrainSchedule(10, 4, 2, seed=7, shuffle=False)
    assert schedule.epoch(0).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert schedule.epoch(1).tolist() == [[8, 9, 0, 1], [2, 3, 4, 5]]


def test_schedule_oversamples_foreground_in_every_batch():
    foreground = np.array([0, 5, 10, 15])
    schedule = TrainSchedule(COUNT, 6, 20, seed=3, shuffle=True, foreground=foreground, foreground_fraction=0.5)
    for batch in schedule.epoch(2):
        assert np.isin(batch, foreground).sum() >= 3
    plain = TrainSchedule(COUNT, 6, 20, seed=3, shuffle=True).epoch(2)
    assert np.isin(plain, foreground).mean() < 0.4  # the control: without forcing, about 4/16


@pytest.mark.parametrize("augment", [False, True])
def test_workers_read_exactly_their_slice_of_the_single_process_batches(indexed_h5, augment):
    """N workers x b see the samples *and augmentations* one process sees at N*b."""
    single = build_streams(settings_for(indexed_h5, batch=4, augment=augment, steps=4), Shard(), 4)
    parts = [build_streams(settings_for(indexed_h5, batch=2, augment=augment, steps=4), Shard(r, 2), 4)
             for r in range(2)]
    for epoch in (0, 1):
        whole = [(x.numpy(), y.numpy()) for x, y in single.train(epoch)]
        sliced = [list(p.train(epoch)) for p in parts]
        assert len(whole) == 4
        for step, (images, masks) in enumerate(whole):
            for rank in range(2):
                np.testing.assert_array_equal(sliced[rank][step][0].numpy(), images[rank::2])
                np.testing.assert_array_equal(sliced[rank][step][1].numpy(), masks[rank::2])


def test_an_epoch_resumed_at_step_k_continues_with_the_same_batches(indexed_h5):
    streams = build_streams(settings_for(indexed_h5, augment=True, steps=4), Shard(), 4)
    full = [(x.numpy(), y.numpy()) for x, y in streams.train(3)]
    resumed = [(x.numpy(), y.numpy()) for x, y in streams.train(3, first_step=2)]
    assert len(resumed) == 2
    for (a, b), (c, d) in zip(full[2:], resumed):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)


def test_too_few_samples_for_one_global_batch_is_a_clear_error(indexed_h5):
    from trainer.errors import DataError

    with pytest.raises(DataError, match="do not fill one global batch of 32"):
        build_streams(settings_for(indexed_h5, batch=32), Shard(), 32)


# ---------------------------------------------------------------- validation

def test_validation_covers_every_case_in_fixed_padded_batches(indexed_h5):
    streams = build_streams(settings_for(indexed_h5), Shard(), 4)
    batches = [(sample_ids(x), c.numpy().tolist()) for x, _, c in streams.validation_batches()]
    assert streams.validation_steps == len(batches) == 3  # 10 slices in batches of 4
    ids = sum((b[0] for b in batches), [])
    cases = sum((b[1] for b in batches), [])
    real = [i for i, c in zip(ids, cases) if c != PAD_CASE]
    assert real == list(range(10))  # every slice of every case, in order
    assert cases[:10] == [0, 0, 0, 1, 1, 2, 2, 2, 2, 2] and cases[10:] == [PAD_CASE, PAD_CASE]
    again = [(sample_ids(x), c.numpy().tolist()) for x, _, c in streams.validation_batches()]
    assert again == batches


def test_capped_validation_still_covers_every_case_deterministically(indexed_h5):
    streams = build_streams(settings_for(indexed_h5, batch=2, validation_steps=2), Shard(), 2)
    plan = streams.validation
    assert set(plan.cases.tolist()) == {0, 1, 2} and len(plan.cases) <= 4
    assert plan.positions.tolist() == build_streams(settings_for(indexed_h5, batch=2, validation_steps=2),
                                                    Shard(), 2).validation.positions.tolist()
    with pytest.raises(ConfigError, match="cannot cover the 3 validation cases"):
        build_streams(settings_for(indexed_h5, batch=1, validation_steps=2), Shard(), 1)


def test_validation_slices_of_two_workers_are_the_single_process_batches(indexed_h5):
    single = [(sample_ids(x), c.numpy().tolist()) for x, _, c in
              build_streams(settings_for(indexed_h5), Shard(), 4).validation_batches()]
    parts = [[(sample_ids(x), c.numpy().tolist()) for x, _, c in
              build_streams(settings_for(indexed_h5, batch=2), Shard(r, 2), 4).validation_batches()]
             for r in range(2)]
    for step, (ids, cases) in enumerate(single):
        assert parts[0][step][0] == ids[0::2] and parts[1][step][0] == ids[1::2]
        assert parts[0][step][1] == cases[0::2] and parts[1][step][1] == cases[1::2]


def test_validation_is_never_augmented(indexed_h5):
    streams = build_streams(settings_for(indexed_h5, augment=True), Shard(), 4)
    reference = np.zeros((SIZE, SIZE), np.float32)
    reference[0, :3] = 1
    for _, masks, cases in streams.validation_batches():
        for mask, case in zip(masks.numpy(), cases.numpy()):
            if case != PAD_CASE:
                np.testing.assert_array_equal(mask[..., 0], reference)


def test_panels_show_the_largest_tumour_of_distinct_cases(tmp_path, indexed_h5):
    with h5py.File(indexed_h5, "r+") as h5:
        voxels = h5["val"]["region_voxels"]
        values = voxels[()]
        values[:, 0] = [1, 7, 2, 3, 9, 0, 4, 8, 1, 1]  # case 0 peaks at row 1, case 1 at 4, case 2 at 7
        voxels[...] = values
    images, masks = build_streams(settings_for(indexed_h5), Shard(), 4).panel_samples(4)
    assert sample_ids(images) == [1, 4, 7] and masks.shape == (3, SIZE, SIZE, 1)


def test_region_masks_come_from_the_label_maps(indexed_h5):
    streams = build_streams(settings_for(indexed_h5, shuffle=False, steps=1, regions=("wt", "tc", "et")),
                            Shard(), 4)
    images, masks = next(iter(streams.train(0)))
    assert masks.shape == (4, SIZE, SIZE, 3)
    assert sample_ids(images) == [0, 1, 2, 3]
    assert masks.numpy()[0].sum(axis=(0, 1)).tolist() == [4, 4, 4]  # slice 0: a 2x2 enhancing tumour
    assert masks.numpy()[1:].sum() == 0


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


def _where_based_augment(images, masks, seed, spatial_dims, shard=Shard()):
    """The earlier whole-batch implementation (tf.where per axis and per quarter turn): the
    reference the per-sample version must match bit for bit, so runs keep their data."""
    total = images.shape[0] * shard.size

    def draws(offset, **kwargs):
        return tf.random.stateless_uniform([total], seed=seed + offset, **kwargs)[shard.rank::shard.size]

    def per_sample(flags, like):
        return tf.reshape(flags, [-1] + [1] * (len(like.shape) - 1))

    data = tf.concat([images, tf.cast(masks, images.dtype)], axis=-1)
    for axis in range(1, spatial_dims + 1):
        data = tf.where(per_sample(draws(axis) < 0.5, data), tf.reverse(data, axis=[axis]), data)
    if data.shape[1] == data.shape[2]:
        k = draws(10, maxval=4, dtype=tf.int32)
        rotated = data
        for quarter in range(1, 4):
            turned = tf.experimental.numpy.rot90(data, k=quarter, axes=(1, 2))
            rotated = tf.where(per_sample(tf.equal(k, quarter), data), turned, rotated)
        data = rotated
    channels = images.shape[-1]
    return data[..., :channels], data[..., channels:]


@pytest.mark.parametrize("spatial_shape,shard", [((8, 8), Shard()), ((6, 6, 4), Shard()), ((8, 6, 4), Shard()),
                                                 ((8, 8), Shard(1, 2))])
def test_augment_matches_the_whole_batch_reference_exactly(spatial_shape, shard):
    images, masks = paired_batch(spatial_shape, batch=16 // shard.size)
    for step in range(6):
        seed = tf.constant([5, step], tf.int64)
        got = augment_batch(images, masks, seed, spatial_dims=len(spatial_shape), shard=shard)
        want = _where_based_augment(images, masks, seed, spatial_dims=len(spatial_shape), shard=shard)
        np.testing.assert_array_equal(got[0].numpy(), want[0].numpy())
        np.testing.assert_array_equal(got[1].numpy(), want[1].numpy())


def test_augment_is_per_sample_and_seed_dependent():
    images, masks = paired_batch((8, 8), batch=16)
    a = augment_batch(images, masks, tf.constant([1, 0], tf.int64), spatial_dims=2)[0].numpy()
    b = augment_batch(images, masks, tf.constant([2, 0], tf.int64), spatial_dims=2)[0].numpy()
    assert not np.array_equal(a, b)
    ramps = a[..., 1].reshape(16, -1)
    assert len({r.tobytes() for r in ramps}) > 1  # samples of one batch get different transforms


# ---------------------------------------------------------------- 3D crops

@pytest.fixture(scope="module")
def decathlon_cases(decathlon_dataset):
    dataset = RawDataset.open(decathlon_dataset)
    arrays = case_arrays(dataset, None)  # NIfTI reads: no cache to build
    return [arrays[c.case_id] for c in dataset.cases]


def crop_source(cases, crop, channels=("flair",), tumour_fraction=0.5, seed=4, regions=("wt",)):
    return CropSource(cases, crop, channels, RegionSet(regions), tumour_fraction, seed)


def test_crops_have_the_crop_shape_and_tumour_centred_crops_hold_tumour(decathlon_cases):
    cases = decathlon_cases
    crop = (16, 12, 8)
    source = crop_source(cases, crop, ("flair", "t2"), 1.0, regions=("wt", "tc", "et"))
    images, masks = source.read(np.arange(len(cases)), np.arange(len(cases)))
    assert images.shape == (len(cases), *crop, 2) and masks.shape == (len(cases), *crop, 3)
    assert set(np.unique(masks)) <= {0.0, 1.0}
    assert np.all(masks[..., 0].reshape(len(cases), -1).sum(axis=1) > 0), "a tumour-centred crop has no tumour"
    assert np.all(masks[..., 0] >= masks[..., 1]) and np.all(masks[..., 1] >= masks[..., 2])  # nested


def test_crops_are_a_function_of_the_counter_and_seed(decathlon_cases):
    cases = decathlon_cases
    source = crop_source(cases, (16, 16, 16), tumour_fraction=0.0, seed=9)
    a = source.read(np.array([0, 1]), np.array([5, 6]))[0]
    np.testing.assert_array_equal(crop_source(cases, (16, 16, 16), tumour_fraction=0.0, seed=9).read(np.array([0, 1]), np.array([5, 6]))[0], a)
    assert not np.array_equal(source.read(np.array([0, 1]), np.array([7, 8]))[0], a)
    assert not np.array_equal(crop_source(cases, (16, 16, 16), tumour_fraction=0.0, seed=10).read(np.array([0, 1]), np.array([5, 6]))[0], a)


def test_validation_crop_zero_is_centred_on_the_tumour(decathlon_cases):
    cases = decathlon_cases
    source = crop_source(cases, (16, 16, 16))
    _, masks = source.read_validation(np.arange(len(cases)), np.zeros(len(cases), np.int64))
    centre = masks[:, 6:10, 6:10, 6:10, 0]
    assert np.all(centre.reshape(len(cases), -1).max(axis=1) == 1), "crop 0 misses the tumour centre"
    again = source.read_validation(np.arange(len(cases)), np.zeros(len(cases), np.int64))[1]
    np.testing.assert_array_equal(again, masks)


def test_random_crops_stay_inside_the_brain(tmp_path):
    """Non-tumour crops come from the brain's bounding box, not the air around the head."""
    image = np.zeros((48, 48, 32, 4), np.float32)
    image[20:36, 24:40, 10:26] = 1.0  # a 16^3 "brain" in one corner of a mostly empty volume
    np.save(tmp_path / "c.image.npy", image)
    np.save(tmp_path / "c.labels.npy", np.zeros((48, 48, 32), np.uint8))
    case = CaseArrays(RawCase("c", "decathlon", (tmp_path / "c.nii.gz",), None, frozenset({0, 1, 2, 3})),
                      tmp_path / "c.image.npy", tmp_path / "c.labels.npy")
    images, _ = crop_source([case], (16, 16, 16), tumour_fraction=0.0, seed=3).read(np.zeros(12, np.int64),
                                                                                     np.arange(12))
    assert np.all(images == 1.0), "a random crop left the brain's bounding box"
