"""The synthetic phantom and the BraTS / Decathlon layouts it is written in."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from support.data import (BRATS_CASES, DECATHLON_CASES, DECATHLON_TEST_CASES, SHAPE, brats_case_folders)
from trainer.data.brats import BRATS_LABEL_SET, discover_brats
from trainer.data.decathlon import read_index
from trainer.data.nifti import check_header, identity_geometry, read_volume
from trainer.data.synth.phantom import (BACKGROUND, ENHANCING, MAX_TUMOUR_FRACTION, MODALITY_ORDER, NECROTIC,
                                        OEDEMA, REAL_SHAPE, _cap_tumour_volume, make_case)
from trainer.data.synth.writers import brats_geometry, decathlon_geometry
from trainer.errors import DataError

PHANTOM_SHAPE = (64, 64, 48)
MODALITIES = ("flair", "t1", "t1ce", "t2")


def _read(path: Path) -> tuple[np.ndarray, sitk.Image]:
    """SimpleITK read; array returned in (x, y, z[, c]) order."""
    image = sitk.ReadImage(str(path))
    return np.transpose(sitk.GetArrayFromImage(image)), image


def _high_grade_case(start: int = 0):
    for seed in range(start, start + 40):
        case = make_case(seed, PHANTOM_SHAPE)
        if case.high_grade:
            return seed, case
    pytest.fail("no high-grade phantom among 40 seeds")


# ---------------------------------------------------------------- phantom

def test_same_seed_gives_byte_identical_case():
    a = make_case(11, SHAPE)
    b = make_case(11, SHAPE)
    assert a.high_grade == b.high_grade
    assert a.classes.tobytes() == b.classes.tobytes()
    for modality in MODALITY_ORDER:
        assert a.images[modality].dtype == np.float32
        assert a.images[modality].tobytes() == b.images[modality].tobytes()


def test_tuple_seeds_are_deterministic_too():
    assert make_case((3, 1), SHAPE).images["t2"].tobytes() == make_case((3, 1), SHAPE).images["t2"].tobytes()
    assert make_case((3, 1), SHAPE).images["t2"].tobytes() != make_case((3, 2), SHAPE).images["t2"].tobytes()


def test_different_seed_gives_different_case():
    a = make_case(11, SHAPE)
    b = make_case(12, SHAPE)
    for modality in MODALITY_ORDER:
        assert not np.array_equal(a.images[modality], b.images[modality])
    assert not np.array_equal(a.classes, b.classes)


def test_shape_and_dtypes_follow_the_request():
    case = make_case(0, (40, 44, 24))
    assert case.classes.shape == (40, 44, 24)
    assert case.classes.dtype == np.uint8
    assert set(case.images) == set(MODALITY_ORDER)
    for image in case.images.values():
        assert image.shape == (40, 44, 24)
        assert np.isfinite(image).all()
        assert image.min() >= 0


def test_high_grade_case_has_all_tumour_classes():
    _, case = _high_grade_case()
    assert set(np.unique(case.classes).tolist()) == {BACKGROUND, OEDEMA, NECROTIC, ENHANCING}


def test_labels_are_within_the_class_set_for_many_seeds():
    for seed in range(6):
        case = make_case(seed, SHAPE)
        values = set(np.unique(case.classes).tolist())
        assert values <= {BACKGROUND, OEDEMA, NECROTIC, ENHANCING}
        assert OEDEMA in values  # every case has a tumour
        if not case.high_grade:
            assert ENHANCING not in values


def test_tumour_lies_inside_the_brain_and_background_is_zero_everywhere():
    for seed in range(4):
        case = make_case(seed, PHANTOM_SHAPE)
        nonzero = [case.images[m] != 0 for m in MODALITY_ORDER]
        # Skull-stripped: the same brain mask in every contrast, exactly 0 outside it.
        for mask in nonzero[1:]:
            assert np.array_equal(mask, nonzero[0])
        brain = nonzero[0]
        assert 0.05 < brain.mean() < 0.95
        assert not brain[0, 0, 0] and not brain[-1, -1, -1]
        tumour = case.classes > 0
        assert tumour.any()
        assert not (tumour & ~brain).any(), "tumour voxels outside the brain"
        for modality in MODALITY_ORDER:
            assert (case.images[modality][~brain] == 0).all()
            assert (case.images[modality][brain] > 0).all()


def test_contrasts_follow_the_tissue_table():
    for start in (0, 10, 20):
        _, case = _high_grade_case(start)
        brain = case.images["flair"] != 0
        healthy = brain & (case.classes == BACKGROUND)
        oedema = case.classes == OEDEMA
        necrotic = case.classes == NECROTIC
        enhancing = case.classes == ENHANCING

        def mean(modality, region):
            return float(case.images[modality][region].mean())

        # Oedema is bright on FLAIR compared with the rest of the brain.
        assert mean("flair", oedema) > 1.2 * mean("flair", healthy)
        # The enhancing rim lights up on T1ce, brighter than oedema and necrosis there.
        assert mean("t1ce", enhancing) > 1.5 * mean("t1ce", oedema)
        assert mean("t1ce", enhancing) > 2.0 * mean("t1ce", necrotic)
        # ... and it is contrast uptake: relative to healthy tissue it is brighter on T1ce than on T1.
        assert (mean("t1ce", enhancing) / mean("t1ce", healthy)
                > 1.3 * mean("t1", enhancing) / mean("t1", healthy))
        # Necrosis is dark on T1 and bright on T2 relative to healthy tissue.
        assert mean("t1", necrotic) < mean("t1", healthy)
        assert mean("t2", necrotic) > mean("t2", healthy)


def test_tumour_position_varies_across_seeds():
    centroids = []
    for seed in range(6):
        classes = make_case(seed, PHANTOM_SHAPE).classes
        centroids.append(np.argwhere(classes > 0).mean(axis=0))
    centroids = np.array(centroids)
    distances = np.linalg.norm(centroids[:, None] - centroids[None], axis=-1)
    off_diagonal = distances[~np.eye(len(centroids), dtype=bool)]
    assert off_diagonal.min() > 0.5, "two seeds put the tumour in the same place"
    assert off_diagonal.max() > 0.15 * min(PHANTOM_SHAPE)
    assert centroids.std(axis=0).max() > 2.0


def test_no_default_case_is_mostly_tumour():
    """The default data's 20 cases (seed 0): uncapped, three were 42-85 % tumour."""
    fractions = []
    for case_id in range(1, 21):
        case = make_case((0, case_id), (60, 60, 40))
        fractions.append((case.classes > 0).sum() / (case.images["t1"] != 0).sum())
    assert max(fractions) < 0.35, fractions
    assert min(fractions) < 0.05 and sorted(fractions)[-3] > 0.15, "the cap must not flatten the size range"


