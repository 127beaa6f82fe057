"""Corrupt or unexpected input: one clear error line, exit != 0, no traceback, nothing left behind."""
from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from support.data import SHAPE, brats_case_folders, prepare_brats_cli
from trainer.data.nifti import read_volume, write_volume

MODALITIES = ("flair", "t1", "t1ce", "t2")


def assert_clean_failure(result: subprocess.CompletedProcess, out_dir: Path, outputs: list[Path],
                         mentions: list[str]) -> str:
    """Non-zero exit, one 'error:' line naming ``mentions``, no traceback, no output or temp files."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert "error:" in line
    for text in mentions:
        assert text.lower() in line.lower(), f"{text!r} not in {line!r}"
    for output in outputs:
        assert not output.exists(), f"{output} left behind"
    if out_dir.exists():
        leftovers = [str(p) for p in out_dir.rglob("*") if ".partial" in p.name]
        assert leftovers == [], leftovers
    return line


def _brats_outputs(tmp_path: Path) -> tuple[Path, Path, list[Path]]:
    out_dir = tmp_path / "out"
    h5 = out_dir / "slices-128.h5"
    return out_dir, h5, [h5, out_dir / "prepared.json"]


def _case(brats_copy: Path, index: int = 0) -> tuple[Path, str]:
    folder = brats_case_folders(brats_copy)[index]
    return folder, folder.name


def _prepare(brats_copy: Path, tmp_path: Path, workers: str = "1"):
    out_dir, h5, outputs = _brats_outputs(tmp_path)
    result = prepare_brats_cli(brats_copy, out_dir, tmp_path, "--workers", workers)
    return result, out_dir, outputs


# ---------------------------------------------------------------- BraTS

def test_missing_modality(brats_copy, tmp_path):
    folder, name = _case(brats_copy, 2)
    (folder / f"{name}_t1ce.nii.gz").unlink()
    result, out_dir, outputs = _prepare(brats_copy, tmp_path)
    assert_clean_failure(result, out_dir, outputs, [name, "missing", "t1ce"])


def test_missing_segmentation(brats_copy, tmp_path):
    folder, name = _case(brats_copy, 1)
    (folder / f"{name}_seg.nii.gz").unlink()
    result, out_dir, outputs = _prepare(brats_copy, tmp_path)
    assert_clean_failure(result, out_dir, outputs, [name, "missing segmentation"])


def test_seg_shape_differs_from_images(brats_copy, tmp_path):
    folder, name = _case(brats_copy, 3)
    seg = folder / f"{name}_seg.nii.gz"
    geometry = read_volume(seg).geometry
    short = (*SHAPE[:2], SHAPE[2] - 2)
    write_volume(seg, np.zeros(short, dtype=np.uint8), geometry)
    result, out_dir, outputs = _prepare(brats_copy, tmp_path)
    assert_clean_failure(result, out_dir, outputs, [seg.name, "shape", str(short), str(SHAPE)])


def test_modality_shape_differs(brats_copy, tmp_path):
    folder, name = _case(brats_copy, 0)
    t2 = folder / f"{name}_t2.nii.gz"
    transposed = (SHAPE[1], SHAPE[0], SHAPE[2])  # x and y swapped
    write_volume(t2, np.ones(transposed, dtype=np.int16), read_volume(t2).geometry)
    result, out_dir, outputs = _prepare(brats_copy, tmp_path)
    assert_clean_failure(result, out_dir, outputs, [t2.name, "shape", str(transposed)])


@pytest.mark.parametrize("modality", ["flair", "seg"])
def test_truncated_nii_gz(brats_copy, tmp_path, modality):
    folder, name = _case(brats_copy, 4)
    path = folder / f"{name}_{modality}.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    result, out_dir, outputs = _prepare(brats_copy, tmp_path)
    line = assert_clean_failure(result, out_dir, outputs, [path.name])
    assert "truncated" in line or "corrupt" in line, line


def test_truncated_uncompressed_nii(brats_copy, tmp_path):
    folder, name = _case(brats_copy, 4)
    source = folder / f"{name}_t1.nii.gz"
    volume = read_volume(source)
    path = folder / f"{name}_t1.nii"
    write_volume(path, volume.array, volume.geometry, compress=False)
    source.unlink()
    data = path.read_bytes()
    assert len(data) > 352 + volume.array.size  # header + int16 voxels
    path.write_bytes(data[: len(data) // 2])
    result, out_dir, outputs = _prepare(brats_copy, tmp_path)
    line = assert_clean_failure(result, out_dir, outputs, [path.name])
    assert "truncated" in line or "corrupt" in line, line


def test_text_file_with_nifti_name(brats_copy, tmp_path):
    folder, name = _case(brats_copy, 0)
    path = folder / f"{name}_flair.nii.gz"
    path.write_text("hello")
    result, out_dir, outputs = _prepare(brats_copy, tmp_path)
    assert_clean_failure(result, out_dir, outputs, [path.name, "not gzip"])


def test_gzip_file_that_is_not_nifti(brats_copy, tmp_path):
    folder, name = _case(brats_copy, 0)
    path = folder / f"{name}_t1.nii.gz"
    path.write_bytes(gzip.compress(b"this is a gzip file but not a NIfTI image\n" * 40))
    result, out_dir, outputs = _prepare(brats_copy, tmp_path)
    assert_clean_failure(result, out_dir, outputs, [path.name, "not a NIfTI"])


def test_uncompressed_text_with_nii_name(brats_copy, tmp_path):
    folder, name = _case(brats_copy, 0)
    (folder / f"{name}_t2.nii.gz").unlink()
    path = folder / f"{name}_t2.nii"
    path.write_text("hello")
    result, out_dir, outputs = _prepare(brats_copy, tmp_path)
    assert_clean_failure(result, out_dir, outputs, [path.name, "not a NIfTI"])


def test_brats_label_outside_label_set(brats_copy, tmp_path):
    folder, name = _case(brats_copy, 5)
    seg = folder / f"{name}_seg.nii.gz"
    volume = read_volume(seg)
    labels = volume.array.copy()
    labels[labels == 2] = 3  # BraTS has no label 3
    assert (labels == 3).any()
    write_volume(seg, labels, volume.geometry)
    result, out_dir, outputs = _prepare(brats_copy, tmp_path)
    assert_clean_failure(result, out_dir, outputs, [seg.name, "label", "[3]"])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_voxels(brats_copy, tmp_path, bad):
    folder, name = _case(brats_copy, 1)
    path = folder / f"{name}_t1ce.nii.gz"
    volume = read_volume(path)
    image = volume.array.astype(np.float32)
    image[10, 20, 5] = bad
    image[11, 20, 5] = bad
    write_volume(path, image, volume.geometry)
    result, out_dir, outputs = _prepare(brats_copy, tmp_path)
    assert_clean_failure(result, out_dir, outputs, [path.name, "NaN/Inf", "2 "])


def test_error_in_worker_process_is_reported_cleanly(brats_copy, tmp_path):
    """The spawn pool path (--workers 2) must surface the same one-line error and clean up."""
    folder, name = _case(brats_copy, 5)
    path = folder / f"{name}_flair.nii.gz"
    volume = read_volume(path)
    image = volume.array.astype(np.float32)
    image[0, 0, 0] = np.nan
    write_volume(path, image, volume.geometry)
    result, out_dir, outputs = _prepare(brats_copy, tmp_path, workers="2")
    assert_clean_failure(result, out_dir, outputs, [path.name, "NaN/Inf"])


def test_duplicate_modality_in_case_folder(brats_copy, tmp_path):
    folder, name = _case(brats_copy, 0)
    original = folder / f"{name}_flair.nii.gz"
    (folder / f"{name}_FLAIR.nii").write_bytes(b"")  # same modality twice
    result, out_dir, outputs = _prepare(brats_copy, tmp_path)
    assert_clean_failure(result, out_dir, outputs, [name, "second 'flair'"])
    assert original.exists()


def test_missing_source_folder(tmp_path):
    result, out_dir, outputs = _prepare(tmp_path / "nowhere", tmp_path)
    assert_clean_failure(result, out_dir, outputs, ["nowhere", "not found"])


def test_folder_without_cases(tmp_path):
    src = tmp_path / "empty"
    src.mkdir()
    (src / "README.txt").write_text("nothing")
    result, out_dir, outputs = _prepare(src, tmp_path)
    assert_clean_failure(result, out_dir, outputs, [str(src), "no BraTS cases"])


# ---------------------------------------------------------------- output path

def test_a_folder_that_is_not_a_prepared_dataset_is_never_written_into(brats_dataset, tmp_path):
    out_dir, h5, _ = _brats_outputs(tmp_path)
    out_dir.mkdir()
    (out_dir / "mine.h5").write_bytes(b"precious")
    for extra in ((), ("--overwrite",)):
        result = prepare_brats_cli(brats_dataset, out_dir, tmp_path, *extra)
        line = assert_clean_failure(result, out_dir, [h5, out_dir / "prepared.json"],
                                    [str(out_dir), "not a prepared dataset"])
        assert line.startswith("unet-train prepare: error:"), line
        assert sorted(p.name for p in out_dir.iterdir()) == ["mine.h5"]
        assert (out_dir / "mine.h5").read_bytes() == b"precious"


def test_existing_slices_are_refused_then_overwritten(brats_dataset, tmp_path):
    out_dir, h5, _ = _brats_outputs(tmp_path)
    assert prepare_brats_cli(brats_dataset, out_dir, tmp_path).returncode == 0
    manifest = (out_dir / "prepared.json").read_text()
    h5.write_bytes(b"precious")
    result = prepare_brats_cli(brats_dataset, out_dir, tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(h5) in lines[0] and "--overwrite" in lines[0]
    assert h5.read_bytes() == b"precious" and (out_dir / "prepared.json").read_text() == manifest
    result = prepare_brats_cli(brats_dataset, out_dir, tmp_path, "--overwrite")
    assert result.returncode == 0, result.stderr
    with h5py.File(h5, "r") as handle:
        assert handle["train"]["images"].shape[0] > 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["prepared.json", "slices-128.h5"]


def test_a_malformed_manifest_is_named(brats_dataset, tmp_path):
    out_dir, h5, _ = _brats_outputs(tmp_path)
    out_dir.mkdir()
    (out_dir / "prepared.json").write_text("{}")
    result = prepare_brats_cli(brats_dataset, out_dir, tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(out_dir / "prepared.json") in result.stderr
    assert (out_dir / "prepared.json").read_text() == "{}"
    assert not h5.exists()


def test_failed_overwrite_keeps_the_previous_output(brats_copy, brats_dataset, tmp_path):
    out_dir, h5, _ = _brats_outputs(tmp_path)
    assert prepare_brats_cli(brats_copy, out_dir, tmp_path).returncode == 0
    before = h5.read_bytes()
    folder, name = _case(brats_copy, 2)
    (folder / f"{name}_seg.nii.gz").write_text("hello")
    result = prepare_brats_cli(brats_copy, out_dir, tmp_path, "--overwrite")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert h5.read_bytes() == before
    assert not [p for p in out_dir.iterdir() if ".partial" in p.name]


# ---------------------------------------------------------------- Decathlon

def _prepare_decathlon(run_cli, src: Path, tmp_path: Path, *extra):
    out_dir = tmp_path / "out"
    cache = out_dir / "volumes"
    manifest = out_dir / "prepared.json"
    result = run_cli("prepare", "--format", "decathlon", "--src", src, "--out", out_dir, "--quiet", *extra,
                     cwd=tmp_path)
    return result, out_dir, cache, manifest


def test_decathlon_label_outside_label_set(run_cli, decathlon_copy, tmp_path):
    """BRATS_003 fails after BRATS_001/002 were cached: the whole cache folder must be absent."""
    label = decathlon_copy / "labelsTr" / "BRATS_003.nii.gz"
    volume = read_volume(label)
    labels = volume.array.copy()
    labels[labels == 1] = 4
    assert (labels == 4).any()
    write_volume(label, labels, volume.geometry)
    result, out_dir, cache, split = _prepare_decathlon(run_cli, decathlon_copy, tmp_path)
    assert_clean_failure(result, out_dir, [split, cache], ["BRATS_003.nii.gz", "label", "[4]"])
    assert not out_dir.exists(), "a failed first prepare leaves no folder behind"


def test_decathlon_non_finite_image(run_cli, decathlon_copy, tmp_path):
    image_path = decathlon_copy / "imagesTr" / "BRATS_001.nii.gz"
    volume = read_volume(image_path)
    image = volume.array.copy()
    image[5, 5, 5, 2] = np.inf
    write_volume(image_path, image, volume.geometry)
    result, out_dir, cache, split = _prepare_decathlon(run_cli, decathlon_copy, tmp_path)
    assert_clean_failure(result, out_dir, [split, cache], ["imagesTr/BRATS_001.nii.gz", "NaN/Inf"])


def test_decathlon_truncated_image(run_cli, decathlon_copy, tmp_path):
    image_path = decathlon_copy / "imagesTr" / "BRATS_002.nii.gz"
    data = image_path.read_bytes()
    image_path.write_bytes(data[: len(data) // 2])
    result, out_dir, cache, split = _prepare_decathlon(run_cli, decathlon_copy, tmp_path)
    line = assert_clean_failure(result, out_dir, [split, cache], ["BRATS_002.nii.gz"])
    assert "truncated" in line or "corrupt" in line, line


def test_decathlon_existing_cache_is_refused(run_cli, decathlon_dataset, tmp_path):
    result, out_dir, cache, manifest = _prepare_decathlon(run_cli, decathlon_dataset, tmp_path)
    assert result.returncode == 0, result.stderr
    before = sorted(p.name for p in cache.iterdir())
    result, _, _, _ = _prepare_decathlon(run_cli, decathlon_dataset, tmp_path)
    line = assert_clean_failure(result, out_dir, [], [str(cache), "already exists", "--overwrite"])
    assert line.startswith("unet-train prepare: error:"), line
    assert sorted(p.name for p in cache.iterdir()) == before
    assert sorted(p.name for p in out_dir.iterdir()) == ["prepared.json", "volumes"]


def test_decathlon_failed_overwrite_keeps_the_previous_cache(run_cli, decathlon_copy, tmp_path):
    result, out_dir, cache, split = _prepare_decathlon(run_cli, decathlon_copy, tmp_path)
    assert result.returncode == 0, result.stderr
    before = {p.name: p.read_bytes() for p in cache.iterdir()}
    (decathlon_copy / "labelsTr" / "BRATS_004.nii.gz").write_text("hello")
    result, _, _, _ = _prepare_decathlon(run_cli, decathlon_copy, tmp_path, "--overwrite")
    assert_clean_failure(result, out_dir, [], ["BRATS_004.nii.gz"])
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == before
    assert sorted(p.name for p in out_dir.iterdir()) == ["prepared.json", "volumes"]


def test_unwritable_output_is_one_line_naming_the_file(run_cli, decathlon_dataset, tmp_path):
    """An OSError (here: --out below a regular file) is reported like a UserError, not a traceback."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    result = run_cli("prepare", "--format", "decathlon", "--src", decathlon_dataset, "--out", blocker / "ds",
                     "--quiet", cwd=tmp_path)
    line = assert_clean_failure(result, tmp_path, [tmp_path / "data"], [str(blocker)])
    assert line.startswith("unet-train prepare: error:"), line
    assert blocker.read_text() == "x"


