"""Horovod allreduce mode with real horovodrun processes on localhost (Gloo and MPI)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from support.procs import VENV_BIN, run_bounded, unet_train_cmd
from trainer.hardware.cpu import default_intra_threads

HOROVODRUN = str(VENV_BIN / "horovodrun")
TIMEOUT = 300
pytestmark = pytest.mark.slow  # starts horovodrun ranks: not in scripts/test.sh --fast

# Plain synchronous SGD on a fixed data order: no dropout, BN, augmentation or shuffling,
# and no LR scaling, so N ranks x batch b must equal one process x batch N*b. float32 pinned:
# the default precision (auto) is bf16 on CPUs that have it, whose rounding differs by batch split.
SGD_EXACT = ["--set", "train.precision=fp32",
             "--set", "train.optimizer=sgd", "--set", "train.learning_rate=0.5", "--set", "model.dropout=0",
             "--set", "model.norm_2d=none", "--set", "data.augment=false", "--set", "data.shuffle=false",
             "--set", "train.scale_lr=false", "--set", "train.warmup_epochs=0", "--set", "train.steps_per_epoch=3",
             "--set", "train.validation_steps=1", "--set", "model.base_filters_2d=4",
             "--set", "train.image_every_epochs=0", "--set", "train.loss.name=dice", "--quiet"]


def writer_pid(event_file_name: str) -> int:
    """events.out.tfevents.<time>.<host, may hold dots>.<pid>.<id>.v2 -> the writing process."""
    match = re.fullmatch(r"events\.out\.tfevents\.\d+\.(.+)\.(\d+)\.\d+\.v2", event_file_name)
    assert match, f"unexpected event file name {event_file_name}"
    return int(match.group(2))


def data_flags(prepared_brats):
    return ["--set", f"data.dataset={prepared_brats}"]


def model_weights(run_dir, epoch=1) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(str(run_dir / "checkpoints" / "last" / f"epoch-{epoch}"))
    return {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map()
            if n.startswith("model/") and n.endswith("VARIABLE_VALUE") and "OPTIMIZER_SLOT" not in n}


def train_single(tmp_path, name, batch, prepared_brats, *extra):
    result = run_bounded(unet_train_cmd("train", "--model", "2d", "--epochs", "1", "--batch-size", batch,
                                        "--run-dir", tmp_path / "runs", "--run-name", name,
                                        *data_flags(prepared_brats), *extra),
                         TIMEOUT, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    return tmp_path / "runs" / name


def horovod(tmp_path, controller, name, batch, prepared_brats, *extra, epochs=1):
    cmd = [HOROVODRUN, "-np", "2", "-H", "localhost:2", f"--{controller}", *unet_train_cmd(
        "train", "--dist", "horovod", "--model", "2d", "--epochs", str(epochs), "--batch-size", batch,
        "--run-dir", tmp_path / "runs", "--run-name", name, *data_flags(prepared_brats), *extra)]
    result = run_bounded(cmd, TIMEOUT, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:]
    return tmp_path / "runs" / name, result.stdout


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_two_ranks_equal_one_process_at_double_batch(controller, prepared_brats, tmp_path):
    single = model_weights(train_single(tmp_path, "single", 4, prepared_brats, *SGD_EXACT))
    ranks, log = horovod(tmp_path, controller, "hvd", 2, prepared_brats, *SGD_EXACT)
    distributed = model_weights(ranks)
    assert "2 worker(s) x batch 2 = global batch 4" in log
    epoch_line = next(line for line in log.splitlines() if "epoch 1/1:" in line)
    assert "loss: " in epoch_line and "val_dice: " in epoch_line  # Horovod's averaged (numpy) metrics shown too
    assert single.keys() == distributed.keys() and len(single) > 10
    worst = max(float(np.abs(single[k] - distributed[k]).max()) for k in single)
    assert worst < 2e-5, f"2-rank SGD diverged from 1-process SGD by {worst}"
    # Control: the test can tell runs apart. One process at batch 2 sees only half the samples.
    half = model_weights(train_single(tmp_path, "half", 2, prepared_brats, *SGD_EXACT))
    gap = max(float(np.abs(half[k] - distributed[k]).max()) for k in half)
    assert gap > 100 * max(worst, 1e-7), f"control run is indistinguishable (gap {gap}, worst {worst})"


def test_two_rank_training_writes_one_run_and_resumes(prepared_brats, tmp_path):
    # Momentum SGD: a resume must restore (on rank 0) and broadcast (to rank 1) weights AND optimizer
    # slots; a rank that resumed from anything else would pull the averaged gradients off course.
    exact = [*SGD_EXACT, "--set", "train.momentum=0.9"]
    run, log = horovod(tmp_path, "gloo", "two", 2, prepared_brats, *exact, epochs=1)
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["checkpoints", "tensorboard", "history.csv", "history.json", "settings.yaml", "summary.json",
         "training.log", "postprocessing.json", "validation.json", "run.json"])  # validated on the recorded source
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "last"]
    assert sorted(p.name for p in (run / "tensorboard").iterdir()) == ["train", "validation"]
    writers = {writer_pid(f.name) for f in (run / "tensorboard").rglob("events.out.tfevents.*")}
    assert len(writers) == 1, f"TensorBoard events from several processes: {writers}"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["global_batch"] == 4 and summary["dist"] == "horovod"
    assert log.count("[0]<stdout>:epoch 1/1: ") == 1 and "[1]<stdout>" not in log  # only rank 0 prints progress

    run, log = horovod(tmp_path, "gloo", "two", 2, prepared_brats, *exact, epochs=2)
    assert "resuming from" in log and "epoch 1, step 3" in log
    history = json.loads((run / "history.json").read_text())["epochs"]
    assert [(e["epoch"], e["step"]) for e in history] == [(1, 3), (2, 6)]
    assert sorted(p.name for p in (run / "checkpoints" / "last").glob("*.index")) == ["epoch-1.index",
                                                                                     "epoch-2.index"]
    # The same interrupted schedule in one process at batch 4 must land on the same weights.
    train_single(tmp_path, "one", 4, prepared_brats, *exact)
    single = model_weights(train_single(tmp_path, "one", 4, prepared_brats, *exact, "--epochs", "2"), epoch=2)
    resumed = model_weights(run, epoch=2)
    worst = max(float(np.abs(single[k] - resumed[k]).max()) for k in single)
    assert worst < 2e-5, f"2-rank resume diverged from the 1-process resume by {worst}"


def test_plain_mpirun_runs_the_same_command(prepared_brats, tmp_path):
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "--bind-to", "none",
           *unet_train_cmd("train", "--dist", "horovod", "--model", "2d", "--epochs", "1", "--batch-size", "2",
                           "--run-dir", tmp_path / "runs", "--run-name", "mpi", *data_flags(prepared_brats),
                           "--set", "model.base_filters_2d=4", "--set", "train.steps_per_epoch=2",
                           "--set", "train.validation_steps=1", "--quiet")]
    result = run_bounded(cmd, TIMEOUT, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "2 worker(s) x batch 2 = global batch 4" in result.stdout
    # Physical cores shared by the 2 local ranks (--bind-to none: the ranks are not pinned).
    assert f"intra_op={default_intra_threads(2)} " in result.stdout


def test_benchmark_times_the_real_step_under_horovodrun(prepared_brats, tmp_path):
    """The built-in benchmark runs the training runtime itself: per-rank figures from both ranks."""
    out = tmp_path / "bench.json"
    cmd = [HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo", *unet_train_cmd(
        "benchmark", "--dist", "horovod", "--model", "2d", "--batch-size", "2", "--steps", "2", "--warmup", "1",
        "--mode", "train", "--mode", "pipeline", "--out", out, *data_flags(prepared_brats),
        "--set", "model.base_filters_2d=4")]
    result = run_bounded(cmd, TIMEOUT, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:]
    report = json.loads(out.read_text())
    assert report["dist"] == "horovod" and report["workers"] == 2 and report["global_batch"] == 4
    train = report["train"]
    assert len(train["images_per_sec_per_worker"]) == 2 and all(v > 0 for v in train["images_per_sec_per_worker"])
    assert 0 <= train["input_wait_share"] <= 1 and 0 < train["share_of_nominal_peak"] < 1
    assert len(train["step_seconds"]) == train["timed_steps"] == 2
    assert train["sustained_images_per_sec"] == pytest.approx(4 * 2 / sum(train["step_seconds"]), rel=1e-2)
    anonymous, resident = report["peak_anon_mib_per_worker"], report["peak_rss_mib_per_worker"]
    assert len(anonymous) == 2 and all(0 < a < r for a, r in zip(anonymous, resident))  # RSS adds file pages
    assert report["nominal_peak"]["gflop_per_sec"] > 0 and len(report["pipeline"]["images_per_sec_per_worker"]) == 2
    assert not (tmp_path / "runs").exists()  # a benchmark writes no run


@pytest.mark.parametrize("context", [0, 1])
def test_region_model_two_ranks_equal_one_process_at_double_batch(prepared_brats, tmp_path, context):
    """The WT/TC/ET model (three sigmoid outputs), also with 2.5D input (neighbouring slices as
    channels), keeps the sync-SGD equivalence under Horovod."""
    regions = [*SGD_EXACT, "--set", "model.regions=[wt,tc,et]", "--set", f"model.context_slices_2d={context}"]
    single = model_weights(train_single(tmp_path, "single", 4, prepared_brats, *regions))
    ranks, log = horovod(tmp_path, "gloo", "hvd", 2, prepared_brats, *regions)
    assert "regions wt/tc/et" in log
    distributed = model_weights(ranks)
    assert any(v.ndim == 4 and v.shape[-1] == 3 for v in single.values())  # one output channel per region
    assert any(v.ndim == 4 and v.shape[-2] == 4 * (1 + 2 * context) for v in single.values())  # the input channels
    worst = max(float(np.abs(single[k] - distributed[k]).max()) for k in single)
    assert worst < 2e-5, f"2-rank region SGD diverged from 1-process SGD by {worst}"


def expected_auto_policy() -> str:
    """What train.precision=auto must pick on this machine (its CPU flags, oneDNN on, no ISA cap)."""
    from trainer.hardware.cpu import cpu_flags, native_bf16_support

    return "mixed_bfloat16" if native_bf16_support(cpu_flags(), True).native else "float32"


def test_two_ranks_train_at_the_automatic_precision_and_say_which(prepared_brats, tmp_path):
    """bf16 where the CPU has it (variables and gradients stay float32), fp32 elsewhere; logged."""
    run, log = horovod(tmp_path, "gloo", "auto", 2, prepared_brats, *SGD_EXACT, "--set", "train.precision=auto")
    policy = expected_auto_policy()
    assert f"precision: {policy} (auto:" in log and f"{policy}, regions wt" in log
    summary = json.loads((run / "summary.json").read_text())
    assert summary["precision"] == policy and summary["workers"] == 2
    weights = model_weights(run)
    assert all(v.dtype == np.float32 for v in weights.values())  # the variables stay float32


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step_with_a_clear_error(prepared_brats, tmp_path):
    """Only one rank reads the poisoned slice; both must stop at that step with the trainer's
    message (not a collective timeout), and no checkpoint may hold the diverged weights."""
    import h5py

    poisoned = Path(shutil.copytree(prepared_brats, tmp_path / "poisoned"))
    with h5py.File(poisoned / "slices-128.h5", "r+") as h5:
        h5["train"]["images"][0] = np.nan  # in the first global batch (no shuffling), on one rank's shard
    cmd = [HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo", *unet_train_cmd(
        "train", "--dist", "horovod", "--model", "2d", "--epochs", "2", "--batch-size", 2, "--run-dir",
        tmp_path / "runs", "--run-name", "nan", *data_flags(poisoned), *SGD_EXACT,
        "--set", "train.checkpoint_every_steps=1")]
    result = run_bounded(cmd, TIMEOUT, cwd=tmp_path)
    assert result.returncode != 0, result.stdout[-3000:]
    # Rank 0 read the NaN slice; ReLU hides it from the loss, not from the averaged gradient, so
    # both ranks hold NaN weights after step 1 and both say so, at that step.
    rank_lines = [line for line in result.stdout.splitlines() if "epoch 1, step 1: the weights are not finite" in line]
    assert {line[:3] for line in rank_lines} == {"[0]", "[1]"}, result.stdout[-4000:]
    assert not any("Traceback" in line for line in result.stdout.splitlines() if line.startswith(("[0]", "[1]")))
    assert not list((tmp_path / "runs" / "nan").rglob("*.index"))
