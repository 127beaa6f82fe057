"""One dataset seam: both models train, evaluate and predict on both layouts (3D on a BraTS
folder, 2D on a Decathlon folder), end to end through the CLI on tiny synthetic sets."""
from __future__ import annotations

import json
import shutil

import pytest

import numpy as np
import SimpleITK as sitk

from support.data import TINY_2D, TINY_3D, brats_case_folders, run_cli

pytestmark = pytest.mark.slow  # trains models or starts processes: not in scripts/test.sh --fast



def test_the_3d_model_on_a_brats_folder_beside_its_2d_slices(brats_dataset, tmp_path):
    """As the README says: a relative --src, prepared for 2D then for 3D into the same default
    folder; the 3D run reads its cache (no stale-cache warning) and records the dataset."""
    shutil.copytree(brats_dataset, tmp_path / "raw" / "BraTS")
    for model in ("2d", "3d"):
        prepared = run_cli("prepare", "--src", "raw/BraTS", "--model", model, "--quiet", cwd=tmp_path)
        assert prepared.returncode == 0, prepared.stderr[-2000:]
    folder = tmp_path / "data" / "prepared" / "BraTS"
    assert "(brats, 6 labelled cases)" in prepared.stdout and f"--data {folder}" in prepared.stdout
    manifest = json.loads((folder / "prepared.json").read_text())
    assert manifest["layout"] == "brats" and manifest["source"] == str(tmp_path / "raw" / "BraTS")
    assert sorted(p.name for p in folder.iterdir()) == ["prepared.json", "slices-128.h5", "volumes"]
    trained = run_cli("train", "--model", "3d", "--run-name", "b3", "--epochs", "1", *TINY_3D, cwd=tmp_path,
                      timeout=400)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "older than its NIfTI source" not in trained.stderr and "reading the source" not in trained.stderr
    assert (tmp_path / "runs" / "b3" / "validation.json").exists()  # whole BraTS volumes, sliding window
    evaluated = run_cli("evaluate", "--run-name", "b3", "--quiet", cwd=tmp_path, timeout=400)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "b3" / "evaluation" / "summary.json").read_text())
    assert summary["model"] == "3d" and "(brats," in summary["dataset"]
    case = brats_case_folders(brats_dataset)[0]
    predicted = run_cli("predict", "--run-name", "b3", case, "--out", tmp_path / "pred", "--quiet", cwd=tmp_path,
                        timeout=400)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    mask = sitk.ReadImage(str(tmp_path / "pred" / f"{case.name}_mask.nii.gz"))
    assert mask.GetSize() == sitk.ReadImage(str(case / f"{case.name}_flair.nii.gz")).GetSize()


def test_the_2d_model_on_a_decathlon_folder(decathlon_dataset, tmp_path):
    prepared = run_cli("prepare", "--src", decathlon_dataset, "--model", "2d", "--out", tmp_path / "ds", "--quiet",
                       cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    assert "(decathlon, 4 labelled cases)" in prepared.stdout
    trained = run_cli("train", "--model", "2d", "--run-name", "d2", "--epochs", "1", "--data", tmp_path / "ds",
                      "--set", "model.regions=[wt,tc,et]", *TINY_2D, cwd=tmp_path, timeout=400)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (tmp_path / "runs" / "d2" / "validation.json").exists()
    evaluated = run_cli("evaluate", "--run-name", "d2", "--quiet", cwd=tmp_path, timeout=400)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    predictions = list((tmp_path / "runs" / "d2" / "evaluation" / "predictions").glob("*_pred.nii.gz"))
    assert predictions
    for path in predictions:  # a Decathlon set's predictions in its own 0/1/2/3 labels
        assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(path))))) <= {0, 1, 2, 3}
    image = next(p for p in sorted((decathlon_dataset / "imagesTr").glob("*.nii.gz")) if not p.name.startswith("."))
    predicted = run_cli("predict", "--run-name", "d2", "-i", image.parent, "-o", tmp_path / "pred", "--quiet",
                        cwd=tmp_path, timeout=400)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    written = sitk.ReadImage(str(tmp_path / "pred" / image.name))
    assert written.GetSize() == sitk.ReadImage(str(image)).GetSize()[:3]


def test_a_format_that_contradicts_the_folder_is_refused(decathlon_dataset, tmp_path):
    result = run_cli("prepare", "--format", "brats", "--src", decathlon_dataset, "--out", tmp_path / "s.h5",
                     cwd=tmp_path)
    assert result.returncode == 2 and "holds dataset.json, so it is a decathlon folder" in result.stderr
