"""Speed: a few calibrated steps on this node, and what N nodes would make of them.

Calibration runs the real training step (the runtime's stepper, the model in the run's
precision) on one random batch held in memory, a few times (3D crops above 64^3 at 64^3, scaled by
their voxels): the in-memory ceiling, which the
end-to-end rate matched within 5% on both models (docs/results.md). It runs in its own process
(``python -m trainer.planning.speed``) so its threads and memory are those of a training rank.

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


CALIBRATION_EDGE_3D = 64  # larger 3D crops are timed at 64^3 and scaled by their voxels: seconds, not minutes


def predict_speed(settings, batch: int, steps: int = 3) -> dict:
    """images/s of ``batch`` on this node: timed directly, or for a 3D crop larger than 64^3 timed at
    64^3 and scaled by the voxel ratio (the UNet's cost is its convolutions, linear in voxels)."""
    import math

    from trainer.config.settings import settings_to_yaml

    crop = tuple(settings.data.crop_size)
    factor = 1.0
    if settings.train.model == "3d" and math.prod(crop) > CALIBRATION_EDGE_3D ** 3:
        factor = math.prod(crop) / CALIBRATION_EDGE_3D ** 3
        settings = settings.model_copy(update={"data": settings.data.model_copy(
            update={"crop_size": (CALIBRATION_EDGE_3D,) * 3})})
    measured = calibrate(settings_to_yaml(settings), batch, steps)
    step = measured["step_s"] * factor
    return {**measured, "step_s": step, "images_per_sec": batch / step, "timed_at": list(settings.data.crop_size)
            if settings.train.model == "3d" else [settings.data.image_size] * 2, "scaled_by": factor}


def calibrate(settings_yaml: str, batch: int, steps: int = 3, warmup: int = 1, timeout_s: float = 900) -> dict:
    """images/s and the median step of ``batch`` on this node, measured in a fresh process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                                         os.environ.get("PYTHONPATH", "")])),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, "-m", "trainer.planning.speed", str(batch), str(steps), str(warmup)],
                            input=settings_yaml, capture_output=True, text=True, timeout=timeout_s, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"calibration failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _measure(settings_yaml: str, batch: int, steps: int, warmup: int) -> dict:
    """In this process: the settings' CPU plan, the model, ``warmup + steps`` training steps."""
    import tempfile

    import yaml

    from trainer.config.settings import Settings
    from trainer.hardware.cpu import apply_cpu_environment, configure_threads

    settings = Settings.model_validate(yaml.safe_load(settings_yaml))
    configure_threads(apply_cpu_environment(settings.cpu))
    import numpy as np
    import tensorflow as tf  # noqa: F401 - after the CPU environment

    from trainer.runtime.single import SingleRuntime
    from trainer.training.session import open_session

    with tempfile.TemporaryDirectory() as scratch:
        settings = settings.model_copy(update={"train": settings.train.model_copy(update={
            "batch_size": batch, "run_dir": Path(scratch), "run_name": "calibration"})})
        runtime = SingleRuntime()
        session = open_session(settings, runtime)
        stepper = runtime.make_stepper(session.model, session.optimizer, settings)
        shape = session.model.input_shape[1:]
        rng = np.random.default_rng(0)
        images = rng.normal(size=(batch, *shape)).astype(np.float32)
        masks = (rng.random((batch, *shape[:-1], len(settings.model.regions))) > 0.9).astype(np.float32)
        times = []
        for index in range(warmup + steps):
            started = time.perf_counter()
            stepper.train_step(images, masks)
            if index >= warmup:
                times.append(time.perf_counter() - started)
        step = float(np.median(times))
        return {"images_per_sec": batch / step, "step_s": step, "precision": session.policy,
                "params": int(session.model.count_params())}


if __name__ == "__main__":
    print(json.dumps(_measure(sys.stdin.read(), *(int(a) for a in sys.argv[1:4]))))
