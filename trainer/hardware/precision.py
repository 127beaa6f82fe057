"""Numeric precision policy: which Keras mixed-precision policy a process runs under, and why.

``auto`` takes the fast path the hardware really has: mixed float16 on GPUs, mixed bfloat16 on
CPUs whose bf16 arithmetic oneDNN can use, float32 elsewhere. Explicit requests that the
hardware would only emulate are refused (seen on an AVX2-only EPYC: mixed_bfloat16 ~18x slower
than float32, mixed_float16 slower still; and on a bf16 CPU under ONEDNN_MAX_CPU_ISA=AVX2, TF 2.15's
mixed_bfloat16 step fails outright: "could not create a primitive descriptor for a convolution
forward propagation primitive", because TF checks CPUID, not oneDNN's cap). Variables and
gradients stay float32 in every policy.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Mapping

from trainer.errors import ConfigError
from trainer.hardware.cpu import cpu_flags, native_bf16_support

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16", "fp16"]
KERAS_POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


@dataclass(frozen=True)
class Hardware:
    """What the precision choice depends on; tests build it directly instead of probing."""

    gpu: bool
    cpu_flags: frozenset[str]
    onednn: bool
    env: Mapping[str, str] | None = None  # None: this process's environment

    @classmethod
    def probe(cls, onednn: bool) -> "Hardware":
        import tensorflow as tf

        return cls(bool(tf.config.list_physical_devices("GPU")), cpu_flags(), onednn)


@dataclass(frozen=True)
class PrecisionChoice:
    name: str  # fp32 | bf16 | fp16
    reason: str

    @property
    def policy(self) -> str:
        return KERAS_POLICIES[self.name]

    def describe(self) -> str:
        return f"precision: {self.policy} ({self.reason})"


def choose_precision(requested: str, hardware: Hardware, key: str = "train.precision") -> PrecisionChoice:
    """The precision to run at; raises ConfigError (naming ``key``) for a request the hardware would emulate."""
    if requested == "fp32":
        return PrecisionChoice("fp32", "requested")
    if hardware.gpu:
        if requested == "auto":
            return PrecisionChoice("fp16", "auto: GPU present")
        return PrecisionChoice(requested, "requested, GPU present")
    bf16 = native_bf16_support(hardware.cpu_flags, hardware.onednn, hardware.env)
    if requested == "auto":
        return PrecisionChoice("bf16", f"auto: {bf16.reason}") if bf16.native else \
            PrecisionChoice("fp32", f"auto: no native bf16: {bf16.reason}")
    if requested == "bf16":
        if bf16.native:
            return PrecisionChoice("bf16", f"requested, {bf16.reason}")
        raise ConfigError(f"{key}=bf16 refused: {bf16.reason}; bfloat16 would be emulated (~18x slower "
                          f"than fp32) or fail in oneDNN's convolutions. Use {key}=auto or fp32")
    if requested == "fp16":
        raise ConfigError(f"{key}=fp16 refused: no GPU; CPUs emulate float16 (slower than fp32). "
                          f"Use {key}=auto, bf16 or fp32")
    raise ConfigError(f"{key}: expected auto, fp32, bf16 or fp16, got {requested!r}")


def resolve_precision(requested: str, onednn: bool, key: str = "train.precision",
                      hardware: Hardware | None = None, label: str | None = None) -> PrecisionChoice:
    """``choose_precision`` on this machine, with the decision (or the refusal) logged: as the
    Keras policy for training, as ``label: name (reason)`` for engines that are not Keras."""
    try:
        choice = choose_precision(requested, hardware or Hardware.probe(onednn), key)
    except ConfigError as exc:
        log.error("precision: %s", exc)
        raise
    log.info("%s", choice.describe() if label is None else f"{label}: {choice.name} ({choice.reason})")
    return choice


def apply_precision(requested: str, onednn: bool) -> PrecisionChoice:
    """Set the Keras global policy for the models this process builds next (training)."""
    import tensorflow as tf

    choice = resolve_precision(requested, onednn)
    tf.keras.mixed_precision.set_global_policy(choice.policy)
    return choice
