"""Inference engines: a float32 batch (N, ..., C) in, float32 probabilities (N, ..., K) out.

Two engines compute the same function: ``tf`` runs the Keras model (float32 or mixed
bfloat16), ``openvino`` runs an OpenVINO-compiled copy of it (the exported IR, or converted in
memory from the Keras model). Callers (the predictor, export, benchmarks) never ask which one
they hold. ``auto`` follows a measured rule, not a per-run timing race (the machine drifts too
much for a short race to be repeatable): OpenVINO when it is installed and TensorFlow sees no
GPU, since on CPUs it matched TensorFlow in float32 and beat it in bfloat16
(benchmarks/inference_engines.py; figures in the README).
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from trainer.config.settings import Settings
from trainer.errors import ConfigError, DataError, UserError
from trainer.hardware.cpu import cpu_flags, local_ranks_from_environment, plan_threads
from trainer.hardware.precision import Hardware, resolve_precision

log = logging.getLogger(__name__)

ENGINES = ("auto", "tf", "openvino")
INFERENCE_PRECISIONS = ("auto", "fp32", "bf16")
OPENVINO_REQUIREMENT = "openvino==2026.4.1"  # the pin in requirements.txt
OPENVINO_HINTS = {"fp32": "f32", "bf16": "bf16"}  # our precision -> OpenVINO's INFERENCE_PRECISION_HINT


class Engine(Protocol):
    name: str
    precision: str  # what it computes in: fp32 | bf16 | fp16 | "OpenVINO default (...)"
    source: str  # the checkpoint or IR it runs

    @property
    def input_shape(self) -> tuple[int | None, ...]:
        """Per-sample input shape, (..., C); None where any size is accepted."""

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, ..., C) float32 -> (N, ..., K) float32 probabilities."""


def describe(engine: Engine) -> str:
    return f"{engine.name} ({engine.precision}) on {engine.source}"


def check_batch(batch: np.ndarray, expected: Sequence[int | None], source: str) -> np.ndarray:
    """The batch as float32, or a one-line error naming both shapes."""
    batch = np.asarray(batch, dtype=np.float32)
    if batch.ndim != len(expected) + 1 or any(want is not None and want != got
                                              for want, got in zip(expected, batch.shape[1:])):
        shown = ", ".join("?" if e is None else str(e) for e in expected)
        raise DataError(f"{source}: input batch of shape {list(batch.shape)} does not match the model's "
                        f"input [N, {shown}]")
    return batch


# ---------------------------------------------------------------- TensorFlow

@dataclass
class TfEngine:
    model: object  # tf.keras.Model
    precision: str
    source: str
    name: str = "tf"

    @property
    def input_shape(self) -> tuple[int | None, ...]:
        return tuple(self.model.input_shape[1:])

    def predict(self, batch: np.ndarray) -> np.ndarray:
        batch = check_batch(batch, self.input_shape, self.source)
        return np.asarray(self.model.predict_on_batch(batch), dtype=np.float32)


def build_run_model(settings: Settings, precision: str = "fp32", which: str = "best"):
    """The run's Keras model with its checkpointed weights, built under ``precision``'s policy
    (variables stay float32 in mixed policies, so the float32 checkpoint restores as is)."""
    import tensorflow as tf

    from trainer.models import build_model
    from trainer.hardware.precision import KERAS_POLICIES
    from trainer.runtime.checkpoints import restore_weights

    data = settings.data
    previous = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy(KERAS_POLICIES[precision])
    try:
        model = build_model(settings.train.model, settings.model, len(data.channels), data.image_size,
                            data.crop_size)
    finally:
        tf.keras.mixed_precision.set_global_policy(previous)
    return model, restore_weights(model, settings.run_path, which)


# ---------------------------------------------------------------- OpenVINO

class OpenVinoUnavailable(UserError):
    """OpenVINO was asked for but cannot be imported."""


def import_openvino():
    """``openvino``, with its usage telemetry blocked for this process.

    OpenVINO's converter reports usage to Google Analytics unless a consent file in the
    home folder says no; this project never sends anything off the machine, so the
    telemetry package is made unimportable and OpenVINO falls back to its no-op stub.
    """
    sys.modules.setdefault("openvino_telemetry", None)
    try:
        import openvino
    except ImportError as exc:
        raise OpenVinoUnavailable(f"OpenVINO is not installed ({exc}); install it with "
                                  f".venv/bin/pip install {OPENVINO_REQUIREMENT} (pinned in requirements.txt) "
                                  f"or use --engine tf") from None
    return openvino


def openvino_available() -> bool:
    try:
        import_openvino()
    except OpenVinoUnavailable:
        return False
    return True


@dataclass
class OpenVinoEngine:
    compiled: object  # openvino.CompiledModel
    precision: str
    source: str
    name: str = "openvino"

    def __post_init__(self) -> None:
        self._request = self.compiled.create_infer_request()

    @classmethod
    def compile(cls, model, hint: str | None, threads: int | None, source: str) -> "OpenVinoEngine":
        """Compile an ``openvino.Model`` for the CPU; ``hint`` None keeps OpenVINO's default precision."""
        ov = import_openvino()
        core = ov.Core()
        config = {"PERFORMANCE_HINT": "LATENCY"}  # one stream: the whole batch on all our threads
        if hint is not None:
            config["INFERENCE_PRECISION_HINT"] = hint
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        compiled = core.compile_model(model, "CPU", config)
        actual = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # f32 | bf16 | f16
        precision = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(actual, actual)
        return cls(compiled, precision if hint else f"OpenVINO default: {precision}", source)

    @property
    def input_shape(self) -> tuple[int | None, ...]:
        return partial_shape(self.compiled.input(0).get_partial_shape())[1:]

    def predict(self, batch: np.ndarray) -> np.ndarray:
        batch = check_batch(batch, self.input_shape, self.source)
        result = self._request.infer({0: batch})
        return np.array(result[self.compiled.output(0)], dtype=np.float32, copy=True)


