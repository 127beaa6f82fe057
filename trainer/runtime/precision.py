"""Mixed precision policy: float16 on GPUs, bfloat16 only on CPUs with native bf16."""
from __future__ import annotations

import logging

from trainer.errors import ConfigError
from trainer.runtime.cpu import cpu_has_native_bf16

log = logging.getLogger(__name__)


def apply_precision(mixed: bool) -> str:
    import tensorflow as tf

    if not mixed:
        policy = "float32"
    elif tf.config.list_physical_devices("GPU"):
        policy = "mixed_float16"
    elif cpu_has_native_bf16():
        policy = "mixed_bfloat16"
    else:
        raise ConfigError("train.mixed_precision: this CPU has no native bfloat16 (avx512_bf16/amx); "
                          "mixed precision would be ~18x slower here. Set train.mixed_precision=false")
    tf.keras.mixed_precision.set_global_policy(policy)
    return policy
