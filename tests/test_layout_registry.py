"""Dataset layouts are registered objects: detection, the nnU-Net v2 raw layout read voxel for voxel
like the Decathlon set it was written from, prepare and predict -i on it, and a layout registered in a
test is the one RawDataset.open uses. Tiny synthetic sets, no training."""
from __future__ import annotations

import json
import multiprocessing
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from support.data import DECATHLON_CASES, DECATHLON_SEED, DECATHLON_TEST_CASES, SHAPE
from trainer.config.settings import DataSettings
from trainer.data.datasets import RawDataset, detect_layout
from trainer.data.layouts import LAYOUT_NAMES, Layout, RawCase, base, detect, named
from trainer.data.nifti import Geometry
from trainer.data.prepare import prepare_into
from trainer.data.prepared import PreparedDataset
from trainer.data.regions import DECATHLON
from trainer.data.synth.writers import NNUNET_ROOT_NAME, WRITERS, SynthRequest, write_nnunet
from trainer.errors import DataError
from trainer.inference.inputs import case_from_path, cases_in_folder

MODALITIES = ("flair", "t1", "t1ce", "t2")


@pytest.fixture(scope="module")
def nnunet_dataset(tmp_path_factory) -> Path:
    """The tiny Decathlon set's cases (same seed, count and shape) in nnU-Net v2's raw layout (read-only)."""
    out = tmp_path_factory.mktemp("nnunet-src") / NNUNET_ROOT_NAME
    return write_nnunet(SynthRequest(out=out, cases=DECATHLON_CASES, seed=DECATHLON_SEED, shape=SHAPE,
                                     test_cases=DECATHLON_TEST_CASES, workers=1), progress=False)


@pytest.fixture
def nnunet_copy(nnunet_dataset, tmp_path) -> Path:
    return Path(shutil.copytree(nnunet_dataset, tmp_path / NNUNET_ROOT_NAME))


def _edit_json(root: Path, edit) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    edit(meta)
    (root / "dataset.json").write_text(json.dumps(meta))


def test_each_layout_is_detected_by_what_its_folder_holds(brats_dataset, decathlon_dataset, nnunet_dataset):
    assert set(LAYOUT_NAMES) == {"brats", "decathlon", "nnunet"} and set(WRITERS) == set(LAYOUT_NAMES)
    for root, name in ((brats_dataset, "brats"), (decathlon_dataset, "decathlon"), (nnunet_dataset, "nnunet")):
        assert detect_layout(root) == name and detect(root) is named(name)
    assert named("brats").usual_model == "2d" and named("decathlon").usual_model == "3d"
    meta = json.loads((nnunet_dataset / "dataset.json").read_text())  # what nnU-Net's MSD converter writes
    assert {"channel_names", "labels", "numTraining", "file_ending"} <= set(meta) and "training" not in meta
    assert meta["labels"] == {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}
    assert sorted(p.name for p in (nnunet_dataset / "imagesTr").iterdir())[:4] == [
        f"BRATS_001_{c:04d}.nii.gz" for c in range(4)]
    assert sorted(p.name for p in nnunet_dataset.iterdir()) == ["dataset.json", "imagesTr", "imagesTs", "labelsTr"]


def test_a_folder_of_no_known_layout_is_refused_naming_it_and_the_layouts(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "head.nii.gz").write_bytes(b"")
    with pytest.raises(DataError) as caught:
        RawDataset.open(tmp_path)
    message = str(caught.value)
    assert str(tmp_path) in message and "no BraTS cases" in message, message
    assert all(f"{name}:" in message for name in LAYOUT_NAMES), message
    with pytest.raises(DataError, match="not found"):
        detect(tmp_path / "nowhere")


def test_nnunet_cases_read_as_the_decathlon_cases_they_were_written_from(decathlon_dataset, nnunet_dataset):
    nnunet, decathlon = RawDataset.open(nnunet_dataset), RawDataset.open(decathlon_dataset)
    assert nnunet.layout == "nnunet" and nnunet.convention is DECATHLON
    assert [c.case_id for c in nnunet.cases] == [c.case_id for c in decathlon.cases]
    assert f"({nnunet.layout}, {DECATHLON_CASES} labelled cases)" in nnunet.describe()
    for ours, theirs in zip(nnunet.cases, decathlon.cases):
        for normalise in (False, True):
            image, labels, geometry = ours.load(normalise)
            expected_image, expected_labels, expected_geometry = theirs.load(normalise)
            assert image.shape == (*SHAPE, 4) and np.array_equal(image, expected_image)
            assert np.array_equal(labels, expected_labels) and geometry == expected_geometry


