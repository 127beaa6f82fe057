"""A run that knows what it is: prepare --src -> train -> predict/evaluate with no repeated flags,
and predict in nnU-Net's conventions (-i/-o, channel files, --continue, --save-probabilities).

Each run is trained in a folder with no settings.yaml, as a user who only ever typed
``prepare --src DIR [--out DIR]`` and then ``train`` would have it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from support.data import TINY_2D, TINY_3D, brats_case_folders, prepare_brats_cli, run_cli
from launcher.hosts import hosts_and_slots
from trainer.errors import UserError

pytestmark = pytest.mark.slow  # trains models or starts processes: not in scripts/test.sh --fast

CHANNELS = ("flair", "t1", "t1ce", "t2")


@pytest.fixture(scope="module")
def region_run(brats_dataset, tmp_path_factory):
    """A 2D WT/TC/ET run trained after ``prepare --src RAW --out DIR`` (both relative) and a bare
    ``train``: the dataset folder is the one just prepared here."""
    work = tmp_path_factory.mktemp("regions")
    src = Path(shutil.copytree(brats_dataset, work / "mydata" / "BraTS"))
    heldout = work / "heldout"
    case = brats_case_folders(src)[0]
    shutil.move(str(case), heldout / case.name)
    prepared = prepare_brats_cli(Path("mydata") / "BraTS", Path("prep") / "mine", work)
    assert prepared.returncode == 0, prepared.stderr
    result = run_cli("train", "--run-name", "r", "--epochs", "1", "--set", "model.regions=[wt,tc,et]", *TINY_2D,
                     cwd=work, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return work, heldout / case.name, result


def channel_files(case: Path, folder: Path) -> Path:
    """The case as nnU-Net channel files CASE_0000..0003 in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, modality in enumerate(CHANNELS):
        shutil.copy(case / f"{case.name}_{modality}.nii.gz", folder / f"{case.name}_{index:04d}.nii.gz")
    return folder


def test_prepare_src_then_train_validates_on_the_recorded_source(region_run):
    work, _, result = region_run
    run = work / "runs" / "r"
    validation = json.loads((run / "validation.json").read_text())
    assert validation["cases"] >= 1 and "engine" in validation
    decisions = json.loads((run / "postprocessing.json").read_text())
    assert set(decisions["regions"]) == {"wt", "tc", "et"}
    assert "validation on" in result.stdout
    # the run records its dataset folder, which records where the raw data are
    assert f"dataset: {work / 'prep' / 'mine'}" in (run / "settings.yaml").read_text()
    assert json.loads((run / "run.json").read_text())["dataset"] == str(work / "prep" / "mine")
    assert f"dataset: {work / 'prep' / 'mine'} (the last one prepared here" in result.stderr
    assert json.loads((work / "prep" / "mine" / "prepared.json").read_text())["source"] == str(work / "mydata" / "BraTS")