def test_tumour_cap_leaves_small_tumours_untouched_and_shrinks_large_ones():
    brain = np.array([68.0, 84.0, 62.0])
    core = np.array([15.0, 12.0, 14.0])
    assert _cap_tumour_volume(core, 2.0, brain) == (core, 2.0)  # same objects: no change at all
    big_core, big_halo = np.array([32.0, 30.0, 31.0]), 2.4
    capped_core, capped_halo = _cap_tumour_volume(big_core, big_halo, brain)
    share = np.prod(capped_core * capped_halo) / np.prod(brain)
    assert share == pytest.approx(MAX_TUMOUR_FRACTION, rel=1e-6)
    assert capped_halo < big_halo


def test_brain_size_and_position_vary_across_seeds():
    masks = [make_case(seed, SHAPE).images["t1"] != 0 for seed in range(4)]
    volumes = {int(m.sum()) for m in masks}
    assert len(volumes) == 4


# ---------------------------------------------------------------- BraTS layout

def test_brats_layout(brats_dataset):
    grade_dirs = sorted(p.name for p in brats_dataset.iterdir() if p.is_dir())
    assert grade_dirs and set(grade_dirs) <= {"HGG", "LGG"}
    folders = brats_case_folders(brats_dataset)
    assert len(folders) == BRATS_CASES
    assert len({f.name for f in folders}) == BRATS_CASES
    for folder in folders:
        assert folder.parent.parent == brats_dataset
        assert folder.parent.name in ("HGG", "LGG")
        assert folder.name.startswith("BraTS19_")
        expected = {f"{folder.name}_{m}.nii.gz" for m in (*MODALITIES, "seg")}
        assert {p.name for p in folder.iterdir()} == expected
    # No stray files anywhere else (temp files, partial folders).
    top = {p.name for p in brats_dataset.iterdir()}
    assert top == {"name_mapping.csv", "survival_data.csv", *grade_dirs}