def test_decathlon_empty_dataset_json(run_cli, decathlon_copy, tmp_path):
    (decathlon_copy / "dataset.json").write_text("")
    result, out_dir, cache, split = _prepare_decathlon(run_cli, decathlon_copy, tmp_path)
    assert_clean_failure(result, out_dir, [split, cache], ["dataset.json", "empty"])


def test_decathlon_malformed_dataset_json(run_cli, decathlon_copy, tmp_path):
    text = (decathlon_copy / "dataset.json").read_text()
    (decathlon_copy / "dataset.json").write_text(text[: len(text) // 2])
    result, out_dir, cache, split = _prepare_decathlon(run_cli, decathlon_copy, tmp_path)
    assert_clean_failure(result, out_dir, [split, cache], ["dataset.json", "malformed JSON", "line"])


def test_decathlon_dataset_json_not_an_object(run_cli, decathlon_copy, tmp_path):
    (decathlon_copy / "dataset.json").write_text("[1, 2, 3]\n")
    result, out_dir, cache, split = _prepare_decathlon(run_cli, decathlon_copy, tmp_path)
    assert_clean_failure(result, out_dir, [split, cache], ["dataset.json", "JSON object"])


def test_decathlon_missing_referenced_file(run_cli, decathlon_copy, tmp_path):
    (decathlon_copy / "labelsTr" / "BRATS_004.nii.gz").unlink()
    result, out_dir, cache, split = _prepare_decathlon(run_cli, decathlon_copy, tmp_path)
    assert_clean_failure(result, out_dir, [split, cache], ["dataset.json", "labelsTr/BRATS_004.nii.gz",
                                                           "does not exist"])


def test_decathlon_missing_key(run_cli, decathlon_copy, tmp_path):
    meta = json.loads((decathlon_copy / "dataset.json").read_text())
    del meta["labels"]
    (decathlon_copy / "dataset.json").write_text(json.dumps(meta))
    result, out_dir, cache, split = _prepare_decathlon(run_cli, decathlon_copy, tmp_path)
    assert_clean_failure(result, out_dir, [split, cache], ["dataset.json", "'labels'"])


def test_decathlon_image_that_is_not_4d(run_cli, decathlon_copy, tmp_path):
    image_path = decathlon_copy / "imagesTr" / "BRATS_001.nii.gz"
    volume = read_volume(image_path)
    write_volume(image_path, volume.array[..., 0], volume.geometry)
    result, out_dir, cache, split = _prepare_decathlon(run_cli, decathlon_copy, tmp_path)
    assert_clean_failure(result, out_dir, [split, cache], ["BRATS_001.nii.gz", "4D"])


def _edit_dataset_json(root: Path, edit) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    edit(meta)
    (root / "dataset.json").write_text(json.dumps(meta))


def test_decathlon_image_path_of_wrong_type_through_the_cli(run_cli, decathlon_copy, tmp_path):
    _edit_dataset_json(decathlon_copy, lambda meta: meta["training"][1].update({"image": 5}))
    result, out_dir, cache, split = _prepare_decathlon(run_cli, decathlon_copy, tmp_path)
    assert_clean_failure(result, out_dir, [split, cache], ["dataset.json", "training[1].image",
                                                           "expected a relative file path", "got 5"])


def _index_error(root: Path) -> str:
    from trainer.data.decathlon import read_index
    from trainer.errors import DataError

    with pytest.raises(DataError) as caught:
        read_index(root)
    message = str(caught.value)
    assert "\n" not in message and str(root / "dataset.json") in message, message
    return message


@pytest.mark.parametrize("key", ["image", "label"])
@pytest.mark.parametrize("value", [5, None, "", ["./imagesTr/BRATS_001.nii.gz"], {"path": "x"}])
def test_decathlon_training_entry_path_of_wrong_type(decathlon_copy, key, value):
    _edit_dataset_json(decathlon_copy, lambda meta: meta["training"][1].update({key: value}))
    message = _index_error(decathlon_copy)
    assert f"training[1].{key}: expected a relative file path, got {json.dumps(value)}" in message


@pytest.mark.parametrize("entry", [5, None, "./imagesTr/BRATS_001.nii.gz", {"image": "./imagesTr/BRATS_001.nii.gz"}])
def test_decathlon_training_entry_not_an_object(decathlon_copy, entry):
    _edit_dataset_json(decathlon_copy, lambda meta: meta["training"].__setitem__(0, entry))
    assert "training[0] must be an object with 'image' and 'label'" in _index_error(decathlon_copy)


@pytest.mark.parametrize("key,value,mentions", [
    ("modality", ["FLAIR", "T1w", "t1gd", "T2w"], ["'modality'", "got a list"]),
    ("modality", "FLAIR", ["'modality'", "got a string"]),
    ("modality", None, ["'modality'", "got null"]),
    ("modality", 4, ["'modality'", "got a number"]),
    ("modality", {"0": "FLAIR"}, ["expected 4 modalities, got 1"]),
    ("labels", ["background", "edema"], ["'labels'", "got a list"]),
    ("labels", {"zero": "background"}, ["'labels'", "integer"]),
    ("labels", None, ["'labels'", "got null"]),
    ("training", {"image": "x"}, ["'training'", "non-empty list"]),
    ("training", [], ["'training'", "non-empty list"]),
    ("test", "./imagesTs/BRATS_005.nii.gz", ["'test'", "got a string"]),
    ("test", [7], ["test[0]: expected a relative file path, got 7"]),
])
def test_decathlon_dataset_json_value_of_wrong_type(decathlon_copy, key, value, mentions):
    _edit_dataset_json(decathlon_copy, lambda meta: meta.__setitem__(key, value))
    message = _index_error(decathlon_copy)
    for text in mentions:
        assert text in message, message


@pytest.mark.parametrize("key", ["image", "label"])
@pytest.mark.parametrize("value", ["../../../../etc/passwd", "/etc/hostname", "/", "./imagesTr/../../x.nii.gz", ".",
                                   "./"])
def test_decathlon_path_outside_the_dataset_folder(decathlon_copy, key, value):
    _edit_dataset_json(decathlon_copy, lambda meta: meta["training"][1].update({key: value}))
    message = _index_error(decathlon_copy)
    assert f"training[1].{key}: {json.dumps(value)} is outside the dataset folder" in message


def test_decathlon_test_path_outside_the_dataset_folder_through_the_cli(run_cli, decathlon_copy, tmp_path):
    _edit_dataset_json(decathlon_copy, lambda meta: meta.__setitem__("test", ["/etc/hostname"]))
    result, out_dir, cache, split = _prepare_decathlon(run_cli, decathlon_copy, tmp_path)
    assert_clean_failure(result, out_dir, [split, cache], ["dataset.json", "test[0]", "outside the dataset folder"])


def test_decathlon_duplicate_training_case(decathlon_copy):
    _edit_dataset_json(decathlon_copy, lambda meta: meta["training"].append(dict(meta["training"][0])))
    assert "more than once" in _index_error(decathlon_copy)


# ---------------------------------------------------------------- NIfTI reader, directly

def _small_volume(tmp_path: Path, name: str, array: np.ndarray, compress: bool = True) -> Path:
    from trainer.data.nifti import identity_geometry

    path = tmp_path / name
    write_volume(path, array, identity_geometry(), compress=compress)
    return path


@pytest.mark.parametrize("name", ["v.nii.gz", "v.nii"])
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, np.float64])
def test_read_volume_accepts_valid_files(tmp_path, name, dtype):
    array = (np.arange(9 * 10 * 11) % 97).reshape(9, 10, 11).astype(dtype)
    path = _small_volume(tmp_path, name, array, compress=name.endswith(".gz"))
    volume = read_volume(path)
    assert volume.array.shape == (9, 10, 11)
    np.testing.assert_array_equal(volume.array, array)


