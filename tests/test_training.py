"""Real (tiny) training runs through the CLI: checkpoints, TensorBoard, resume, evaluate, export."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tensorflow as tf

from support.data import REPO_ROOT, TINY_2D, TINY_3D, run_cli

pytestmark = pytest.mark.slow  # trains models or starts processes: not in scripts/test.sh --fast


def data_flags_2d(dataset: Path, brats: Path) -> list[str]:
    return ["--data", dataset, "--set", f"data.source={brats}"]


@pytest.fixture(scope="module")
def trained_2d(prepared_brats, brats_dataset, tmp_path_factory):
    """One tiny 2D run of 2 epochs, shared by the evaluate/export/TensorBoard checks."""
    work = tmp_path_factory.mktemp("run2d")
    flags = ["--model", "2d", "--run-dir", work / "runs", "--run-name", "t"] + TINY_2D + data_flags_2d(
        prepared_brats, brats_dataset)
    result = run_cli("train", "--epochs", "2", *flags, cwd=work, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "runs" / "t", flags, work


def test_2d_training_writes_checkpoints_history_and_events(trained_2d):
    run, _, _ = trained_2d
    assert sorted(p.name for p in (run / "checkpoints" / "last").glob("*.index")) == ["epoch-1.index",
                                                                                      "epoch-2.index"]
    assert list((run / "checkpoints" / "best").glob("best-*.index"))
    history = json.loads((run / "history.json").read_text())["epochs"]
    assert [e["epoch"] for e in history] == [1, 2]
    assert [e["step"] for e in history] == [2, 4]
    for key in ("loss", "slice_dice", "val_dice", "val_slice_dice", "lr", "images_per_sec", "val_specificity",
                "input_wait_share"):
        assert key in history[-1], key
    assert (run / "history.csv").read_text().count("\n") == 3
    assert list((run / "tensorboard" / "train").glob("events.out.tfevents.*"))
    assert list((run / "tensorboard" / "validation").glob("events.out.tfevents.*"))
    assert "global batch 4" in (run / "training.log").read_text()


def test_3d_training_writes_checkpoints_and_events(decathlon_dataset, tmp_path):
    split = ["--set", "data.split.val_fraction=0.25", "--set", "data.split.test_fraction=0.25"]
    prepared = run_cli("prepare", "--format", "decathlon", "--src", decathlon_dataset, "--quiet", *split,
                       cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    # no --data: the dataset just prepared here, said in the log
    result = run_cli("train", "--model", "3d", "--epochs", "1", "--run-dir", tmp_path / "runs", "--run-name", "v",
                     *TINY_3D, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "v"
    assert (run / "checkpoints" / "last" / "epoch-1.index").exists()
    assert list((run / "tensorboard" / "train").glob("events.out.tfevents.*"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 2 and summary["final_epoch"] == 1
    dataset = tmp_path / "data" / "prepared" / decathlon_dataset.name
    assert f"dataset: {dataset}" in (run / "training.log").read_text()
    assert json.loads((run / "run.json").read_text())["dataset"] == str(dataset)


def _checkpoint_fingerprint(prefix: str) -> tuple[int, int, float]:
    """(epoch, optimizer step, sum |model weights|) read with TensorFlow's own checkpoint reader."""
    reader = tf.train.load_checkpoint(prefix)
    names = reader.get_variable_to_shape_map()
    epoch = int(reader.get_tensor("state/epoch/.ATTRIBUTES/VARIABLE_VALUE"))
    step_key = next(n for n in names if n.startswith("optimizer/") and "iter" in n and "VARIABLE_VALUE" in n)
    checksum = sum(float(np.abs(reader.get_tensor(n).astype(np.float64)).sum()) for n in names
                   if n.startswith("model/") and n.endswith("VARIABLE_VALUE") and "OPTIMIZER_SLOT" not in n)
    return epoch, int(reader.get_tensor(step_key)), checksum


