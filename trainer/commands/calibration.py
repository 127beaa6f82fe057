"""The plan's speed calibration: a few steps on this node, timed.

Calibration is ``unet-train benchmark``'s train mode (the runtime's stepper, the model in the run's
precision, the real input pipeline) on a few cases of the dataset prepared into a scratch folder,
at the planned size, for a few seconds; its figure is the sustained rate (an epoch is the sum of
its steps, input stalls included). It runs in its own process (``python -m
trainer.commands.calibration``) so its threads and memory are those of a training rank. What N
nodes would make of it is ``trainer.planning.speed.project``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from trainer.config.kinds import kind_of
from trainer.config.settings import Settings, SplitSettings, settings_to_yaml
from trainer.errors import UserError
from trainer.hardware.cpu import apply_cpu_environment, configure_threads

CALIBRATION_CASES = 4      # prepared into a scratch folder: the real input pipeline, in seconds
CALIBRATION_SECONDS = 8.0  # timed steps run at least this long (and at least ``steps`` of them)
STEADY_STEPS_PER_EPOCH = 10_000  # no epoch boundary (a pipeline refill) inside a calibration


def predict_speed(settings, src: Path, batch: int, steps: int = 3) -> dict:
    """Sustained images/s of ``batch`` at the planned crop or slice size on this node: the real
    training step on the real input pipeline, over a few cases of ``src`` prepared as training
    would. Timed at the planned size itself: a bf16 step's cost is not linear in voxels (scaling
    64^3 by voxels gave 0.73x the measured rate at 128^3), and the pipeline's share shrinks as steps grow."""
    measured = calibrate(settings_to_yaml(settings), Path(src), batch, steps)
    size = list(kind_of(settings.train.model).spatial(settings))
    return {**measured, "timed_at": size}


def calibrate(settings_yaml: str, src: Path, batch: int, steps: int = 3, warmup: int = 1,
              timeout_s: float = 900) -> dict:
    """The calibration, in a fresh process: its threads and memory are those of a training rank."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                                         os.environ.get("PYTHONPATH", "")])),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, "-m", "trainer.commands.calibration", str(Path(src).resolve()), str(batch), str(steps),
               str(warmup)]
    result = subprocess.run(command, input=settings_yaml, capture_output=True, text=True, timeout=timeout_s, env=env)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserError(f"plan: the speed calibration on {src} failed ({last}); --no-calibrate skips it")
    return json.loads(result.stdout.strip().splitlines()[-1])


def sample_settings(settings, src: Path, scratch: Path):
    """The first CALIBRATION_CASES cases of ``src`` prepared for the settings' model as a dataset
    folder in ``scratch`` (slices, or volumes with a cache when the settings use one); the settings
    pointed at it."""
    from trainer.data.datasets import RawDataset
    from trainer.data.prepare import prepare_into

    dataset = RawDataset.open(src, settings.data.max_voxels)
    sample = dataclasses.replace(dataset, cases=dataset.cases[:CALIBRATION_CASES])
    split = SplitSettings(val_fraction=0.25 if len(sample.cases) > 1 else 0.0, test_fraction=0.0, seed=0)
    data = settings.data.model_copy(update={"split": split, "dataset": scratch / "dataset", "source": None})
    prepare_into(sample, scratch / "dataset", settings.train.model, data, workers=1, progress=False)
    # Steady state: a few cases would end an epoch every few steps, and each epoch start waits for
    # its pipeline to fill (a 4.3 s step against 1.9 s at 144^3): a real epoch has hundreds of steps.
    return settings.model_copy(update={"data": data, "train": settings.train.model_copy(
        update={"steps_per_epoch": STEADY_STEPS_PER_EPOCH})})


def _measure(settings_yaml: str, src: Path, batch: int, steps: int, warmup: int) -> dict:
    """In this process: the settings' CPU plan, a prepared sample, the benchmark's train mode."""
    settings = Settings.model_validate(yaml.safe_load(settings_yaml))
    configure_threads(apply_cpu_environment(settings.cpu))
    import tensorflow as tf  # noqa: F401 - after the CPU environment

    from trainer.runtime.single import SingleRuntime  # these load TensorFlow: after the CPU environment too
    from trainer.training.benchmark import BenchmarkRequest, run_benchmark

    with tempfile.TemporaryDirectory(prefix="unet-calibration-") as scratch:
        settings = sample_settings(settings, src, Path(scratch))
        started = time.perf_counter()
        report = run_benchmark(settings, SingleRuntime(), BenchmarkRequest(
            modes=("train",), batch_size=batch, steps=steps, warmup=warmup, min_seconds=CALIBRATION_SECONDS))
    train = report["train"]
    rate = train["sustained_images_per_sec"]
    return {"images_per_sec": rate, "step_s": batch / rate, "median_step_s": train["p50_ms"] / 1000,
            "input_wait_share": train["input_wait_share"], "timed_steps": train["timed_steps"],
            "seconds": time.perf_counter() - started, "precision": report["precision"], "params": int(report["params"])}


if __name__ == "__main__":
    print(json.dumps(_measure(sys.stdin.read(), Path(sys.argv[1]), *(int(a) for a in sys.argv[2:5]))))