@pytest.mark.parametrize("name", ["v.nii.gz", "v.nii"])
@pytest.mark.parametrize("shape", [(7, 5, 3), (7, 5, 3, 2)])
def test_geometry_and_axis_order_round_trip(tmp_path, name, shape):
    """Spacing, origin and an oblique direction survive write/read, and (x, y, z) stays (x, y, z)."""
    import SimpleITK as sitk

    from trainer.data.nifti import Geometry

    angle = np.deg2rad(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    geometry = Geometry(spacing=(0.9, 1.1, 1.7), origin=(12.5, -239.0, 3.25),
                        direction=tuple(float(v) for v in (rotation @ np.diag([-1, 1, 1])).flatten()))
    array = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    path = tmp_path / name
    write_volume(path, array, geometry, compress=name.endswith(".gz"))
    volume = read_volume(path)
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.geometry.affine(), geometry.affine(), atol=1e-5)
    image = sitk.ReadImage(str(path))
    assert image.GetSize()[:3] == shape[:3]  # SimpleITK's size is (x, y, z)
    np.testing.assert_allclose(image.GetOrigin()[:3], geometry.origin, atol=1e-5)
    np.testing.assert_allclose(image.GetSpacing()[:3], geometry.spacing, atol=1e-5)


@pytest.mark.parametrize("cut", [3, 100, "half"])
def test_read_volume_rejects_cut_gzip(tmp_path, cut):
    from trainer.errors import DataError

    path = _small_volume(tmp_path, "v.nii.gz", np.random.default_rng(0).integers(0, 900, (20, 20, 20)).astype(np.int16))
    data = path.read_bytes()
    keep = len(data) // 2 if cut == "half" else len(data) - cut
    path.write_bytes(data[:keep])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_volume(path)