def test_resume_after_interrupted_run(prepared_brats, brats_dataset, tmp_path):
    """Kill a long run after its first checkpoint; the rerun continues at that epoch and step
    with the checkpointed weights and optimizer state."""
    runs = tmp_path / "runs"
    flags = ["--model", "2d", "--run-dir", runs, "--run-name", "r"] + TINY_2D + data_flags_2d(
        prepared_brats, brats_dataset)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "trainer.cli", "train", "--epochs", "1000", *map(str, flags)],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = runs / "r" / "checkpoints" / "last"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and tf.train.latest_checkpoint(str(last)) is None:
            assert proc.poll() is None, "training exited before writing a checkpoint"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    prefix = tf.train.latest_checkpoint(str(last))
    assert prefix is not None
    epoch, step, checksum = _checkpoint_fingerprint(prefix)
    assert epoch >= 1 and step == 2 * epoch

    result = run_cli("train", "--epochs", str(epoch + 1), *flags, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    match = re.search(r"resuming from .*epoch-(\d+): epoch (\d+), step (\d+), weights checksum ([0-9.]+)",
                      result.stderr)
    assert match, result.stderr[-3000:]
    assert int(match.group(2)) == epoch and int(match.group(3)) == step
    assert float(match.group(4)) == pytest.approx(checksum, rel=1e-9)
    history = json.loads((runs / "r" / "history.json").read_text())["epochs"]
    assert history[-1]["epoch"] == epoch + 1 and history[-1]["step"] == step + 2
    # The optimizer state travelled too: Adam's moment slots in the new checkpoint came from
    # continuing, not from a fresh optimizer (a fresh one would have step 2, not step + 2).
    new_epoch, new_step, _ = _checkpoint_fingerprint(tf.train.latest_checkpoint(str(last)))
    assert (new_epoch, new_step) == (epoch + 1, step + 2)


def test_finished_run_is_not_retrained(trained_2d):
    run, flags, work = trained_2d
    result = run_cli("train", "--epochs", "2", *flags, cwd=work, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nothing to do" in result.stderr


def test_evaluate_writes_metrics_and_nifti_in_source_geometry(trained_2d, brats_dataset):
    run, flags, work = trained_2d
    result = run_cli("evaluate", *flags, cwd=work, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "evaluation" / "summary.json").read_text())
    assert summary["cases"] >= 1
    for metric in ("dice", "hd95", "sensitivity", "specificity", "precision"):
        assert set(summary[metric]) == {"mean", "median", "std", "min", "max", "n", "undefined_cases"}
        assert summary[metric]["n"] + summary[metric]["undefined_cases"] == summary["cases"]
    rows = (run / "evaluation" / "per_case.csv").read_text().splitlines()
    assert rows[0] == "case,dice,hd95,sensitivity,specificity,precision,dice_raw,hd95_raw"
    assert len(rows) == summary["cases"] + 1
    hd95_cells = [row.split(",")[2] for row in rows[1:]]
    assert hd95_cells.count("nan") == summary["hd95"]["undefined_cases"]
    for row in rows[1:]:
        case_id = row.split(",")[0]
        prediction = sitk.ReadImage(str(run / "evaluation" / "predictions" / f"{case_id}_pred.nii.gz"))
        source = sitk.ReadImage(str(next(brats_dataset.rglob(f"{case_id}_flair.nii.gz"))))
        assert prediction.GetSize() == source.GetSize()  # (x, y, z) with x != y: no transpose
        assert prediction.GetSpacing() == source.GetSpacing()
        assert prediction.GetOrigin() == source.GetOrigin()
        assert prediction.GetDirection() == source.GetDirection()
        # The source's geometry is not SimpleITK's default, so a writer that dropped it would fail.
        assert source.GetOrigin() != (0.0, 0.0, 0.0)
        assert set(np.unique(sitk.GetArrayFromImage(prediction))) <= {0, 1}


def _evaluation_settings_3d(decathlon_dataset: Path, tmp_path: Path, test_ids: list[str]):
    from support.data import write_prepared
    from trainer.config.settings import DataSettings, Settings, TrainSettings

    folder = write_prepared(decathlon_dataset, tmp_path / "eval-data", {"test": test_ids})
    return Settings(data=DataSettings(dataset=folder), train=TrainSettings(model="3d", run_dir=tmp_path,
                                                                          run_name="stub"))


def test_evaluate_3d_geometry_and_undefined_hd95_with_a_stub_model(decathlon_dataset, tmp_path, monkeypatch):
    """No training: a stub predictor predicts nothing for the first case (HD95 undefined)
    and the brain for the others. Predictions must carry the Decathlon source geometry,
    whose direction is not the identity a geometry-dropping writer would produce."""
    from types import SimpleNamespace

    from trainer.inference import evaluate as evaluation

    calls = []

    def predict(image):
        calls.append(1)
        return np.zeros(image.shape[:3], np.float32) if len(calls) == 1 else (image[..., 0] != 0).astype(np.float32)

    monkeypatch.setattr(evaluation, "Predictor", SimpleNamespace(
        from_run=lambda settings, **options: (SimpleNamespace(
            predict_channels=lambda image: predict(image)[..., None], mirrored_axes=lambda: (),
            engine=SimpleNamespace(name="stub", precision="fp32", source="stub")), "stub-checkpoint")))
    ids = ["BRATS_001", "BRATS_002", "BRATS_003"]
    summary = evaluation.evaluate(_evaluation_settings_3d(decathlon_dataset, tmp_path, ids), "test", progress=False)
    assert summary["cases"] == 3
    assert summary["hd95"]["undefined_cases"] == 1 and summary["hd95"]["n"] == 2
    assert summary["hd95"]["mean"] is not None and summary["hd95"]["mean"] > 0
    assert summary["dice"]["undefined_cases"] == 0 and summary["dice"]["n"] == 3
    out = tmp_path / "stub" / "evaluation"
    saved = json.loads((out / "summary.json").read_text())
    assert saved["hd95"] == summary["hd95"]
    rows = [row.split(",") for row in (out / "per_case.csv").read_text().splitlines()[1:]]
    assert [row[0] for row in rows] == ids
    assert rows[0][2] == "nan" and all(float(row[2]) > 0 for row in rows[1:])
    for case_id in ids:
        prediction = sitk.ReadImage(str(out / "predictions" / f"{case_id}_pred.nii.gz"))
        source = sitk.ReadImage(str(decathlon_dataset / "imagesTr" / f"{case_id}.nii.gz"))  # 4D
        assert prediction.GetSize() == source.GetSize()[:3]
        assert prediction.GetSpacing() == source.GetSpacing()[:3]
        assert prediction.GetOrigin() == source.GetOrigin()[:3]
        direction = np.asarray(source.GetDirection()).reshape(4, 4)[:3, :3]
        assert prediction.GetDirection() == tuple(direction.flatten())
        assert not np.array_equal(direction, np.eye(3))  # non-default, so the check can fail


def test_evaluate_3d_split_case_missing_from_dataset_json(decathlon_dataset, tmp_path):
    from trainer.errors import DataError
    from trainer.inference.evaluate import evaluate

    settings = _evaluation_settings_3d(decathlon_dataset, tmp_path, ["BRATS_001", "BRATS_999"])
    with pytest.raises(DataError) as caught:
        evaluate(settings, "test", progress=False)  # fails on the split, before any model is needed
    message = str(caught.value)
    assert "BRATS_999" in message and str(settings.data.dataset / "prepared.json") in message
    assert str(decathlon_dataset / "dataset.json") in message


def test_predict_writes_mask_and_overlay(trained_2d, brats_dataset, tmp_path):
    _, flags, work = trained_2d
    case = next(p.parent for p in brats_dataset.rglob("*_flair.nii.gz"))
    result = run_cli("predict", *flags, case, "--out", tmp_path / "pred", cwd=work, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    mask = sitk.ReadImage(str(tmp_path / "pred" / f"{case.name}_mask.nii.gz"))
    assert mask.GetSize() == sitk.ReadImage(str(next(case.glob("*_flair.nii.gz")))).GetSize()
    png = (tmp_path / "pred" / f"{case.name}_overlay.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_parity(trained_2d):
    run, flags, work = trained_2d
    result = run_cli("export", *flags, cwd=work, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run / "export" / "saved_model" / "export.json").read_text())
    assert report["max_abs_diff"] <= 1e-5
    # Independent check: load the SavedModel here and compare with the checkpointed Keras model.
    from trainer.config.settings import ModelSettings
    from trainer.models import UNet2D

    model = UNet2D(ModelSettings(base_filters_2d=4), 4)
    tf.train.Checkpoint(model=model).restore(tf.train.latest_checkpoint(str(run / "checkpoints" / "best"))
                                             ).expect_partial()
    sample = np.random.default_rng(1).normal(size=(1, 128, 128, 4)).astype(np.float32)
    served = tf.saved_model.load(str(run / "export" / "saved_model")).signatures["serving_default"]
    exported = list(served(tf.constant(sample)).values())[0].numpy()
    assert np.abs(exported - model(sample, training=False).numpy()).max() <= 1e-5


def test_export_refuses_an_existing_output_unless_overwrite(trained_2d, tmp_path):
    run, flags, work = trained_2d
    out = tmp_path / "models"
    out.mkdir()
    (out / "notes.txt").write_text("someone's work\n")
    refused = run_cli("export", *flags, "--out", out, cwd=work, timeout=300)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    lines = [line for line in refused.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and str(out) in lines[0] and "--overwrite" in lines[0], refused.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # untouched
    # --overwrite replaces an earlier export only, never a folder export did not write
    kept = run_cli("export", *flags, "--out", out, "--overwrite", cwd=work, timeout=300)
    assert kept.returncode == 2 and "is not an earlier export" in kept.stderr, kept.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    for inside in (run, run.parent, run / ".."):  # the run itself, or a folder that holds it
        refused = run_cli("export", *flags, "--out", inside, "--overwrite", cwd=work, timeout=300)
        assert refused.returncode == 2 and "is the run folder" in refused.stderr, refused.stderr[-2000:]
    assert list((run / "checkpoints" / "best").glob("best-*.index"))
    fresh = tmp_path / "fresh"
    first = run_cli("export", *flags, "--out", fresh, cwd=work, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    (tmp_path / "export.json").write_text("a neighbour's file\n")
    again = run_cli("export", *flags, "--out", fresh, "--overwrite", cwd=work, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (fresh / "saved_model.pb").exists() and (fresh / "export.json").exists()
    assert (tmp_path / "export.json").read_text() == "a neighbour's file\n"  # nothing written beside --out


def test_a_diverged_run_stops_with_a_clear_error_and_no_nan_checkpoint(prepared_brats, brats_dataset, tmp_path):
    import shutil

    import h5py

    poisoned = Path(shutil.copytree(prepared_brats, tmp_path / "poisoned"))
    with h5py.File(poisoned / "slices-128.h5", "r+") as h5:
        h5["train"]["images"][0] = np.nan  # the first training slice: a NaN loss from the first step on
    result = run_cli("train", "--epochs", "2", "--model", "2d", "--run-dir", tmp_path / "runs", "--run-name", "d",
                     *TINY_2D, "--set", "data.shuffle=false", "--set", "train.checkpoint_every_steps=1",
                     *data_flags_2d(poisoned, brats_dataset), cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "epoch 1, step 1: the training loss is nan: the run diverged" in result.stderr
    assert "Traceback" not in result.stderr and "train.learning_rate" in result.stderr
    assert f"Check the data ({poisoned}) for NaN/inf values" in result.stderr  # the file to look at
    # nothing diverged was checkpointed, not even the step checkpoint due after every step
    assert not list((tmp_path / "runs" / "d").rglob("*.index"))


def test_missing_prepared_data_is_a_clear_error(tmp_path):
    result = run_cli("train", "--data", tmp_path / "nope", "--run-dir", tmp_path / "runs", "--quiet",
                     cwd=tmp_path, timeout=300)
    assert result.returncode == 2
    assert "nope" in result.stderr and "unet-train prepare" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # a failed start writes nothing into runs/
    bare = run_cli("train", "--run-dir", tmp_path / "runs", "--quiet", cwd=tmp_path, timeout=300)
    assert bare.returncode == 2 and "no prepared dataset" in bare.stderr and not (tmp_path / "runs").exists()


def test_a_new_run_stopped_by_its_settings_leaves_no_folder(brats_dataset, tmp_path):
    """A validation budget that cannot cover the cases is found only once the data are read (after
    the run's log opened): the new run's folder goes, and a rerun starts clean."""
    prepared = run_cli("prepare", "--src", brats_dataset, "--out", tmp_path / "ds", "--set",
                       "data.split.val_fraction=0.5", "--quiet", cwd=tmp_path, timeout=300)
    assert prepared.returncode == 0, prepared.stderr
    result = run_cli("train", "--run-name", "tiny", "--data", tmp_path / "ds", *TINY_2D,
                     "--set", "train.validation_steps=1", "--set", "train.batch_size=1", cwd=tmp_path, timeout=300)
    assert result.returncode == 2 and "cannot cover the" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "runs" / "tiny").exists()
