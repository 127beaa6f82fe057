"""2.5D context slices for the 2D model: order, stride, edges, training reads equal inference stacks,
k = 0 is today's model, and a context run trains, predicts and exports with parity."""
from __future__ import annotations

import json

import numpy as np
import pytest

from support.data import brats_case_folders, run_cli
from trainer.config.settings import MODALITIES, ModelSettings
from trainer.data.context import context_offsets, neighbour_rows, stack_volume_context
from trainer.data.datasets import RawDataset
from trainer.data.pipeline import SliceSource
from trainer.data.prepare2d import brain_slices, resize_slices
from trainer.data.prepared import PreparedDataset
from trainer.data.regions import RegionSet


def test_the_order_is_the_slice_then_its_neighbours_nearest_first():
    assert context_offsets(0) == [0]
    assert context_offsets(2) == [0, -1, 1, -2, 2]
    assert context_offsets(2, stride=3) == [0, -3, 3, -6, 6]  # the same planes, three times as far


def test_volume_stacks_shift_each_plane_and_pad_with_zeros():
    volume = np.arange(2 * 3 * 5 * 2, dtype=np.float32).reshape(2, 3, 5, 2) + 1
    stacked = stack_volume_context(volume, 1)
    assert stacked.shape == (2, 3, 5, 6)
    np.testing.assert_array_equal(stacked[..., 0:2], volume)
    np.testing.assert_array_equal(stacked[:, :, 1:, 2:4], volume[:, :, :-1])  # plane -1: the slice below
    np.testing.assert_array_equal(stacked[:, :, :-1, 4:6], volume[:, :, 1:])  # plane +1: the slice above
    assert not stacked[:, :, 0, 2:4].any() and not stacked[:, :, -1, 4:6].any()  # past the volume's ends
    assert stack_volume_context(volume, 0) is volume
    strided = stack_volume_context(volume, 1, stride=2)
    np.testing.assert_array_equal(strided[:, :, 2:, 2:4], volume[:, :, :-2])  # plane -2
    np.testing.assert_array_equal(strided[:, :, :-2, 4:6], volume[:, :, 2:])  # plane +2
    assert not strided[:, :, :2, 2:4].any() and not strided[:, :, -2:, 4:6].any()
    far = stack_volume_context(volume, 1, stride=8)  # reaching past both ends of a 5-slice volume
    np.testing.assert_array_equal(far[..., :2], volume)
    assert not far[..., 2:].any()


def test_neighbours_stay_within_a_case_and_its_stored_slices():
    case = np.array([0, 0, 0, 1, 1, 1])
    z = np.array([10, 11, 13, 4, 5, 6])  # case 0 has no stored slice 12
    rows = neighbour_rows(np.arange(6), case, z, 1)
    assert rows.tolist() == [[0, -1, 1], [1, 0, -1], [2, -1, -1], [3, -1, 4], [4, 3, 5], [5, 4, -1]]
    strided = neighbour_rows(np.arange(6), case, z, 1, stride=2)  # row arithmetic fails where 12 is missing
    assert strided.tolist() == [[0, -1, -1], [1, -1, 2], [2, 1, -1], [3, -1, 5], [4, -1, -1], [5, 3, -1]]


@pytest.fixture(scope="module")
def sources(brats_slices):
    regions = RegionSet(("wt", "tc", "et"))
    out = {k: SliceSource(brats_slices, "train", ("flair", "t1ce"), regions, k) for k in (0, 2)}
    out["strided"] = SliceSource(brats_slices, "train", ("flair", "t1ce"), regions, 2, context_stride=3)
    return out


def test_training_reads_carry_the_context_planes(sources):
    plain, context = sources[0], sources[2]
    assert plain.image_shape[-1] == 2 and context.image_shape[-1] == 10
    rows = np.arange(context.count)
    images, masks = context.read(rows)
    alone, alone_masks = plain.read(rows)
    np.testing.assert_array_equal(images[..., :2], alone)  # the slice itself first: k = 0 reads it as before
    np.testing.assert_array_equal(masks, alone_masks)
    neighbours = neighbour_rows(rows, context.case, context.z, 2)
    for column in range(1, 5):
        present = neighbours[:, column] >= 0
        np.testing.assert_array_equal(images[present, ..., 2 * column:2 * column + 2],
                                      alone[neighbours[present, column]])
        assert not images[~present, ..., 2 * column:2 * column + 2].any()
    first = np.flatnonzero(np.diff(np.r_[-1, context.case]))  # each case's lowest stored slice
    assert not images[first, ..., 2:4].any()  # nothing below it