def test_brats_tables(brats_dataset):
    folders = {f.name: f.parent.name for f in brats_case_folders(brats_dataset)}
    with open(brats_dataset / "name_mapping.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["Grade", "BraTS_2017_subject_ID", "BraTS_2018_subject_ID", "TCGA_TCIA_subject_ID",
                       "BraTS_2019_subject_ID"]
    assert {row[4]: row[0] for row in rows[1:]} == folders
    with open(brats_dataset / "survival_data.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["BraTS19ID", "Age", "Survival", "ResectionStatus"]
    for row in rows[1:]:
        assert folders[row[0]] == "HGG"
        assert 0 < float(row[1]) < 120
        assert int(row[2]) > 0


def test_brats_volumes(brats_dataset):
    saw_enhancing = False
    for folder in brats_case_folders(brats_dataset):
        brain = None
        for modality in MODALITIES:
            array, image = _read(folder / f"{folder.name}_{modality}.nii.gz")
            assert image.GetPixelID() == sitk.sitkInt16
            assert image.GetDimension() == 3
            assert image.GetSize() == SHAPE
            assert array.shape == SHAPE
            assert np.allclose(image.GetSpacing(), (1.0, 1.0, 1.0))
            assert array.max() > 0
            brain = array != 0 if brain is None else brain
        seg, image = _read(folder / f"{folder.name}_seg.nii.gz")
        assert image.GetPixelID() == sitk.sitkUInt8
        assert image.GetSize() == SHAPE
        assert np.allclose(image.GetSpacing(), (1.0, 1.0, 1.0))
        values = set(np.unique(seg).tolist())
        assert values <= set(BRATS_LABEL_SET)
        assert 3 not in values
        assert {0, 2} <= values  # background and oedema in every case
        assert not ((seg > 0) & ~brain).any()
        if folder.parent.name == "HGG":
            assert 4 in values
            saw_enhancing = True
        else:
            assert 4 not in values
    assert saw_enhancing


def test_synthetic_geometry_is_the_real_datasets_not_simpleitk_defaults():
    """Geometry tests only bite when the source geometry differs from what a writer that
    ignores it would produce (SimpleITK's defaults: origin 0, identity direction)."""
    brats = brats_geometry(REAL_SHAPE)
    assert brats.spacing == (1.0, 1.0, 1.0)
    assert brats.origin == (0.0, -239.0, 0.0)  # real BraTS, read with SimpleITK (LPS)
    assert brats.direction == identity_geometry().direction
    decathlon = decathlon_geometry(REAL_SHAPE)
    assert decathlon.spacing == (1.0, 1.0, 1.0) and decathlon.origin == (0.0, 0.0, 0.0)
    assert decathlon.direction == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    for geometry in (brats_geometry(SHAPE), decathlon):
        assert not np.allclose(geometry.affine(), identity_geometry().affine())


def test_brats_files_carry_the_brats_geometry(brats_dataset):
    expected = brats_geometry(SHAPE)
    for folder in brats_case_folders(brats_dataset)[:2]:
        for suffix in (*MODALITIES, "seg"):
            path = folder / f"{folder.name}_{suffix}.nii.gz"
            image = sitk.ReadImage(str(path))
            assert image.GetOrigin() == expected.origin
            assert image.GetDirection() == expected.direction
            assert image.GetSpacing() == expected.spacing
            assert read_volume(path).geometry == expected


def test_decathlon_files_carry_the_decathlon_geometry(decathlon_dataset):
    expected = decathlon_geometry(SHAPE)
    first_test = f"BRATS_{DECATHLON_CASES + 1:03d}"
    for sub, name in (("imagesTr", "BRATS_001"), ("labelsTr", "BRATS_001"), ("imagesTs", first_test)):
        path = decathlon_dataset / sub / f"{name}.nii.gz"
        image = sitk.ReadImage(str(path))
        dims = image.GetDimension()
        direction = np.asarray(image.GetDirection()).reshape(dims, dims)
        np.testing.assert_array_equal(direction[:3, :3], np.asarray(expected.direction).reshape(3, 3))
        assert image.GetOrigin()[:3] == expected.origin and image.GetSpacing()[:3] == expected.spacing
        assert read_volume(path).geometry == expected


def test_brats_dataset_is_discoverable(brats_dataset):
    cases = discover_brats(brats_dataset)
    assert [c.case_id for c in cases] == [f.name for f in brats_case_folders(brats_dataset)]
    for case in cases:
        assert set(case.images) == set(MODALITIES)
        assert case.seg is not None and case.seg.name == f"{case.case_id}_seg.nii.gz"
        for modality, path in case.images.items():
            assert path.name == f"{case.case_id}_{modality}.nii.gz"


def test_synth_is_reproducible(tmp_path):
    from trainer.data.synth.writers import SynthRequest, write_brats

    outs = []
    for name in ("a", "b"):
        outs.append(write_brats(SynthRequest(out=tmp_path / name, cases=2, seed=9, shape=(24, 24, 16),
                                             workers=1), progress=False))
    files_a = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        if rel.name.endswith(".nii.gz"):
            assert np.array_equal(_read(outs[0] / rel)[0], _read(outs[1] / rel)[0])
        else:
            assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes()


# ---------------------------------------------------------------- Decathlon layout

def test_decathlon_dataset_json(decathlon_dataset):
    meta = json.loads((decathlon_dataset / "dataset.json").read_text())
    for key in ("name", "tensorImageSize", "modality", "labels", "numTraining", "numTest", "training", "test"):
        assert key in meta
    assert meta["name"] == "BRATS"
    assert meta["tensorImageSize"] == "4D"
    assert set(meta["modality"]) == {"0", "1", "2", "3"}
    assert meta["modality"]["0"].lower() == "flair"
    assert {int(k) for k in meta["labels"]} == {0, 1, 2, 3}
    assert meta["numTraining"] == len(meta["training"]) == DECATHLON_CASES
    assert meta["numTest"] == len(meta["test"]) == DECATHLON_TEST_CASES
    images = set()
    for entry in meta["training"]:
        assert entry["image"].startswith("./imagesTr/")
        assert entry["label"].startswith("./labelsTr/")
        assert Path(entry["image"]).name == Path(entry["label"]).name
        assert (decathlon_dataset / entry["image"]).is_file()
        assert (decathlon_dataset / entry["label"]).is_file()
        images.add(entry["image"])
    assert len(images) == DECATHLON_CASES
    for item in meta["test"]:
        assert item.startswith("./imagesTs/")
        assert (decathlon_dataset / item).is_file()


def test_decathlon_volumes(decathlon_dataset):
    meta = json.loads((decathlon_dataset / "dataset.json").read_text())
    for entry in meta["training"]:
        array, image = _read(decathlon_dataset / entry["image"])
        assert image.GetDimension() == 4
        assert image.GetSize() == (*SHAPE, 4)
        assert array.shape == (*SHAPE, 4)
        assert np.allclose(image.GetSpacing()[:3], (1.0, 1.0, 1.0))
        brain = array[..., 0] != 0
        for channel in range(4):
            assert np.array_equal(array[..., channel] != 0, brain)
        labels, label_image = _read(decathlon_dataset / entry["label"])
        assert label_image.GetPixelID() == sitk.sitkUInt8
        assert labels.shape == SHAPE
        values = set(np.unique(labels).tolist())
        assert values <= {0, 1, 2, 3}
        assert 1 in values
        assert not ((labels > 0) & ~brain).any()
    for item in meta["test"]:
        _, image = _read(decathlon_dataset / item)
        assert image.GetSize() == (*SHAPE, 4)


def test_decathlon_appledouble_files_are_present_and_not_nifti(decathlon_dataset):
    assert (decathlon_dataset / "._dataset.json").is_file()
    stubs = sorted(decathlon_dataset.rglob("._*.nii.gz"))
    real = [p for p in decathlon_dataset.rglob("*.nii.gz") if not p.name.startswith("._")]
    assert len(stubs) == len(real) == 2 * DECATHLON_CASES + DECATHLON_TEST_CASES
    for stub in stubs:
        assert (stub.parent / stub.name[2:]).is_file()
        assert stub.read_bytes()[:4] == bytes.fromhex("00051607")
        with pytest.raises(DataError, match="not gzip"):
            check_header(stub)


def test_decathlon_dataset_passes_read_index(decathlon_dataset):
    index = read_index(decathlon_dataset)
    assert len(index.training) == DECATHLON_CASES
    assert len(index.test) == DECATHLON_TEST_CASES
    assert index.label_set == frozenset({0, 1, 2, 3})
    assert [c.case_id for c in index.training] == [f"BRATS_{i:03d}" for i in range(1, DECATHLON_CASES + 1)]
    for case in index.training:
        assert not case.image.name.startswith("._")
        assert case.image.is_file() and case.label.is_file()
        assert case.image.parent.name == "imagesTr" and case.label.parent.name == "labelsTr"


# ---------------------------------------------------------------- CLI

def test_cli_synth_brats_size_and_overwrite(run_cli, tmp_path):
    out = tmp_path / "brats"
    args = ("synth", "--format", "brats", "--out", out, "--cases", "2", "--size", "40,44,24",
            "--workers", "1", "--quiet", "--seed", "4")
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    cases = discover_brats(out)
    assert len(cases) == 2
    for case in cases:
        for path in (*case.images.values(), case.seg):
            _, image = _read(path)
            assert image.GetSize() == (40, 44, 24)  # (x, y, z): not transposed

    marker = out / "keep.txt"
    marker.write_text("mine")
    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode != 0
    assert "Traceback" not in again.stderr
    assert "--overwrite" in again.stderr and str(out) in again.stderr
    assert marker.read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]

    replaced = run_cli(*args, "--overwrite", cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr
    assert not marker.exists()
    assert len(discover_brats(out)) == 2
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name or ".old" in p.name]