def test_read_volume_rejects_short_uncompressed_data(tmp_path):
    from trainer.errors import DataError

    path = _small_volume(tmp_path, "v.nii", np.ones((20, 20, 20), np.float32), compress=False)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_volume(path)


@pytest.mark.parametrize("name", ["v.nii.gz", "v.nii"])
def test_read_volume_counts_non_finite_voxels(tmp_path, name):
    from trainer.errors import DataError

    array = np.ones((6, 7, 8, 2), np.float32)
    array[1, 2, 3, 0] = np.nan
    array[4, 5, 6, 1] = np.inf
    array[0, 0, 0, 1] = -np.inf
    path = _small_volume(tmp_path, name, array, compress=name.endswith(".gz"))
    with pytest.raises(DataError, match=r"3 NaN/Inf voxel\(s\)"):
        read_volume(path)


def _header_only_nifti(path: Path, dims: tuple[int, ...], datatype: int = 4, bitpix: int = 16) -> Path:
    """A gzipped NIfTI-1 header (352 bytes) that claims ``dims`` voxels and carries no data."""
    import struct

    header = bytearray(352)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, len(dims), *dims, *([1] * (7 - len(dims))))
    struct.pack_into("<2h", header, 70, datatype, bitpix)
    struct.pack_into("<8f", header, 76, 1.0, *([1.0] * 7))  # pixdim
    struct.pack_into("<f", header, 108, 352.0)
    header[344:348] = b"n+1\0"
    path.write_bytes(gzip.compress(bytes(header), mtime=0))
    return path