def test_nnunets_brats21_form_reads_its_channels_by_name(decathlon_dataset, nnunet_copy):
    """Dataset137_BraTS21: channels T1, T1ce, T2, Flair and region labels; the same voxels come out."""
    order = ("t1", "t1ce", "t2", "flair")  # its _0000 ... _0003
    images = nnunet_copy / "imagesTr"
    for path in sorted(images.glob("*_000[0-3].nii.gz")):
        path.rename(path.with_name(path.name.replace("_000", "_x")))
    for path in sorted(images.glob("*_x*.nii.gz")):
        case, old = path.name[:-len(".nii.gz")].rsplit("_x", 1)
        path.rename(images / f"{case}_{order.index(MODALITIES[int(old)]):04d}.nii.gz")
    _edit_json(nnunet_copy, lambda meta: meta.update(
        channel_names={"0": "T1", "1": "T1ce", "2": "T2", "3": "Flair"}, regions_class_order=[1, 2, 3],
        labels={"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}))
    ours = RawDataset.open(nnunet_copy).cases[0]
    theirs = RawDataset.open(decathlon_dataset).cases[0]
    assert ours.images[0].name.endswith("_0003.nii.gz")  # flair first, wherever it is
    for got, expected in zip(ours.load(), theirs.load()):
        assert got == expected if isinstance(got, Geometry) else np.array_equal(got, expected)


@pytest.mark.parametrize("edit,words", [
    (lambda meta: meta.update(labels={"background": 0, "NETC": 1, "SNFH": 2, "ET": 3, "RC": 4}),
     ["labels", "Dataset001_BrainTumour"]),
    (lambda meta: meta.update(labels={"background": 0, "necrotic core": 1, "edema": 2, "enhancing": 3}),
     ["label 1 is 'necrotic core'"]),
    (lambda meta: meta.update(channel_names={"0": "CT", "1": "T1w", "2": "t1gd", "3": "T2w"}),
     ["channel_names", "cannot tell which channel"]),
    (lambda meta: meta.update(file_ending=".png"), ["file_ending", "NIfTI"]),
    (lambda meta: meta.pop("numTraining"), ["missing key 'numTraining'"]),
    (lambda meta: meta.update(numTraining=9), ["numTraining is 9", "4 labelled case(s)"]),
])
def test_an_nnunet_dataset_json_that_cannot_be_read_is_named(nnunet_copy, edit, words):
    _edit_json(nnunet_copy, edit)
    with pytest.raises(DataError) as caught:
        RawDataset.open(nnunet_copy)
    message = str(caught.value)
    assert str(nnunet_copy / "dataset.json") in message and "\n" not in message, message
    for text in words:
        assert text in message, message


def test_an_nnunet_case_missing_a_channel_or_its_label_is_named(nnunet_copy):
    (nnunet_copy / "imagesTr" / "BRATS_002_0002.nii.gz").unlink()
    with pytest.raises(DataError, match=r"case 'BRATS_002' has channel files _0000, _0001, _0003; expected exactly"):
        RawDataset.open(nnunet_copy)
    shutil.rmtree(nnunet_copy / "imagesTr" / ".." / "labelsTr")
    with pytest.raises(DataError, match="labelsTr: not found"):
        RawDataset.open(nnunet_copy)


def test_apple_double_files_are_ignored_in_an_nnunet_dataset(nnunet_copy):
    for sub in ("imagesTr", "labelsTr"):
        for path in sorted((nnunet_copy / sub).iterdir()):
            (path.parent / f"._{path.name}").write_bytes(b"\0" * 26)
    (nnunet_copy / "._dataset.json").write_bytes(b"\0" * 26)
    assert len(RawDataset.open(nnunet_copy).cases) == DECATHLON_CASES


def test_prepare_writes_a_prepared_dataset_from_an_nnunet_folder(nnunet_dataset, tmp_path):
    out = tmp_path / "prepared"
    prepared = prepare_into(RawDataset.open(nnunet_dataset), out, "2d", DataSettings(), workers=1, progress=False)
    assert prepared.layout == "nnunet" and (out / "prepared.json").is_file()
    reopened = PreparedDataset.open(out)
    assert reopened.layout == "nnunet" and reopened.source == nnunet_dataset.absolute()
    assert sorted(sum(reopened.split.values(), [])) == [f"BRATS_{i:03d}" for i in range(1, DECATHLON_CASES + 1)]
    assert reopened.slices and all((out / entry["file"]).is_file() for entry in reopened.slices.values())


def test_predict_finds_nnunet_test_cases_in_the_dataset_folder_or_its_imagests(nnunet_dataset):
    test_case = f"BRATS_{DECATHLON_CASES + 1:03d}"
    for folder in (nnunet_dataset, nnunet_dataset / "imagesTs"):
        cases = cases_in_folder(folder)
        assert [(c.name, c.kind) for c in cases] == [(test_case, "nnunet")]
        assert [p.name for p in cases[0].paths] == [f"{test_case}_{c:04d}.nii.gz" for c in range(4)]
    one = case_from_path(nnunet_dataset / "imagesTs" / f"{test_case}_0002.nii.gz")
    assert one == cases_in_folder(nnunet_dataset)[0]
    image, geometry, convention = one.load()
    assert image.shape == (*SHAPE, 4) and convention is DECATHLON
    assert [c.kind for c in cases_in_folder(nnunet_dataset / "imagesTr")] == ["nnunet"] * DECATHLON_CASES


def test_predict_takes_a_decathlon_dataset_folders_test_images(decathlon_dataset):
    cases = cases_in_folder(decathlon_dataset)
    assert [(c.name, c.kind) for c in cases] == [(f"BRATS_{DECATHLON_CASES + 1:03d}", "decathlon")]


class ToyLayout(Layout):
    """A throwaway layout: a folder holding toy.txt; one case of zeros."""

    name = "toy"
    title = "toy"
    usual_model = "2d"
    convention = DECATHLON
    signature = "holds toy.txt"
    absent = "no toy.txt"

    def matches(self, root):
        return (Path(root) / "toy.txt").is_file()

    def cases(self, root, max_voxels=0):
        return (RawCase("toy_1", self.name, (Path(root) / "toy.txt",), None, DECATHLON.label_set),)

    def read(self, case, normalise=True):
        identity = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
        return np.zeros((4, 3, 2, 4), np.float32), None, Geometry((1.0,) * 3, (0.0,) * 3, identity)

    def input_cases(self, folder, claimed=frozenset()):
        return []

    def input_case(self, path):
        return None

    def read_input(self, case, max_voxels=0):
        raise NotImplementedError


def test_a_registered_layout_is_the_one_raw_dataset_open_uses(tmp_path, monkeypatch):
    (tmp_path / "toy.txt").write_text("toy")
    with pytest.raises(DataError, match="not a dataset folder of a known layout"):
        RawDataset.open(tmp_path)
    monkeypatch.setattr(base, "LAYOUTS", [*base.LAYOUTS, ToyLayout()])
    dataset = RawDataset.open(tmp_path)
    assert dataset.layout == "toy" and [c.case_id for c in dataset.cases] == ["toy_1"]
    assert dataset.cases[0].load()[0].shape == (4, 3, 2, 4)  # RawCase.load finds the layout by its name
    assert "toy" in base.names() and named("toy").signature == "holds toy.txt"


def _load_elsewhere(case: RawCase) -> tuple:
    image, labels, _ = case.load()
    return image.shape, int(labels.max())


def test_an_nnunet_case_pickles_to_a_spawned_worker(nnunet_dataset):
    """prepare sends RawCase to spawn workers: plain data, the layout found by name in the new process."""
    case = RawDataset.open(nnunet_dataset).cases[0]
    assert pickle.loads(pickle.dumps(case)) == case
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.apply(_load_elsewhere, (case,)) == ((*SHAPE, 4), int(case.load()[1].max()))
