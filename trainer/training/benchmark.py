"""``unet-train benchmark``: the real training step, timed.

The same session, runtime, stepper and input streams as ``unet-train train`` (under
``horovodrun`` too), so the figures describe what training does:

* ``train``: steps over the real input pipeline; step-time percentiles, the share of each
  step spent waiting for input, per-rank and aggregate images/s, and GFLOP/s against the
  machine's nominal fp32 peak;
* ``train_in_memory``: the same step on one batch held in memory (the compute ceiling);
* ``infer``: forward passes on that batch;
* ``pipeline``: the input streams alone, without a model.

Results are JSON; compare ratios from one run, one configuration per process.
"""
from __future__ import annotations

import platform
import resource
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from trainer.config.settings import Settings
from trainer.data.streams import build_streams
from trainer.fsutil import write_json
from trainer.runtime.contract import Runtime
from trainer.hardware.cpu import nominal_peak
from trainer.training.session import open_session

MODES = ("train", "train_in_memory", "infer", "pipeline")


@dataclass(frozen=True)
class BenchmarkRequest:
    modes: tuple[str, ...] = MODES
    batch_size: int = 16  # per worker
    steps: int = 20
    warmup: int = 5
    # train mode, one process only: keep stepping past ``steps`` until this many timed seconds
    # (a calibration of a few seconds whatever the step costs; ranks would disagree on the count)
    min_seconds: float = 0.0
    max_steps: int = 200


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class AnonymousPeak:
    """Peak anonymous resident memory (RssAnon), sampled on a thread: what the kernel cannot
    reclaim. ru_maxrss also counts the file pages of the mmap'd 3D cache, which grow with every
    crop read (+600 MiB over 12 steps at 128^3) and are dropped under memory pressure."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s, self.peak_mib = interval_s, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="anon-peak", daemon=True)

    def __enter__(self) -> "AnonymousPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while True:
            now = anonymous_rss_mib()
            if now is None:
                return
            self.peak_mib = max(self.peak_mib or 0.0, now)
            if self._stop.wait(self.interval_s):
                return


def anonymous_rss_mib() -> float | None:
    """RssAnon of this process (Linux), or None where /proc does not say."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def percentiles(seconds: list[float]) -> dict[str, float]:
    values = np.asarray(seconds) * 1000.0
    return {f"p{q}_ms": float(np.percentile(values, q)) for q in (50, 90, 95, 99)}


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


def run_benchmark(settings: Settings, runtime: Runtime, request: BenchmarkRequest,
                  out: Path | None = None) -> dict | None:
    """Time the configured model on this runtime; the chief returns (and writes) the report."""
    with tempfile.TemporaryDirectory(prefix="unet-benchmark-") as scratch:
        # A throwaway run folder: the benchmark never resumes or writes a real run.
        settings = settings.model_copy(update={"train": settings.train.model_copy(update={
            "batch_size": request.batch_size, "run_dir": Path(scratch), "run_name": "benchmark"})})
        return _measure(settings, runtime, request, out)


def _measure(settings: Settings, runtime: Runtime, request: BenchmarkRequest, out: Path | None) -> dict | None:
    with AnonymousPeak() as anonymous:
        report = _measure_steps(settings, runtime, request)
    report["peak_rss_mib_per_worker"] = _per_worker(runtime, peak_rss_mib())
    report["peak_anon_mib_per_worker"] = _per_worker(runtime, anonymous.peak_mib or 0.0)
    if not runtime.is_chief:
        return None
    if out is not None:
        write_json(out, report)
    return report


def _measure_steps(settings: Settings, runtime: Runtime, request: BenchmarkRequest) -> dict:
    session = open_session(settings, runtime)
    global_batch = request.batch_size * runtime.size
    streams = build_streams(settings, runtime.data_shard, global_batch)
    stepper = runtime.make_stepper(session.model, session.optimizer, settings)
    flops = conv_flops(session.model)
    report: dict = {"model": settings.train.model, "dist": runtime.name, "workers": runtime.size,
                    "input_shape": list(streams.input_shape), "regions": list(streams.regions.names),
                    "batch_per_worker": request.batch_size, "global_batch": global_batch,
                    "precision": session.policy, "params": session.model.count_params(),
                    "forward_gflop_per_image": flops / 1e9, "warmup_steps": request.warmup,
                    "timed_steps": request.steps, "host": platform.node(), "tensorflow": tf.__version__,
                    "nominal_peak": nominal_peak()}
    batches = _batches(streams)
    try:
        _measure_modes(report, runtime, request, session, stepper, batches, global_batch, flops)
    finally:
        batches.close()  # stop the input threads now, not during interpreter shutdown (which can hang)
    return report