@pytest.mark.parametrize("dims", [(16384, 16384, 16), (16384, 16384, 8, 4)])
def test_tiny_file_claiming_gigabytes_is_refused_from_its_header(tmp_path, monkeypatch, dims):
    """An ~83-byte .nii.gz whose header claims 8-16 GiB: the gzip trailer (size mod 2**32) matches
    the claim, so only the voxel cap stops SimpleITK from allocating it all."""
    import time

    import trainer.data.nifti as nifti
    from trainer.errors import DataError

    path = _header_only_nifti(tmp_path / "huge.nii.gz", dims)
    assert path.stat().st_size < 120
    monkeypatch.setattr(nifti.sitk, "ReadImage", lambda *a, **k: pytest.fail("SimpleITK was asked to read it"))
    start = time.perf_counter()
    with pytest.raises(DataError) as caught:
        read_volume(path)
    assert time.perf_counter() - start < 2.0
    message = str(caught.value)
    assert str(path) in message and "data.max_voxels" in message and " x ".join(map(str, dims)) in message


def test_size_beyond_4_gib_is_counted_not_taken_from_the_gzip_trailer(tmp_path, monkeypatch):
    """With the cap raised, a > 4 GiB claim is checked by decompressing: its trailer says nothing."""
    import trainer.data.nifti as nifti
    from trainer.errors import DataError

    path = _header_only_nifti(tmp_path / "huge.nii.gz", (16384, 16384, 16))  # 8 GiB + 352 = 352 mod 2**32
    monkeypatch.setattr(nifti.sitk, "ReadImage", lambda *a, **k: pytest.fail("SimpleITK was asked to read it"))
    with pytest.raises(DataError, match=r"truncated NIfTI \(data block has 0 of 8589934592 bytes\)"):
        read_volume(path, max_voxels=2 ** 40)


def test_voxel_cap_is_the_setting(tmp_path):
    from trainer.errors import DataError

    path = _small_volume(tmp_path, "v.nii.gz", np.ones((9, 10, 11), np.int16))
    assert read_volume(path, max_voxels=990).array.shape == (9, 10, 11)
    with pytest.raises(DataError, match="9 x 10 x 11 = 990 voxels, more than data.max_voxels = 989"):
        read_volume(path, max_voxels=989)


def test_prepare_refuses_a_case_above_max_voxels(run_cli, decathlon_copy, tmp_path):
    result, out_dir, cache, split = _prepare_decathlon(run_cli, decathlon_copy, tmp_path,
                                                       "--set", "data.max_voxels=1000")
    assert_clean_failure(result, out_dir, [split, cache], ["BRATS_001.nii.gz", "data.max_voxels = 1,000"])
