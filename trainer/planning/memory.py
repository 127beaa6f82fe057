"""Peak memory of a training process, predicted before anything is allocated.

    peak = base + 16 x params + k x activations + pipeline

The peak is anonymous resident memory (RssAnon): file pages (TensorFlow's libraries, the mmap'd
3D cache) are page cache the kernel reclaims, and the margin covers the libraries.

* ``base``: the interpreter, TensorFlow, oneDNN and the input pipeline's fixed cost (measured);
* 16 bytes a parameter: float32 weights, gradients and Adam's two slots;
* activations: every layer output of one forward pass (counted exactly from the UNet's
  definition, :func:`unet_tensors`), in the compute dtype (bf16: 2 bytes, fp32: 4), times the
  batch; ``k`` (fitted) covers what backpropagation keeps and oneDNN's workspaces;
* pipeline: the prefetched batches (float32 images and masks).

The constants come from ``benchmarks/plan_accuracy.py --fit`` (measured peaks of real training
steps); the same script checks the prediction against configurations it was not fitted on.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from trainer.config.settings import ModelSettings, Settings
from trainer.config.kinds import kind_of
from trainer.errors import UserError

LEVELS = 4  # as trainer.models.unet
PREFETCHED_BATCHES = 4  # tf.data AUTOTUNE holds a few batches ahead of the step
# Fitted by benchmarks/plan_accuracy.py --fit (see docs/planning.md): MiB, and multipliers of the
# activation bytes, per model kind and compute precision.
# Fitted on 2D 128^2 b4/b32 and 3D 48^3 b2, 96^3 b1, 112^3 b2, fp32 and bf16 (benchmarks/results/plan_fit.json,
# Xeon with AMX, oneDNN on); checked on other configurations by plan_accuracy.py (docs/results.md).
BASE_MIB = {"2d": 356.3, "3d": 443.6}
ACTIVATION_FACTOR = {("2d", "fp32"): 0.903, ("2d", "bf16"): 1.136, ("3d", "fp32"): 0.888, ("3d", "bf16"): 1.42}
MARGIN = 0.10  # of the available memory, kept free for the OS, page cache and estimate error


@dataclass(frozen=True)
class ModelShape:
    """What sizes a training step: the model kind, its spatial input and the batch."""

    kind: str                      # 2d | 3d
    spatial: tuple[int, ...]       # (S, S) or (X, Y, Z)
    channels: int
    outputs: int
    batch: int
    model: ModelSettings
    precision: str                 # fp32 | bf16 (fp16 counts as bf16: 2 bytes)

    @classmethod
    def from_settings(cls, settings: Settings, precision: str, batch: int | None = None) -> "ModelShape":
        kind = kind_of(settings.train.model)
        return cls(kind.name, kind.spatial(settings), kind.input_channels(settings), len(settings.model.regions),
                   batch or settings.train.batch_size, settings.model, "fp32" if precision == "fp32" else "bf16")

    @staticmethod
    def input_channels(settings: Settings, kind: str) -> int:
        """Modalities x planes: a 2D model with context sees 2k + 1 slices of each."""
        return kind_of(kind).input_channels(settings)

    def describe(self) -> str:
        return f"{self.kind.upper()} {kind_of(self.kind).describe_size(self.spatial)} batch {self.batch} {self.precision}"


def unet_tensors(shape: ModelShape) -> tuple[int, int]:
    """(activation elements of one sample's forward pass, parameters) of the UNet in
    trainer.models.unet, counted from its definition (a test checks both against Keras)."""
    dims, model = len(shape.spatial), shape.model
    base, norm = kind_of(shape.kind).base_filters(model), kind_of(shape.kind).norm(model)
    kernel = 3 ** dims
    voxels = [math.prod(edge // 2 ** level for edge in shape.spatial) for level in range(LEVELS + 1)]
    per_conv_outputs = 3 if norm != "none" else 2  # conv, norm, relu
    norm_params = {"batch": 4, "instance": 2, "none": 0}[norm]
    elements = shape.channels * voxels[0]  # the input
    params = 0

    def block(cin: int, filters: int, level: int, drop: bool) -> None:
        nonlocal elements, params
        for conv_in in (cin, filters):
            params += kernel * conv_in * filters + (filters if norm == "none" else 0) + norm_params * filters
        elements += 2 * per_conv_outputs * filters * voxels[level]
        if drop and model.dropout > 0:
            elements += filters * voxels[level]

    cin = shape.channels
    for level in range(LEVELS):
        filters = base * 2 ** level
        block(cin, filters, level, drop=level == LEVELS - 1)
        elements += filters * voxels[level + 1]  # pool
        cin = filters
    block(cin, base * 2 ** LEVELS, LEVELS, drop=True)
    below = base * 2 ** LEVELS
    for level in reversed(range(LEVELS)):
        filters = base * 2 ** level
        if model.upsampling == "transposed":
            params += 2 ** dims * below * filters + filters
            up = filters
        else:
            up = below
        elements += up * voxels[level] + (up + filters) * voxels[level]  # up, concat
        block(up + filters, filters, level, drop=False)
        below = filters
    params += below * shape.outputs + shape.outputs
    elements += shape.outputs * voxels[0]
    return elements, params


@dataclass(frozen=True)
class MemoryEstimate:
    base_mib: float
    parameters_mib: float
    activations_mib: float
    pipeline_mib: float

    @property
    def total_mib(self) -> float:
        return self.base_mib + self.parameters_mib + self.activations_mib + self.pipeline_mib

    def as_dict(self) -> dict:
        return {**self.__dict__, "total_mib": self.total_mib}


def predict_peak(shape: ModelShape) -> MemoryEstimate:
    elements, params = unet_tensors(shape)
    dtype_bytes = 4 if shape.precision == "fp32" else 2
    sample_bytes = 4 * math.prod(shape.spatial) * (shape.channels + shape.outputs)
    return MemoryEstimate(
        base_mib=BASE_MIB[shape.kind],
        parameters_mib=16 * params / 2 ** 20,
        activations_mib=ACTIVATION_FACTOR[(shape.kind, shape.precision)] * elements * dtype_bytes * shape.batch / 2 ** 20,
        pipeline_mib=PREFETCHED_BATCHES * sample_bytes * shape.batch / 2 ** 20)


# ---------------------------------------------------------------- what is available

@dataclass(frozen=True)
class Available:
    mib: float
    source: str


def available_memory(limit_gb: float = 0.0, env: dict | None = None, meminfo: str | None = None,
                     cgroup_root: Path = Path("/sys/fs/cgroup")) -> Available:
    """Memory this process may grow to: cpu.memory_limit_gb or UNET_TRAIN_MEMORY_LIMIT_GB when set,
    else the smaller of MemAvailable and the cgroup's limit less its usage (plus what this process
    already holds: it is part of the predicted peak)."""
    env = os.environ if env is None else env
    if limit_gb > 0:
        return Available(limit_gb * 1024, f"cpu.memory_limit_gb = {limit_gb:g}")
    if env.get("UNET_TRAIN_MEMORY_LIMIT_GB"):
        try:
            value = float(env["UNET_TRAIN_MEMORY_LIMIT_GB"])
        except ValueError:
            raise UserError(f"UNET_TRAIN_MEMORY_LIMIT_GB={env['UNET_TRAIN_MEMORY_LIMIT_GB']!r}: expected a number "
                            f"of GB") from None
        return Available(value * 1024, f"UNET_TRAIN_MEMORY_LIMIT_GB = {value:g}")
    own = _own_rss_mib()
    text = meminfo if meminfo is not None else _read("/proc/meminfo")
    found = re.search(r"^MemAvailable:\s+(\d+) kB", text or "", re.M)
    candidates = []
    if found:
        candidates.append((int(found.group(1)) / 1024 + own, "MemAvailable"))
    limit, usage = _read(cgroup_root / "memory.max"), _read(cgroup_root / "memory.current")
    if limit and limit.strip().isdigit() and usage and usage.strip().isdigit():
        candidates.append(((int(limit) - int(usage)) / 2 ** 20 + own, "cgroup memory.max - memory.current"))
    if not candidates:
        return Available(float("inf"), "unknown (no /proc/meminfo)")
    mib, source = min(candidates)
    return Available(mib, source)


def _read(path) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _own_rss_mib() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2 ** 20
    except Exception:  # noqa: BLE001 - an estimate: without psutil, assume nothing held yet
        return 0.0


# ---------------------------------------------------------------- the check

def largest_that_fits(shape: ModelShape, budget_mib: float, ranks: int = 1) -> ModelShape | None:
    """The same model with the largest batch (then, in 3D, the largest crop) whose predicted
    peak fits ``budget_mib`` for ``ranks`` processes, or None."""
    batches = range(shape.batch, 0, -1)
    edges = [shape.spatial] if kind_of(shape.kind).slices else [
        tuple(min(e, edge) for e in shape.spatial) for edge in range(max(shape.spatial), 15, -16)]
    for spatial in edges:
        for batch in batches:
            candidate = ModelShape(shape.kind, spatial, shape.channels, shape.outputs, batch, shape.model,
                                   shape.precision)
            if ranks * predict_peak(candidate).total_mib <= budget_mib:
                return candidate
    return None


def check_fits(settings: Settings, precision: str, ranks: int = 1, available: Available | None = None) -> MemoryEstimate:
    """Refuse, in one line and before the model is built, a configuration whose predicted peak
    exceeds the memory available less the margin; returns the estimate when it fits."""
    shape = ModelShape.from_settings(settings, precision)
    estimate = predict_peak(shape)
    available = available or available_memory(settings.cpu.memory_limit_gb)
    budget = available.mib * (1 - MARGIN)
    if ranks * estimate.total_mib <= budget:
        return estimate
    fits = largest_that_fits(shape, budget, ranks)
    if fits is None:
        hint = "nothing of this model fits: lower the base filters, or use a larger node"
    else:
        keys = ([f"train.batch_size={fits.batch}"] if fits.batch != shape.batch else []) + \
            ([f"data.crop_size=[{','.join(map(str, fits.spatial))}]"] if fits.spatial != shape.spatial else [])
        hint = f"the largest that fits: {fits.describe()} ({ranks * predict_peak(fits).total_mib / 1024:.1f} GB; " \
               f"--set {' --set '.join(keys)})"
    per_rank = f" for {ranks} ranks" if ranks > 1 else ""
    raise UserError(f"memory: {shape.describe()} needs about {ranks * estimate.total_mib / 1024:.1f} GB{per_rank} "
                    f"(predicted peak), more than the {budget / 1024:.1f} GB available ({available.source}: "
                    f"{available.mib / 1024:.1f} GB less a {MARGIN:.0%} margin); {hint}; or run unet-train plan")