def test_cli_synth_decathlon_refuses_existing_out(run_cli, tmp_path):
    out = tmp_path / "Task01_BrainTumour"
    out.mkdir()
    args = ("synth", "--format", "decathlon", "--out", out, "--cases", "2", "--test-cases", "1",
            "--size", "24,24,16", "--workers", "1", "--quiet")
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "already exists" in result.stderr
    assert list(out.iterdir()) == []

    result = run_cli(*args, "--overwrite", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    index = read_index(out)
    assert len(index.training) == 2 and len(index.test) == 1
    assert (out / "._dataset.json").is_file()


def test_cli_synth_decathlon_without_appledouble(run_cli, tmp_path):
    out = tmp_path / "Task01_BrainTumour"
    result = run_cli("synth", "--format", "decathlon", "--out", out, "--cases", "1", "--test-cases", "0",
                     "--size", "16,16,16", "--workers", "1", "--quiet", "--no-appledouble", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not list(out.rglob("._*"))
    assert len(read_index(out).training) == 1


@pytest.mark.parametrize("size", ["4,4,4", "48,48", "a,b,c"])
def test_cli_synth_rejects_bad_size(run_cli, tmp_path, size):
    result = run_cli("synth", "--format", "brats", "--out", tmp_path / "x", "--size", size, cwd=tmp_path)
    assert result.returncode == 2
    assert "--size" in result.stderr
    assert not (tmp_path / "x").exists()



def test_synth_size_defaults_to_the_environment_then_the_real_shape(run_cli, tmp_path):
    """UNET_TRAIN_SYNTH_SIZE is --size's default (the docs' test runs every block on tiny cases);
    --size wins; empty means unset; a malformed value is refused naming the variable."""
    from trainer.commands.synth import default_size
    from trainer.errors import UserError

    assert default_size({}) == REAL_SHAPE and default_size({"UNET_TRAIN_SYNTH_SIZE": " "}) == REAL_SHAPE
    assert default_size({"UNET_TRAIN_SYNTH_SIZE": "48,40,32"}) == (48, 40, 32)
    with pytest.raises(UserError, match="UNET_TRAIN_SYNTH_SIZE"):
        default_size({"UNET_TRAIN_SYNTH_SIZE": "48,40"})
    env = {"UNET_TRAIN_SYNTH_SIZE": "24,20,16"}
    base = ("synth", "--format", "brats", "--cases", "1", "--workers", "1", "--quiet")
    assert run_cli(*base, "--out", tmp_path / "env", cwd=tmp_path, env=env).returncode == 0
    assert run_cli(*base, "--out", tmp_path / "flag", "--size", "16,16,16", cwd=tmp_path, env=env).returncode == 0
    for out, size in (("env", (24, 20, 16)), ("flag", (16, 16, 16))):
        (case,) = discover_brats(tmp_path / out)
        assert _read(case.seg)[1].GetSize() == size, out
    bad = run_cli(*base, "--out", tmp_path / "bad", cwd=tmp_path, env={"UNET_TRAIN_SYNTH_SIZE": "4,4,4"})
    assert bad.returncode == 2 and "UNET_TRAIN_SYNTH_SIZE" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()
    assert "UNET_TRAIN_SYNTH_SIZE" in run_cli("synth", "--help", cwd=tmp_path).stdout

# ---------------------------------------------------------------- the hard phantom

def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        for axis in range(3):
            grown |= np.roll(out, 1, axis) | np.roll(out, -1, axis)
        out = grown
    return out


def test_the_standard_phantom_is_unchanged_by_the_hard_one():
    from trainer.data.synth.phantom import make_case

    assert make_case((0, 1), (48, 40, 32)).contrast is None  # and its draws are the ones before (no new ones)
    assert make_case((0, 1), (48, 40, 32), "standard").classes.tobytes() == make_case((0, 1), (48, 40, 32)).classes.tobytes()


def test_hard_lesions_are_faint_and_the_core_is_close_to_the_oedema():
    from trainer.data.synth.phantom import (HARD_CONTRAST_RANGE, NECROTIC, OEDEMA, make_case)

    for seed in range(4):
        case = make_case((9, seed), (96, 96, 64), "hard")
        low, high = HARD_CONTRAST_RANGE
        assert low <= case.contrast <= high
        tumour = case.classes > 0
        shell = _dilate(tumour, 3) & ~tumour & (case.images["flair"] > 0)
        deep = (case.classes == OEDEMA) & ~_dilate(~tumour, 3)  # inside the fade, away from its edge
        flair = case.images["flair"]
        measured = np.median(flair[deep]) / np.median(flair[shell]) - 1
        assert 0.05 <= measured <= high + 0.1, (seed, measured)  # faint: under half the standard's doubling
        standard = make_case((9, seed), (96, 96, 64))
        s_tumour = standard.classes > 0
        s_shell = _dilate(s_tumour, 3) & ~s_tumour & (standard.images["flair"] > 0)
        s_oedema = (standard.classes == OEDEMA) & ~_dilate(~s_tumour, 3)
        if s_oedema.any():
            assert np.median(standard.images["flair"][s_oedema]) / np.median(standard.images["flair"][s_shell]) - 1 \
                > measured + 0.2
        if not case.high_grade and deep.any():  # a core with no rim anywhere differs by a few percent
            core = case.classes == NECROTIC
            for modality in ("flair", "t1", "t1ce", "t2"):
                image = case.images[modality]
                assert abs(np.median(image[core]) / np.median(image[deep]) - 1) < 0.25, modality


def test_hard_necrosis_is_plain_but_the_core_below_the_rims_cap_looks_like_the_oedema_around_it():
    from trainer.data.synth.phantom import NECROTIC, OEDEMA, make_case

    checked = 0
    for seed in range(8):
        case = make_case((9, seed), (96, 96, 64), "hard")
        hidden = case.hidden_core
        assert not (hidden & (case.classes != NECROTIC)).any()
        if not case.high_grade:
            assert not hidden.any()
            continue
        tumour = case.classes > 0
        settled = (case.classes == OEDEMA) & ~_dilate(~tumour, 3)  # oedema away from its fading edge
        necrosis = (case.classes == NECROTIC) & ~hidden
        near_hidden, near_necrosis = settled & _dilate(hidden, 3), settled & _dilate(necrosis, 3)
        if near_hidden.sum() < 100 or near_necrosis.sum() < 20:
            continue
        checked += 1
        for modality in ("flair", "t1", "t1ce", "t2"):
            image = case.images[modality]
            hidden_contrast = np.median(image[hidden]) / np.median(image[near_hidden]) - 1
            necrosis_contrast = np.median(image[necrosis]) / np.median(image[near_necrosis]) - 1
            assert abs(hidden_contrast) < 0.07, (seed, modality, hidden_contrast)  # within the texture's spread
            if modality in ("t1", "t1ce"):
                assert necrosis_contrast < -0.1, (seed, modality, necrosis_contrast)  # dark, as real necrosis
        assert np.median(case.images["t2"][necrosis]) / np.median(case.images["t2"][near_necrosis]) - 1 > 0.05
    assert checked >= 3


def test_about_one_hard_case_in_seven_has_no_enhancing_rim():
    from trainer.data.synth.phantom import ENHANCING, make_case

    rimless = sum(not (make_case((4, seed), (48, 48, 32), "hard").classes == ENHANCING).any() for seed in range(42))
    assert 2 <= rimless <= 12  # 6 expected; binomial(42, 1/7) lies in 2..12 with > 99% probability


def test_synth_writes_the_hard_phantom(tmp_path, run_cli):
    result = run_cli("synth", "--format", "brats", "--out", tmp_path / "hard", "--cases", "2", "--size", "48,40,32",
                     "--difficulty", "hard", "--workers", "1", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(brats_case_folders(tmp_path / "hard")) == 2


def test_hard_rims_cover_only_a_cap_so_some_core_slices_show_no_rim():
    from trainer.data.synth.phantom import ENHANCING, NECROTIC, make_case

    rimmed = 0
    for seed in range(8):
        case = make_case((0, seed), (120, 120, 78), "hard")
        classes = case.classes
        if not (classes == ENHANCING).any():
            continue
        rimmed += 1
        core_slices = np.flatnonzero((classes >= NECROTIC).any(axis=(0, 1)))
        rimless = [z for z in core_slices if not (classes[:, :, z] == ENHANCING).any()]
        assert 0.1 <= len(rimless) / len(core_slices) <= 0.5, (seed, len(rimless), len(core_slices))
        # and those slices hold no necrosis either: all their core is the near-oedema kind
        hidden = case.hidden_core
        assert all(np.array_equal(hidden[:, :, z], classes[:, :, z] == NECROTIC) for z in rimless)
        standard = make_case((0, seed), (120, 120, 78)).classes
        if (standard == ENHANCING).any():  # the standard phantom's rim encloses its core in every slice
            slices = np.flatnonzero((standard >= NECROTIC).any(axis=(0, 1)))
            assert all((standard[:, :, z] == ENHANCING).any() for z in slices)
    assert rimmed >= 4