def test_region_run_predicts_label_maps_and_probabilities_without_repeating_settings(region_run, tmp_path):
    work, case, _ = region_run
    inputs = channel_files(case, tmp_path / "in")
    (inputs / "._junk_0000.nii.gz").write_bytes(b"\0" * 10)  # macOS AppleDouble: ignored
    result = run_cli("predict", "--run-name", "r", "-i", inputs, "-o", tmp_path / "out", "--save-probabilities",
                     "--quiet", cwd=work, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{case.name}.nii.gz", f"{case.name}.npz"]
    assert "predicted 1 case(s)" in result.stdout and "post-processing: wt " in result.stdout
    written = sitk.ReadImage(str(tmp_path / "out" / f"{case.name}.nii.gz"))  # an independent reader
    source = sitk.ReadImage(str(inputs / f"{case.name}_0000.nii.gz"))
    assert written.GetSize() == source.GetSize()
    assert np.allclose(written.GetSpacing(), source.GetSpacing())
    assert np.allclose(written.GetOrigin(), source.GetOrigin())
    assert np.allclose(written.GetDirection(), source.GetDirection())
    assert set(np.unique(sitk.GetArrayFromImage(written))) <= {0, 1, 2, 3}  # channel files: Decathlon labels
    with np.load(tmp_path / "out" / f"{case.name}.npz") as archive:
        probabilities = archive["probabilities"]
        assert list(archive["regions"]) == ["wt", "tc", "et"]
    assert probabilities.dtype == np.float16
    assert probabilities.shape == (3, *source.GetSize())
    assert 0.0 <= probabilities.min() and probabilities.max() <= 1.0


def test_a_case_folder_gets_brats_labels(region_run, tmp_path):
    work, case, _ = region_run
    result = run_cli("predict", "--run-name", "r", case, "--out", tmp_path, "--quiet", cwd=work, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{case.name}_labels.nii.gz")))
    assert set(np.unique(labels)) <= {0, 1, 2, 4}
    assert (tmp_path / f"{case.name}_overlay.png").is_file()


def test_continue_skips_finished_cases_and_redoes_a_truncated_one(region_run, tmp_path):
    work, case, _ = region_run
    inputs = channel_files(case, tmp_path / "in")
    second = inputs / "second"
    shutil.copytree(case, second / case.name)  # a BraTS case folder beside the channel files...
    (second / case.name).rename(second / "other")
    for path in (second / "other").iterdir():
        path.rename(path.with_name(path.name.replace(case.name, "other")))
    out = tmp_path / "out"
    args = ["predict", "--run-name", "r", "-i", inputs, "-o", out, "--quiet"]
    first = run_cli(*args, cwd=work, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "predicted 2 case(s)" in first.stdout
    again = run_cli(*args, "--continue", cwd=work, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "predicted 0 case(s)" in again.stdout and "2 already done" in again.stdout
    target = out / "other.nii.gz"
    target.write_bytes(target.read_bytes()[:target.stat().st_size // 2])  # truncated, as by a killed copy
    untouched = (out / f"{case.name}.nii.gz").stat().st_mtime_ns
    redo = run_cli(*args, "--continue", cwd=work, timeout=300)
    assert redo.returncode == 0, redo.stderr[-3000:]
    assert "predicted 1 case(s)" in redo.stdout and "1 already done" in redo.stdout
    assert sitk.ReadImage(str(target)).GetSize() == sitk.ReadImage(str(inputs / f"{case.name}_0000.nii.gz")).GetSize()
    assert (out / f"{case.name}.nii.gz").stat().st_mtime_ns == untouched


def test_an_override_that_contradicts_the_run_is_refused_by_name(region_run, tmp_path):
    work, case, _ = region_run
    for flags, key, theirs in ((["--model", "3d"], "train.model", "2d"),
                               (["--set", "data.channels=[flair]"], "data.channels", '["flair", "t1", "t1ce", "t2"]'),
                               (["--set", "model.regions=[wt]"], "model.regions", '["wt", "tc", "et"]')):
        result = run_cli("predict", "--run-name", "r", case, "--out", tmp_path, *flags, cwd=work)
        assert result.returncode == 2, (flags, result.stderr[-2000:])
        message = result.stderr.strip().splitlines()[-1]
        assert key in message and theirs in message and str(Path("runs") / "r" / "settings.yaml") in message
        assert "Traceback" not in result.stderr
    # what is free at inference time may change: mirroring, an engine
    free = run_cli("predict", "--run-name", "r", case, "--out", tmp_path / "free", "--disable-tta", "--engine", "tf",
                   "--quiet", cwd=work, timeout=300)
    assert free.returncode == 0, free.stderr[-3000:]
    assert "post-processing: wt " in free.stdout  # decided for the un-mirrored procedure too


def test_predict_needs_inputs_and_an_output_folder(region_run, tmp_path):
    work, case, _ = region_run
    for args, words in ((["-i", tmp_path], "-o/--out"), (["-o", tmp_path], "expected cases"),
                        (["-i", tmp_path, case, "-o", tmp_path], "not both"),
                        (["-i", tmp_path / "none", "-o", tmp_path / "o"], "folder of cases")):
        result = run_cli("predict", "--run-name", "r", *args, cwd=work)
        assert result.returncode == 2 and words in result.stderr, (args, result.stderr)
    (tmp_path / "half").mkdir()
    shutil.copy(case / f"{case.name}_flair.nii.gz", tmp_path / "half" / "X_0000.nii.gz")
    result = run_cli("predict", "--run-name", "r", "-i", tmp_path / "half", "-o", tmp_path / "o", cwd=work)
    assert result.returncode == 2 and "'X' has channel files _0000; expected exactly _0000 ... _0003" in result.stderr


def test_an_unreachable_source_is_reported_at_the_start_and_its_fix_at_the_end(brats_dataset, tmp_path):
    src = Path(shutil.copytree(brats_dataset, tmp_path / "moving" / "BraTS"))
    prepared = prepare_brats_cli(src, tmp_path / "ds", tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    shutil.rmtree(tmp_path / "moving")  # the raw volumes are on another host now
    result = run_cli("train", "--run-name", "gone", "--epochs", "1", "--data", tmp_path / "ds", *TINY_2D,
                     cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stderr
    start = log.index("raw volumes not found")
    assert start < log.index("finished: epoch 1")  # said before training, not after
    assert "data.source" in log[start - 200:start + 300]
    assert "post-processing undecided" in result.stdout
    assert "unet-train evaluate --split val --run-dir runs --run-name gone" in result.stdout
    assert not (tmp_path / "runs" / "gone" / "validation.json").exists()


def test_a_3d_run_is_evaluated_and_predicted_without_model_flags(decathlon_dataset, tmp_path):
    prepared = run_cli("prepare", "--format", "decathlon", "--src", decathlon_dataset, "--out", tmp_path / "ds",
                       "--quiet", cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    data = ["--data", tmp_path / "ds"]
    trained = run_cli("train", "--model", "3d", "--run-name", "v", "--epochs", "1", *data, *TINY_3D,
                      cwd=tmp_path, timeout=400)
    assert trained.returncode == 0, trained.stderr[-3000:]
    evaluated = run_cli("evaluate", "--run-name", "v", "--no-predictions", "--quiet", cwd=tmp_path, timeout=400)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "v" / "evaluation" / "summary.json").read_text())
    assert summary["model"] == "3d"
    image = next(p for p in sorted((decathlon_dataset / "imagesTr").glob("*.nii.gz")) if not p.name.startswith("."))
    predicted = run_cli("predict", "--run-name", "v", image, "--out", tmp_path / "pred", "--quiet",
                        cwd=tmp_path, timeout=400)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    mask = sitk.ReadImage(str(tmp_path / "pred" / image.name.replace(".nii.gz", "_mask.nii.gz")))
    assert mask.GetSize() == sitk.ReadImage(str(image)).GetSize()[:3]


def test_version_and_hosts_with_slots(tmp_path):
    result = run_cli("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("unet-train ")
    assert hosts_and_slots("h1:4,h2:4", None) == ("h1,h2", 4)
    assert hosts_and_slots("h1,h2", None) == ("h1,h2", 1)
    assert hosts_and_slots("h1,h2", 3) == ("h1,h2", 3)
    assert hosts_and_slots("h1:2,h2:2", 2) == ("h1,h2", 2)
    for text, slots in (("h1:4,h2:2", None), ("h1:4,h2", None), ("h1:0", None), ("h1:x", None), ("h1:4", 2)):
        with pytest.raises(UserError):
            hosts_and_slots(text, slots)
    dry = run_cli("distributed", "--mode", "horovod", "--hosts", "127.0.0.1:2", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "-np 2" in dry.stdout and "127.0.0.1:2" in dry.stdout
