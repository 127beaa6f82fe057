"""Speed: a few calibrated steps on this node, and what N nodes would make of them.

Calibration is ``unet-train benchmark``'s train mode (the runtime's stepper, the model in the run's
precision, the real input pipeline) on a few cases of the dataset prepared into a scratch folder,
at the planned size, for a few seconds; its figure is the sustained rate (an epoch is the sum of
its steps, input stalls included). It runs in its own process (``python -m
trainer.planning.speed``) so its threads and memory are those of a training rank.

The multi-node projection (docs/planning.md) adds communication to the calibrated compute:

* Horovod ring allreduce of the float32 gradients G over N ranks:
  t = 2 (N - 1) alpha + 2 (N - 1) / N x G x (beta + 8 / B)
* parameter servers (P of them, W workers): every worker pushes G and pulls the weights, through
  the servers' links: t = 2 alpha + 2 W G / P x (beta + 8 / B)

alpha (per message) and beta (per byte: copying and reducing) come from a Horovod allreduce timed
on loopback at 2 and 4 ranks (benchmarks/allreduce_time.py); B is the network's bits per second.
Communication is not overlapped with compute here, so the projection errs on the slow side.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Fitted by benchmarks/network_constants.py (a Horovod/Gloo allreduce of the UNets' gradients on
# loopback at 2 and 4 ranks, 2-core Xeon: 4 ranks oversubscribe it, so alpha errs high); docs/planning.md.
ALPHA_S = 0.00641          # seconds per ring message
BETA_S_PER_BYTE = 1.05e-09  # seconds per byte copied and reduced


@dataclass(frozen=True)
class Projection:
    nodes: int
    step_s: float
    images_per_sec: float
    efficiency: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def project(compute_step_s: float, global_batch_per_node: int, params: int, nodes: int, ranks_per_node: int,
            network_gbps: float, mode: str, ps: int = 1) -> Projection:
    """Step time and scaling efficiency of synchronous SGD on ``nodes`` nodes."""
    gradient_bytes = 4.0 * params
    per_byte = BETA_S_PER_BYTE + 8.0 / (network_gbps * 1e9)
    ranks = nodes * ranks_per_node
    if ranks == 1:
        communication = 0.0
    elif mode == "horovod":
        communication = 2 * (ranks - 1) * ALPHA_S + 2 * (ranks - 1) / ranks * gradient_bytes * per_byte
    else:
        communication = 2 * ALPHA_S + 2 * ranks * gradient_bytes / ps * per_byte
    step = compute_step_s + communication
    images = nodes * global_batch_per_node / step
    return Projection(nodes, step, images, compute_step_s / step)


CALIBRATION_CASES = 4      # prepared into a scratch folder: the real input pipeline, in seconds
CALIBRATION_SECONDS = 8.0  # timed steps run at least this long (and at least ``steps`` of them)
STEADY_STEPS_PER_EPOCH = 10_000  # no epoch boundary (a pipeline refill) inside a calibration


def predict_speed(settings, src: Path, batch: int, steps: int = 3) -> dict:
    """Sustained images/s of ``batch`` at the planned crop or slice size on this node: the real
    training step on the real input pipeline, over a few cases of ``src`` prepared as training
    would. Timed at the planned size itself: a bf16 step's cost is not linear in voxels (scaling
    64^3 by voxels gave 0.73x the measured rate at 128^3), and the pipeline's share shrinks as steps grow."""
    from trainer.config.settings import settings_to_yaml

    measured = calibrate(settings_to_yaml(settings), Path(src), batch, steps)
    size = list(settings.data.crop_size) if settings.train.model == "3d" else [settings.data.image_size] * 2
    return {**measured, "timed_at": size}


def calibrate(settings_yaml: str, src: Path, batch: int, steps: int = 3, warmup: int = 1,
              timeout_s: float = 900) -> dict:
    """The calibration, in a fresh process: its threads and memory are those of a training rank."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                                         os.environ.get("PYTHONPATH", "")])),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, "-m", "trainer.planning.speed", str(Path(src).resolve()), str(batch), str(steps),
               str(warmup)]
    result = subprocess.run(command, input=settings_yaml, capture_output=True, text=True, timeout=timeout_s, env=env)
    if result.returncode != 0:
        from trainer.errors import UserError

        last = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserError(f"plan: the speed calibration on {src} failed ({last}); --no-calibrate skips it")
    return json.loads(result.stdout.strip().splitlines()[-1])


def sample_settings(settings, src: Path, scratch: Path):
    """The first CALIBRATION_CASES cases of ``src`` prepared for the settings' model in ``scratch``
    (slices, or volumes with a cache when the settings use one); the settings pointed at them."""
    import dataclasses

    from trainer.config.settings import SplitSettings
    from trainer.data.datasets import PREPARED, RawDataset
    from trainer.data.prepare import prepare_dataset

    dataset = RawDataset.open(src, settings.data.max_voxels)
    sample = dataclasses.replace(dataset, cases=dataset.cases[:CALIBRATION_CASES])
    split = SplitSettings(val_fraction=0.25 if len(sample.cases) > 1 else 0.0, test_fraction=0.0, seed=0)
    prepared = PREPARED[settings.train.model]
    data = {prepared.raw_field: Path(src), "split": split}
    if prepared.kind == "slices":
        data["slices_h5"] = scratch / "slices.h5"
    else:
        data["decathlon_split"] = scratch / "volumes.split.json"
        data["cache_dir"] = scratch / "cache" if settings.data.cache_dir is not None else None
    prepare_dataset(sample, settings.train.model, settings.data.model_copy(update=data), workers=1, progress=False)
    # Steady state: a few cases would end an epoch every few steps, and each epoch start waits for
    # its pipeline to fill (a 4.3 s step against 1.9 s at 144^3): a real epoch has hundreds of steps.
    return settings.model_copy(update={"data": settings.data.model_copy(update=data), "train": settings.train.model_copy(
        update={"steps_per_epoch": STEADY_STEPS_PER_EPOCH})})


def _measure(settings_yaml: str, src: Path, batch: int, steps: int, warmup: int) -> dict:
    """In this process: the settings' CPU plan, a prepared sample, the benchmark's train mode."""
    import tempfile

    import yaml

    from trainer.config.settings import Settings
    from trainer.hardware.cpu import apply_cpu_environment, configure_threads

    settings = Settings.model_validate(yaml.safe_load(settings_yaml))
    configure_threads(apply_cpu_environment(settings.cpu))
    import tensorflow as tf  # noqa: F401 - after the CPU environment

    from trainer.runtime.single import SingleRuntime
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