def partial_shape(shape) -> tuple[int | None, ...]:
    return tuple(None if dim.is_dynamic else dim.get_length() for dim in shape)


def convert_keras(model):
    """The Keras model as an ``openvino.Model`` (in memory; float32 weights)."""
    return import_openvino().convert_model(model)


def read_ir(path: Path, expected: Sequence[int | None]):
    """An exported IR, checked to take the per-sample input shape the settings describe."""
    ov = import_openvino()
    path = Path(path)
    if path.suffix != ".xml":
        raise DataError(f"{path}: expected an OpenVINO IR .xml file (from unet-train export --format openvino)")
    if not path.is_file() or not path.with_suffix(".bin").is_file():
        missing = path if not path.is_file() else path.with_suffix(".bin")
        raise DataError(f"{missing}: OpenVINO IR not found (export one with: unet-train export --format openvino)")
    from trainer.fsutil import check_regular

    check_regular(path, str(path), 256 << 20)  # the graph's XML: read whole by OpenVINO
    check_regular(path.with_suffix(".bin"), str(path.with_suffix(".bin")), 64 << 30)  # the weights
    try:
        model = ov.Core().read_model(str(path))
    except RuntimeError as exc:
        raise DataError(f"{path}: not a readable OpenVINO IR ({' '.join(str(exc).split())[:200]})") from None
    actual = partial_shape(model.input(0).get_partial_shape())[1:]
    if len(actual) != len(expected) or any(a is not None and e is not None and a != e
                                           for a, e in zip(actual, expected)):
        show = lambda s: "[N, " + ", ".join("?" if d is None else str(d) for d in s) + "]"  # noqa: E731
        raise DataError(f"{path}: model input {show(actual)} does not match the settings' {show(expected)} "
                        f"(train.model, data.image_size/crop_size, data.channels)")
    return model


# ---------------------------------------------------------------- choosing and opening an engine

@dataclass(frozen=True)
class EngineRequest:
    engine: str = "auto"  # auto | tf | openvino
    precision: str = "auto"  # auto | fp32 | bf16
    ir: Path | None = None  # run this exported IR instead of the checkpoint (openvino)


def select_engine(requested: str, have_openvino: bool, gpu: bool, ir: Path | None = None) -> tuple[str, str]:
    """(engine, reason) for a request; the rule of this module's docstring."""
    if requested not in ENGINES:
        raise ConfigError(f"--engine: expected one of {', '.join(ENGINES)}, got {requested!r}")
    if ir is not None and requested == "tf":
        raise ConfigError(f"--ir {ir}: an OpenVINO IR runs on --engine openvino (or auto), not tf")
    if requested == "openvino" or ir is not None:
        if not have_openvino:
            import_openvino()  # raises the one-line "not installed" error
        return "openvino", "requested" if requested == "openvino" else "--ir given"
    if requested == "tf":
        return "tf", "requested"
    if gpu:
        return "tf", "auto: TensorFlow sees a GPU (OpenVINO here runs on the CPU)"
    if have_openvino:
        return "openvino", "auto: OpenVINO installed, CPU only"
    return "tf", "auto: OpenVINO not installed"


def expected_input_shape(settings: Settings) -> tuple[int, ...]:
    from trainer.models.unet import input_shape

    data = settings.data
    return input_shape(settings.train.model, settings.model, len(data.channels), data.image_size, data.crop_size)


def ir_checkpoint(ir: Path) -> str:
    """The checkpoint an exported IR was made from (its export.json says), so that the run's
    post-processing decided for that checkpoint applies to the IR too; the IR path if unknown."""
    from trainer.fsutil import read_regular_json

    path = Path(ir).parent / "export.json"
    try:
        return str(read_regular_json(path, str(path), 1 << 20)["checkpoint"])
    except (OSError, ValueError, KeyError, TypeError):
        return str(ir)


def open_engine(settings: Settings, request: EngineRequest = EngineRequest(),
                which: str = "best") -> tuple[Engine, str]:
    """The engine a request asks for, ready to run; returns (engine, the checkpoint or IR it runs)."""
    import tensorflow as tf

    gpu = bool(tf.config.list_physical_devices("GPU"))
    name, why = select_engine(request.engine, request.engine == "tf" or openvino_available(), gpu, request.ir)
    if request.precision not in INFERENCE_PRECISIONS:
        raise ConfigError(f"--precision: expected one of {', '.join(INFERENCE_PRECISIONS)}, got {request.precision!r}")
    # OpenVINO computes on the CPU, so its precision follows the CPU rule even on a GPU host.
    hardware = Hardware(gpu=gpu and name == "tf", cpu_flags=cpu_flags(), onednn=settings.cpu.onednn)
    precision = resolve_precision(request.precision, settings.cpu.onednn, key="--precision", hardware=hardware,
                                  label="inference precision").name
    if name == "tf":
        model, checkpoint = build_run_model(settings, precision, which)
        engine: Engine = TfEngine(model, precision, checkpoint)
    else:
        threads = plan_threads(settings.cpu, local_ranks_from_environment()).intra_op
        if request.ir is not None:
            checkpoint, source = ir_checkpoint(request.ir), str(request.ir)
            ov_model = read_ir(request.ir, expected_input_shape(settings))
        else:
            model, checkpoint = build_run_model(settings, "fp32", which)
            ov_model, source = convert_keras(model), checkpoint
        engine = OpenVinoEngine.compile(ov_model, OPENVINO_HINTS[precision], threads, source)
    log.info("inference engine: %s (%s)", describe(engine), why)
    return engine, checkpoint
