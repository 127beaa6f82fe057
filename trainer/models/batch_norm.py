"""Keras batch normalisation that trains volumes through oneDNN's kernels.

TensorFlow hands ``FusedBatchNormV3`` (and its gradient) to oneDNN only for 4D tensors; a 5D
NDHWC tensor falls back to the Eigen kernels, which were 2.9x slower than oneDNN's for the
forward and backward pass of the 3D UNet's normalisation layers in fp32, and 3.4x in bfloat16
(``benchmarks/batch_norm_kernels.py``, batch 2 at 64³, 2-core EPYC). Batch statistics are per
channel over the batch and every spatial axis, so a (N, D, H*W, C) view of the same memory gives
the same numbers: in training this layer normalises that view as NHWC and reshapes back
(reshapes of a contiguous tensor copy nothing).

Inference keeps Keras's own 5D path, so what ``predict``, ``evaluate`` and the exports' serving
signatures run is Keras's graph. The weights are Keras's (gamma, beta, moving mean and
variance), so checkpoints of either layer restore into the other.
"""
from __future__ import annotations

import tensorflow as tf


@tf.keras.utils.register_keras_serializable(package="unet_train")
class VolumeBatchNormalization(tf.keras.layers.BatchNormalization):
    """``tf.keras.layers.BatchNormalization`` whose fused training step on 5D channels-last
    input runs on a 4D view (see the module docstring); everything else is Keras's."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._as_4d = False

    def build(self, input_shape) -> None:
        super().build(input_shape)
        # Only the fused channels-last 5D case has a 4D twin; virtual batches, renorm, synchronised
        # statistics and channels-first inputs are not fused (or not NDHWC) and stay Keras's own.
        self._as_4d = bool(self.fused) and getattr(self, "_data_format", None) == "NDHWC"

    def call(self, inputs, training=None, mask=None):
        # Keras's own resolution of `training` (learning phase, frozen layers -> False); a symbolic
        # value keeps the 5D path, which is slower but gives the same numbers.
        if not (self._as_4d and self._get_training_value(training) is True):
            return super().call(inputs, training=training, mask=mask)
        shape = tf.shape(inputs)
        flat = tf.reshape(inputs, tf.stack([shape[0], shape[1], shape[2] * shape[3], shape[4]]))
        # Keras reads the fused op's layout from _data_format; the 4D view is NHWC for this call
        # only (one layer object is traced by one thread at a time).
        self._data_format = "NHWC"
        try:
            outputs = super().call(flat, training=training, mask=mask)
        finally:
            self._data_format = "NDHWC"
        outputs = tf.reshape(outputs, shape)
        outputs.set_shape(inputs.shape)
        return outputs
