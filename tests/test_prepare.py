"""`unet-train prepare`: a raw dataset -> a prepared dataset folder (manifest with the split, 2D slices as
chunked HDF5, the 3D cache)."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import SimpleITK as sitk

from support.data import (BRATS_CASES, DECATHLON_CASES, SHAPE, brats_case_folders, prepare_brats_cli)
from trainer.data.brats import discover_brats, read_brats_case
from trainer.data.normalize import zscore_brain
from trainer.data.synth.writers import APPLEDOUBLE_STUB

SIZE = 128
MODALITIES = ("flair", "t1", "t1ce", "t2")
SPLITS = ("train", "val", "test")


def _sitk_xyz(path: Path) -> np.ndarray:
    """Raw NIfTI voxels via SimpleITK, in (x, y, z[, c]) order."""
    return np.transpose(sitk.GetArrayFromImage(sitk.ReadImage(str(path))))


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "prepared.json").read_text())


def _slices(folder: Path, size: int = SIZE) -> Path:
    return folder / f"slices-{size}.h5"


def _case_rows(h5: h5py.File, case_id: str) -> tuple[str, np.ndarray]:
    for name in SPLITS:
        ids = [c.decode() if isinstance(c, bytes) else c for c in h5[name]["case_ids"][()]]
        if case_id in ids:
            rows = np.flatnonzero(h5[name]["case"][()] == ids.index(case_id))
            return name, rows
    raise AssertionError(f"{case_id} not in any split")


def _case_ids(group: h5py.Group) -> list[str]:
    return [c.decode() if isinstance(c, bytes) else c for c in group["case_ids"][()]]


# ---------------------------------------------------------------- BraTS -> HDF5

def test_prepare_writes_a_folder_that_describes_itself(prepared_brats, brats_dataset):
    assert sorted(p.name for p in prepared_brats.iterdir()) == ["prepared.json", "slices-128.h5"]
    manifest = _manifest(prepared_brats)
    assert manifest["source"] == str(brats_dataset.absolute()) and manifest["layout"] == "brats"
    assert manifest["fingerprint"]["cases"] == BRATS_CASES
    assert manifest["slices"]["128"]["file"] == "slices-128.h5" and manifest["volumes"] is None
    last = json.loads((prepared_brats.parents[1] / "data" / "prepared" / "last.json").read_text())
    assert last == {"dataset": str(prepared_brats)}


def test_hdf5_structure(brats_slices):
    with h5py.File(brats_slices, "r") as h5:
        assert set(h5.keys()) == set(SPLITS)
        assert h5.attrs["image_size"] == SIZE
        assert [m.decode() if isinstance(m, bytes) else m for m in h5.attrs["modalities"]] == list(MODALITIES)
        total = 0
        for name in SPLITS:
            group = h5[name]
            images, labels = group["images"], group["labels"]
            n = images.shape[0]
            total += n
            assert n > 0, name
            assert images.dtype == np.float32
            assert images.shape == (n, SIZE, SIZE, 4)
            assert labels.dtype == np.uint8
            assert labels.shape == (n, SIZE, SIZE)
            assert images.chunks is not None and labels.chunks is not None
            assert images.chunks[0] < n or n == 1  # chunked per slice(s), not one monolithic block
            assert group["case"].shape == (n,) and group["slice"].shape == (n,)
            assert np.issubdtype(group["case"].dtype, np.integer)
            assert np.issubdtype(group["slice"].dtype, np.integer)
            assert set(np.unique(labels[()]).tolist()) <= {0, 1, 2, 3}  # canonical labels
            voxels = group["region_voxels"][()]
            assert voxels.shape == (n, 3)
            np.testing.assert_array_equal(voxels[:, 0], (labels[()] > 0).sum(axis=(1, 2)))
            np.testing.assert_array_equal(voxels[:, 2], (labels[()] == 3).sum(axis=(1, 2)))
            assert np.all(voxels[:, 0] >= voxels[:, 1]) and np.all(voxels[:, 1] >= voxels[:, 2])
            assert np.isfinite(images[()]).all()
            slices = group["slice"][()]
            assert slices.min() >= 0 and slices.max() < SHAPE[2]
        assert (h5["train"]["labels"][()] > 0).any(), "no tumour pixels in the training slices"
        assert (h5["train"]["labels"][()] == 3).any(), "no enhancing tumour in the training slices"


def test_split_is_by_patient_and_covers_all_cases(prepared_brats, brats_dataset):
    split = _manifest(prepared_brats)["split"]
    sets = {name: set(split[name]) for name in SPLITS}
    for name in SPLITS:
        assert len(sets[name]) == len(split[name]), f"duplicate case in {name}"
    assert not sets["train"] & sets["val"]
    assert not sets["train"] & sets["test"]
    assert not sets["val"] & sets["test"]
    all_cases = {f.name for f in brats_case_folders(brats_dataset)}
    assert len(all_cases) == BRATS_CASES
    assert sets["train"] | sets["val"] | sets["test"] == all_cases
    assert sets["train"] and sets["val"] and sets["test"]
    assert _manifest(prepared_brats)["split_settings"]["seed"] == 42


def test_every_slice_belongs_to_a_case_of_its_split(prepared_brats, brats_slices):
    split = _manifest(prepared_brats)["split"]
    with h5py.File(brats_slices, "r") as h5:
        for name in SPLITS:
            group = h5[name]
            ids = _case_ids(group)
            assert sorted(ids) == sorted(split[name])
            case_index = group["case"][()]
            assert case_index.min() >= 0 and case_index.max() < len(ids)
            used = {ids[i] for i in np.unique(case_index)}
            assert used == set(split[name]), "a case of the split has no slices (or a stranger has some)"


def test_slices_are_the_brain_slices_of_each_case(brats_slices, brats_dataset):
    with h5py.File(brats_slices, "r") as h5:
        for folder in brats_case_folders(brats_dataset):
            flair = _sitk_xyz(folder / f"{folder.name}_flair.nii.gz")
            any_brain = np.zeros(SHAPE[2], dtype=bool)
            for modality in MODALITIES:
                any_brain |= np.any(_sitk_xyz(folder / f"{folder.name}_{modality}.nii.gz") != 0, axis=(0, 1))
            name, rows = _case_rows(h5, folder.name)
            stored = h5[name]["slice"][()][rows]
            assert stored.tolist() == np.flatnonzero(any_brain).tolist()
            assert flair.shape == SHAPE


def test_stored_slice_matches_independent_normalisation(brats_slices, brats_dataset):
    folders = brats_case_folders(brats_dataset)
    with h5py.File(brats_slices, "r") as h5:
        for folder in (folders[0], folders[-1]):
            name, rows = _case_rows(h5, folder.name)
            slices = h5[name]["slice"][()][rows]
            pick = len(rows) // 2
            row, z = rows[pick], int(slices[pick])
            stored_image = h5[name]["images"][row]
            stored_labels = h5[name]["labels"][row]

            expected = np.zeros((SIZE, SIZE, 4), dtype=np.float32)
            for channel, modality in enumerate(MODALITIES):
                volume = _sitk_xyz(folder / f"{folder.name}_{modality}.nii.gz").astype(np.float64)
                brain = volume != 0
                values = volume[brain]
                normalised = np.zeros_like(volume)
                normalised[brain] = (values - values.mean()) / values.std()
                plane = normalised[:, :, z].astype(np.float32)  # (x, y)
                expected[..., channel] = cv2.resize(plane, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
            np.testing.assert_allclose(stored_image, expected, atol=1e-4)

            # BraTS 0/1/2/4 -> canonical 0/1 oedema/2 core/3 enhancing, region by region:
            # WT = {1, 2, 4}, TC = {1, 4}, ET = {4} in BraTS labels.
            seg = _sitk_xyz(folder / f"{folder.name}_seg.nii.gz")[:, :, z]
            def region(values):
                fraction = cv2.resize(np.isin(seg, values).astype(np.float32), (SIZE, SIZE),
                                      interpolation=cv2.INTER_AREA)
                return fraction >= 0.5
            wt, tc, et = region([1, 2, 4]), region([1, 4]), region([4])
            np.testing.assert_array_equal(stored_labels > 0, wt)
            np.testing.assert_array_equal(stored_labels >= 2, tc & wt)
            np.testing.assert_array_equal(stored_labels == 3, et & tc & wt)


def test_tumour_slices_have_tumour_masks(brats_slices, brats_dataset):
    with h5py.File(brats_slices, "r") as h5:
        for folder in brats_case_folders(brats_dataset):
            seg = _sitk_xyz(folder / f"{folder.name}_seg.nii.gz")
            name, rows = _case_rows(h5, folder.name)
            slices = h5[name]["slice"][()][rows]
            masks = h5[name]["labels"][()][rows] > 0
            area = (seg > 0).sum(axis=(0, 1))
            biggest = int(np.argmax(area))
            assert masks[list(slices).index(biggest)].any()
            for index, z in enumerate(slices):
                if area[z] == 0:
                    assert not masks[index].any()


def test_zscore_brain_gives_zero_mean_unit_std(brats_dataset):
    case = discover_brats(brats_dataset)[0]
    image, labels, first = read_brats_case(case)
    assert image.shape == (*SHAPE, 4) and image.dtype == np.float32
    assert labels.shape == SHAPE
    normalised = zscore_brain(image)
    assert normalised.dtype == np.float32
    for channel in range(4):
        brain = image[..., channel] != 0
        assert brain.any()
        values = normalised[..., channel][brain].astype(np.float64)
        assert abs(values.mean()) < 1e-4
        assert abs(values.std() - 1.0) < 1e-4
        assert (normalised[..., channel][~brain] == 0).all()


def test_zscore_brain_constant_and_empty_channels():
    image = np.zeros((4, 4, 2, 2), dtype=np.float32)
    image[1:3, 1:3, :, 0] = 5.0  # constant brain: std 0 must not divide by zero
    out = zscore_brain(image)
    assert np.isfinite(out).all()
    assert (out == 0).all()


def test_parallel_workers_give_identical_output(prepared_brats, brats_slices, brats_dataset, run_cli, tmp_path):
    out = tmp_path / "pool"
    result = run_cli("prepare", "--format", "brats", "--src", brats_dataset, "--out", out, "--workers", "2",
                     "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert _manifest(out)["split"] == _manifest(prepared_brats)["split"]
    with h5py.File(_slices(out), "r") as h5:
        counts = ", ".join(f"{name} {h5[name]['images'].shape[0]}" for name in SPLITS)
    assert f"128 x 128 ({counts})" in result.stdout
    assert f"train with: unet-train train --model 2d --data {out}" in result.stdout
    with h5py.File(_slices(out), "r") as a, h5py.File(brats_slices, "r") as b:
        for name in SPLITS:
            for key in ("images", "labels", "region_voxels", "case", "slice", "case_ids"):
                np.testing.assert_array_equal(a[name][key][()], b[name][key][()])


def _compare_case(h5_a: Path, h5_b: Path, case_id: str) -> None:
    with h5py.File(h5_a, "r") as a, h5py.File(h5_b, "r") as b:
        name_a, rows_a = _case_rows(a, case_id)
        name_b, rows_b = _case_rows(b, case_id)
        assert name_a == name_b
        assert len(rows_a) > 0
        np.testing.assert_array_equal(a[name_a]["images"][()][rows_a], b[name_b]["images"][()][rows_b])
        np.testing.assert_array_equal(a[name_a]["labels"][()][rows_a], b[name_b]["labels"][()][rows_b])


def test_uncompressed_nii_files_work(brats_slices, brats_copy, tmp_path):
    folder = brats_case_folders(brats_copy)[1]
    for path in sorted(folder.glob("*.nii.gz")):
        sitk.WriteImage(sitk.ReadImage(str(path)), str(path.with_name(path.name[:-3])), False)
        path.unlink()
    assert sorted(p.suffix for p in folder.iterdir()) == [".nii"] * 5
    out = tmp_path / "out"
    result = prepare_brats_cli(brats_copy, out, tmp_path)
    assert result.returncode == 0, result.stderr
    _compare_case(_slices(out), brats_slices, folder.name)


def test_uppercase_modality_suffix_is_recognised(brats_slices, brats_copy, tmp_path):
    folder = brats_case_folders(brats_copy)[2]
    for modality in ("flair", "t1ce", "seg"):
        path = folder / f"{folder.name}_{modality}.nii.gz"
        path.rename(folder / f"{folder.name}_{modality.upper()}.nii.gz")
    case = {c.case_id: c for c in discover_brats(brats_copy)}[folder.name]
    assert case.images["flair"].name.endswith("_FLAIR.nii.gz")
    assert case.images["t1ce"].name.endswith("_T1CE.nii.gz")
    assert case.images["t1"].name.endswith("_t1.nii.gz")
    assert case.seg.name.endswith("_SEG.nii.gz")
    out = tmp_path / "out"
    result = prepare_brats_cli(brats_copy, out, tmp_path)
    assert result.returncode == 0, result.stderr
    _compare_case(_slices(out), brats_slices, folder.name)


def test_appledouble_files_in_case_folder_are_ignored(brats_slices, brats_copy, tmp_path):
    folder = brats_case_folders(brats_copy)[0]
    for modality in (*MODALITIES, "seg"):
        (folder / f"._{folder.name}_{modality}.nii.gz").write_bytes(APPLEDOUBLE_STUB)
    (folder.parent / "._x_flair.nii.gz").write_bytes(APPLEDOUBLE_STUB)
    (brats_copy / "._name_mapping.csv").write_bytes(APPLEDOUBLE_STUB)
    cases = discover_brats(brats_copy)
    assert len(cases) == BRATS_CASES
    for case in cases:
        assert not any(p.name.startswith("._") for p in case.images.values())
    out = tmp_path / "out"
    result = prepare_brats_cli(brats_copy, out, tmp_path)
    assert result.returncode == 0, result.stderr
    _compare_case(_slices(out), brats_slices, folder.name)


def test_flat_brats2020_layout_is_accepted(brats_copy, tmp_path):
    flat = tmp_path / "MICCAI_BraTS2020_TrainingData"
    flat.mkdir()
    for folder in brats_case_folders(brats_copy)[:3]:
        folder.rename(flat / folder.name)
    out = tmp_path / "flat"
    result = prepare_brats_cli(flat, out, tmp_path)
    assert result.returncode == 0, result.stderr
    split = _manifest(out)["split"]
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(p.name for p in flat.iterdir())


def test_image_size_setting_is_used(brats_dataset, tmp_path):
    out = tmp_path / "small"
    result = prepare_brats_cli(brats_dataset, out, tmp_path, "--set", "data.image_size=64",
                               "--set", "data.split.seed=7")
    assert result.returncode == 0, result.stderr
    with h5py.File(_slices(out, 64), "r") as h5:
        assert h5["train"]["images"].shape[1:] == (64, 64, 4)
        assert h5["train"]["labels"].shape[1:] == (64, 64)
    assert _manifest(out)["split_settings"]["seed"] == 7
    # a second size sits beside the first, on the same split
    again = prepare_brats_cli(brats_dataset, out, tmp_path, "--set", "data.image_size=32", "--set", "data.split.seed=7")
    assert again.returncode == 0, again.stderr
    assert sorted(_manifest(out)["slices"]) == ["32", "64"] and _slices(out, 64).is_file()


# ---------------------------------------------------------------- Decathlon

def _prepare_decathlon(run_cli, src: Path, out: Path, cwd: Path, *extra):
    return run_cli("prepare", "--format", "decathlon", "--src", src, "--out", out, "--quiet", *extra, cwd=cwd)


def test_decathlon_prepare_writes_cache_and_split(run_cli, decathlon_dataset, tmp_path):
    out = tmp_path / "dec"
    cache = out / "volumes"
    result = _prepare_decathlon(run_cli, decathlon_dataset, out, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr

    ids = [f"BRATS_{i:03d}" for i in range(1, DECATHLON_CASES + 1)]
    expected_files = {f"{i}.{kind}" for i in ids for kind in ("image.npy", "labels.npy", "source.json")}
    assert {p.name for p in cache.iterdir()} == expected_files  # no ._* cases, no partial files
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]
    assert cache.stat().st_mode & 0o777 == 0o777 & ~_current_umask()  # not mkdtemp's 0700
    for case_id in ids:
        image = np.load(cache / f"{case_id}.image.npy")
        cached_labels = np.load(cache / f"{case_id}.labels.npy")
        assert image.shape == (*SHAPE, 4) and image.dtype == np.float32
        assert cached_labels.shape == SHAPE and cached_labels.dtype == np.uint8
        raw = _sitk_xyz(decathlon_dataset / "imagesTr" / f"{case_id}.nii.gz")
        labels = _sitk_xyz(decathlon_dataset / "labelsTr" / f"{case_id}.nii.gz")
        np.testing.assert_array_equal(cached_labels, labels)  # Decathlon labels are the canonical ones
        for channel in range(4):
            brain = raw[..., channel] != 0
            np.testing.assert_array_equal(image[..., channel] != 0, brain)
            values = image[..., channel][brain].astype(np.float64)
            assert abs(values.mean()) < 1e-4 and abs(values.std() - 1) < 1e-4
            expected = (raw[..., channel][brain] - raw[..., channel][brain].astype(np.float64).mean()) \
                / raw[..., channel][brain].astype(np.float64).std()
            np.testing.assert_allclose(values, expected, atol=1e-4)

    split = _manifest(out)["split"]
    assert _manifest(out)["volumes"] == {"cached": True, "cases": DECATHLON_CASES}
    sets = [set(split[name]) for name in SPLITS]
    assert sum(len(s) for s in sets) == DECATHLON_CASES
    assert set().union(*sets) == set(ids)
    assert all(len(s) == len(split[name]) for s, name in zip(sets, SPLITS))
    assert all(sets), "every split should get at least one case"


def test_decathlon_existing_cache_needs_overwrite_and_up_to_date_cases_are_reused(run_cli, decathlon_copy,
                                                                                  tmp_path):
    out = tmp_path / "dec"
    cache = out / "volumes"
    assert _prepare_decathlon(run_cli, decathlon_copy, out, tmp_path).returncode == 0
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    refused = _prepare_decathlon(run_cli, decathlon_copy, out, tmp_path)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert str(cache) in refused.stderr and "--overwrite" in refused.stderr
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == before

    # --overwrite rebuilds the folder, linking the unchanged cases and recomputing a touched one.
    touched = decathlon_copy / "labelsTr" / "BRATS_002.nii.gz"
    touched.write_bytes(touched.read_bytes())
    result = _prepare_decathlon(run_cli, decathlon_copy, out, tmp_path, "--overwrite")
    assert result.returncode == 0, result.stderr
    after = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert set(after) == set(before)
    assert {n for n in after if after[n] != before[n]} == {f"BRATS_002.{k}" for k in ("image.npy", "labels.npy",
                                                                                        "source.json")}
    assert not [p for p in out.iterdir() if ".partial" in p.name or ".old" in p.name]


def test_training_reads_the_source_of_a_case_whose_cache_is_stale(run_cli, decathlon_copy, tmp_path, caplog):
    from trainer.data.datasets import RawDataset
    from trainer.data.volumes import case_arrays

    cache = tmp_path / "dec" / "volumes"
    assert _prepare_decathlon(run_cli, decathlon_copy, cache.parent, tmp_path).returncode == 0
    touched = decathlon_copy / "imagesTr" / "BRATS_002.nii.gz"
    touched.write_bytes(touched.read_bytes())  # the source changed after prepare
    with caplog.at_level("WARNING"):
        arrays = case_arrays(RawDataset.open(decathlon_copy), cache)
    assert arrays["BRATS_002"].image_file is None  # NIfTI, not the outdated cache
    assert arrays["BRATS_001"].image_file == cache / "BRATS_001.image.npy"
    assert "BRATS_002" in caplog.text and "--overwrite" in caplog.text


def test_the_cache_follows_its_source_by_content_not_by_path(run_cli, decathlon_copy, tmp_path, caplog):
    """Prepared through a relative --src, read through a symlink: every case comes from the cache."""
    from trainer.data.datasets import RawDataset
    from trainer.data.volumes import case_arrays

    relative = Path("src") / decathlon_copy.name
    assert _prepare_decathlon(run_cli, relative, tmp_path / "dec", tmp_path).returncode == 0
    link = tmp_path / "link"
    link.symlink_to(decathlon_copy)
    with caplog.at_level("WARNING"):
        arrays = case_arrays(RawDataset.open(link), tmp_path / "dec" / "volumes")
    assert all(a.image_file is not None for a in arrays.values()) and "older" not in caplog.text


def test_decathlon_prepare_accepts_nii_variant(run_cli, decathlon_copy, tmp_path):
    image = decathlon_copy / "imagesTr" / "BRATS_002.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(image)), str(image.with_suffix("")), False)
    image.unlink()
    result = _prepare_decathlon(run_cli, decathlon_copy, tmp_path / "dec", tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "dec" / "volumes" / "BRATS_002.image.npy").is_file()


def test_a_second_model_keeps_the_split_and_another_split_is_refused(run_cli, decathlon_dataset, tmp_path):
    out = tmp_path / "dec"
    assert _prepare_decathlon(run_cli, decathlon_dataset, out, tmp_path).returncode == 0
    before = _manifest(out)
    both = _prepare_decathlon(run_cli, decathlon_dataset, out, tmp_path, "--model", "2d")
    assert both.returncode == 0, both.stderr  # 2D beside 3D, the same split
    after = _manifest(out)
    assert after["split"] == before["split"] and after["volumes"] == before["volumes"] and "128" in after["slices"]
    reseeded = _prepare_decathlon(run_cli, decathlon_dataset, out, tmp_path, "--model", "2d", "--overwrite",
                                  "--set", "data.split.seed=99", "--set", "data.image_size=32")
    assert reseeded.returncode == 0, reseeded.stderr  # --overwrite starts the folder afresh
    assert _manifest(out)["split_settings"]["seed"] == 99 and sorted(_manifest(out)["slices"]) == ["32"]
    assert sorted(p.name for p in out.iterdir()) == ["prepared.json", "slices-32.h5"]
    refused = _prepare_decathlon(run_cli, decathlon_dataset, out, tmp_path, "--set", "data.split.seed=7")
    assert refused.returncode == 2 and "its split was made with" in refused.stderr and "seed 99" in refused.stderr
    assert not (out / "volumes").exists()


def test_prepare_never_writes_into_its_source(run_cli, decathlon_copy, tmp_path):
    for out in (decathlon_copy, decathlon_copy / "prepared", tmp_path / "src"):
        result = _prepare_decathlon(run_cli, decathlon_copy, out, tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert not (decathlon_copy / "prepared").exists() and not (decathlon_copy / "prepared.json").exists()


def test_outputs_get_normal_file_permissions(prepared_brats, brats_slices):
    assert brats_slices.stat().st_mode & 0o777 == 0o666 & ~_current_umask()
    assert (prepared_brats / "prepared.json").stat().st_mode & 0o044  # group/other can read


def _current_umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