def _measure_modes(report: dict, runtime: Runtime, request: BenchmarkRequest, session, stepper, batches,
                   global_batch: int, flops: float) -> None:
    images, masks = next(batches)
    if "train" in request.modes:
        if request.min_seconds and runtime.size > 1:
            raise ValueError("min_seconds: one process only (every rank must run the same steps)")
        waits, steps = [], []
        index = 0
        while index < request.warmup + request.steps or (
                sum(steps) < request.min_seconds and len(steps) < request.max_steps):
            started = time.perf_counter()
            x, y = next(batches)
            fetched = time.perf_counter()
            stepper.train_step(x, y)
            if index >= request.warmup:
                waits.append(fetched - started)
                steps.append(time.perf_counter() - started)
            index += 1
        report["train"] = _train_row(runtime, steps, waits, request, global_batch, flops, report["nominal_peak"])
        report["train"]["source"] = "real input pipeline"
    if "train_in_memory" in request.modes:
        steps = _timed(lambda: stepper.train_step(images, masks), request)
        report["train_in_memory"] = _train_row(runtime, steps, [0.0] * len(steps), request, global_batch, flops,
                                               report["nominal_peak"])
        report["train_in_memory"]["source"] = "one batch held in memory"
    if "infer" in request.modes:
        seconds = _timed(lambda: session.model.predict_on_batch(images), request)
        report["infer"] = {"images_per_sec_per_worker": _per_worker(runtime, request.batch_size / np.median(seconds)),
                           **percentiles(seconds)}
    if "pipeline" in request.modes:
        seconds = _timed(lambda: next(batches), request)
        report["pipeline"] = {"images_per_sec_per_worker": _per_worker(runtime,
                                                                       request.batch_size / np.median(seconds)),
                              **percentiles(seconds), "source": "real data files, no model"}
    if "train" in report and "pipeline" in report:  # the chief's own input pipeline against its own step
        report["pipeline_to_train_ratio"] = (report["pipeline"]["images_per_sec_per_worker"][0]
                                             / report["train"]["images_per_sec_per_worker"][0])


def _batches(streams):
    """Training batches across epoch boundaries, as long as the benchmark asks."""
    epoch = 0
    while True:
        yield from streams.train(epoch)
        epoch += 1


def _timed(call, request: BenchmarkRequest) -> list[float]:
    seconds = []
    for index in range(request.warmup + request.steps):
        started = time.perf_counter()
        call()
        if index >= request.warmup:
            seconds.append(time.perf_counter() - started)
    return seconds


def _per_worker(runtime: Runtime, value: float) -> list[float]:
    """``value`` of every worker, in rank order (a one-hot sum over workers)."""
    slots = np.zeros(runtime.size if runtime.data_shard.size > 1 else 1)
    slots[runtime.data_shard.rank] = value
    return [float(v) for v in runtime.sum_over_workers(slots)]


def _train_row(runtime: Runtime, steps: list[float], waits: list[float], request: BenchmarkRequest,
               global_batch: int, flops: float, peak: dict) -> dict:
    median = float(np.median(steps))
    per_worker = _per_worker(runtime, request.batch_size / median)
    aggregate = global_batch / max(_per_worker(runtime, median))  # synchronous: the slowest rank sets the pace
    achieved = aggregate * 3 * flops / 1e9  # forward + backward ~ 3x forward FLOPs
    # The median step hides input stalls; an epoch lasts the sum of its steps (the chief's here).
    sustained = global_batch * len(steps) / max(float(np.sum(steps)), 1e-9)
    return {"images_per_sec": aggregate, "images_per_sec_per_worker": per_worker,
            "sustained_images_per_sec": sustained, "timed_steps": len(steps),
            "step_seconds": [round(float(t), 4) for t in steps], **percentiles(steps),
            "input_wait_share": float(np.sum(waits) / max(np.sum(steps), 1e-9)),
            "gflop_per_sec": achieved,
            "share_of_nominal_peak": achieved / peak["gflop_per_sec"] if peak["gflop_per_sec"] else None}