@pytest.mark.parametrize("key, stride", [(2, 1), ("strided", 3)])
def test_inference_stacks_equal_the_training_reads(sources, prepared_brats, brats_dataset, key, stride):
    """The predictor builds each slice's context from the whole volume; training read it from the
    prepared slices. Both must give the model the same numbers."""
    context = sources[key]
    case_id = context.case_ids[0]
    raw = RawDataset.open(brats_dataset).by_id()[case_id]
    image, _, _ = raw.load()
    channels = [MODALITIES.index(c) for c in ("flair", "t1ce")]
    keep = brain_slices(image)
    stacked = resize_slices(stack_volume_context(image[..., channels], 2, stride)[:, :, keep], context.size)
    rows = np.flatnonzero(context.case == 0)
    assert PreparedDataset.open(prepared_brats).split["train"][0] == case_id
    np.testing.assert_allclose(stacked, context.read(rows)[0], atol=1e-5)


def test_slices_with_many_channels_shrink_like_four_at_a_time():
    """Seen: 5 planes x 4 modalities = 20 channels, shrunk 240 -> 128, made OpenCV's area resize
    fail (it takes at most 4 channels); every channel must come out as it would alone."""
    volume = np.random.default_rng(0).normal(size=(240, 240, 3, 20)).astype(np.float32)
    together = resize_slices(volume, 128)
    assert together.shape == (3, 128, 128, 20)
    for channel in (0, 5, 19):
        np.testing.assert_allclose(together[..., channel], resize_slices(volume[..., channel:channel + 1], 128)[..., 0],
                                   atol=1e-6)


def test_no_context_is_todays_model():
    import tensorflow as tf  # noqa: F401

    from trainer.models import UNet2D, build_model

    today = UNet2D(ModelSettings(), 4, 128)
    same = build_model("2d", ModelSettings(context_slices_2d=0), 4, 128, None)
    assert same.get_config() == today.get_config() and same.count_params() == today.count_params()
    wider = build_model("2d", ModelSettings(context_slices_2d=1), 4, 128, None)
    assert wider.input_shape == (None, 128, 128, 12)


@pytest.mark.slow
def test_a_context_run_trains_predicts_and_exports_with_parity(prepared_brats, brats_dataset, tmp_path):
    flags = ["--set", "model.base_filters_2d=4", "--set", "train.batch_size=4", "--set", "train.steps_per_epoch=2",
             "--set", "train.validation_steps=1", "--set", f"data.dataset={prepared_brats}", "--quiet"]
    trained = run_cli("train", "--run-name", "ctx", "--epochs", "1", "--set", "model.context_slices_2d=1",
                      "--set", "model.context_stride_2d=2", *flags, cwd=tmp_path, timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    case = brats_case_folders(brats_dataset)[0]
    predicted = run_cli("predict", "--run-name", "ctx", case, "--out", tmp_path / "pred", "--quiet", cwd=tmp_path,
                        timeout=300)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    exported = run_cli("export", "--run-name", "ctx", cwd=tmp_path, timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:]
    report = json.loads((tmp_path / "runs" / "ctx" / "export" / "saved_model" / "export.json").read_text())
    assert report["max_abs_diff"] <= 1e-5
    refused = run_cli("predict", "--run-name", "ctx", case, "--out", tmp_path / "p2", "--set",
                      "model.context_slices_2d=0", cwd=tmp_path)
    assert refused.returncode == 2 and "model.context_slices_2d" in refused.stderr
    refused = run_cli("predict", "--run-name", "ctx", case, "--out", tmp_path / "p3", "--set",
                      "model.context_stride_2d=1", cwd=tmp_path)
    assert refused.returncode == 2 and "model.context_stride_2d" in refused.stderr
