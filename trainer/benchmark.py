"""Built-in benchmark mode: training/inference throughput, latency percentiles, peak RSS, and
the input pipeline alone, after warm-up. Results are JSON; compare ratios within one run.
"""
from __future__ import annotations

import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from trainer.config.settings import Settings
from trainer.data.pipeline import Shard
from trainer.fsutil import write_json
from trainer.losses import make_loss
from trainer.models import build_model
from trainer.training.datasets import build_datasets
from trainer.training.run import make_optimizer


@dataclass(frozen=True)
class BenchmarkRequest:
    modes: tuple[str, ...] = ("train", "infer", "pipeline")
    batch_size: int = 32
    steps: int = 20
    warmup: int = 5


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def percentiles(seconds: list[float]) -> dict[str, float]:
    values = np.asarray(seconds) * 1000.0
    return {f"p{q}_ms": float(np.percentile(values, q)) for q in (50, 90, 99)}


def conv_flops(model: tf.keras.Model) -> float:
    """Forward multiply-adds x 2 of every convolution (the UNet's cost is all convolutions)."""
    total = 0.0
    for layer in model.layers:
        if isinstance(layer, (tf.keras.layers.Conv2D, tf.keras.layers.Conv3D)):
            kernel = np.prod(layer.kernel_size) * layer.input.shape[-1] * layer.filters
            if "Transpose" in type(layer).__name__:
                total += 2.0 * kernel * np.prod(layer.input.shape[1:-1])
            else:
                total += 2.0 * kernel * np.prod(layer.output.shape[1:-1])
    return float(total)


def _synthetic_batch(shape: tuple[int, ...], batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, *shape)).astype(np.float32)
    masks = (rng.random((batch, *shape[:-1], 1)) < 0.1).astype(np.float32)
    return images, masks


def run_benchmark(settings: Settings, request: BenchmarkRequest, out: Path | None = None) -> dict:
    data_cfg, train_cfg = settings.data, settings.train
    if train_cfg.model == "2d":
        shape = (data_cfg.image_size, data_cfg.image_size, len(data_cfg.channels))
    else:
        shape = (*data_cfg.crop_size, len(data_cfg.channels))
    model = build_model(train_cfg.model, settings.model, len(data_cfg.channels), data_cfg.image_size,
                        data_cfg.crop_size)
    model.compile(optimizer=make_optimizer(settings), loss=make_loss(train_cfg.loss))
    flops = conv_flops(model)
    result: dict = {"model": train_cfg.model, "input_shape": list(shape), "batch_size": request.batch_size,
                    "params": model.count_params(), "forward_gflop_per_image": flops / 1e9,
                    "warmup_steps": request.warmup, "timed_steps": request.steps,
                    "host": platform.node(), "tensorflow": tf.__version__}
    images, masks = _synthetic_batch(shape, request.batch_size)
    if "train" in request.modes:
        times = []
        for step in range(request.warmup + request.steps):
            start = time.perf_counter()
            model.train_on_batch(images, masks)
            if step >= request.warmup:
                times.append(time.perf_counter() - start)
        per_image = request.batch_size / float(np.median(times))
        result["train"] = {"images_per_sec": per_image, **percentiles(times),
                           # forward + backward ~ 3x forward FLOPs
                           "gflop_per_sec": per_image * 3 * flops / 1e9}
    if "infer" in request.modes:
        times = []
        for step in range(request.warmup + request.steps):
            start = time.perf_counter()
            model.predict_on_batch(images)
            if step >= request.warmup:
                times.append(time.perf_counter() - start)
        result["infer"] = {"images_per_sec": request.batch_size / float(np.median(times)), **percentiles(times)}
    if "pipeline" in request.modes:
        result["pipeline"] = _pipeline_throughput(settings, request)
    if "train" in result and "pipeline" in result:
        result["pipeline_to_train_ratio"] = result["pipeline"]["images_per_sec"] / result["train"]["images_per_sec"]
    result["peak_rss_mib"] = peak_rss_mib()
    if out is not None:
        write_json(out, result)
    return result


def _pipeline_throughput(settings: Settings, request: BenchmarkRequest) -> dict:
    """The real input pipeline alone (reading, normalised data, augmentation), no model."""
    tuned = settings.model_copy(update={"train": settings.train.model_copy(update={"batch_size": request.batch_size})})
    data = build_datasets(tuned, Shard())
    iterator = iter(data.train)
    for _ in range(request.warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(request.steps):
        next(iterator)
    seconds = time.perf_counter() - start
    return {"images_per_sec": request.batch_size * request.steps / seconds, "source": "real data files"}
