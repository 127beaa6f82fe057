"""Instance normalisation written so that inference engines recognise it.

The maths is Keras's ``GroupNormalization(groups=-1)`` (one group per channel): per sample and
channel, over the spatial axes, ``(x - mean) / sqrt(var + eps) * gamma + beta``. Keras reaches
it through reshapes into groups, a mask and ``weighted_moments``; OpenVINO cannot fuse that
chain and ran the 2D UNet 4-5x slower than TensorFlow (2-core EPYC). Written as below, its
converter folds the whole layer into one ``MVN`` operation. The weights (``gamma``, ``beta``,
shape ``(channels,)``) keep Keras's names, so checkpoints of either layer restore into the other.
"""
from __future__ import annotations

import tensorflow as tf


@tf.keras.utils.register_keras_serializable(package="unet_train")
class InstanceNormalization(tf.keras.layers.Layer):
    def __init__(self, epsilon: float = 1e-5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape) -> None:
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(f"{self.name}: instance normalisation needs a known channel count")
        self.gamma = self.add_weight(name="gamma", shape=(channels,), initializer="ones")
        self.beta = self.add_weight(name="beta", shape=(channels,), initializer="zeros")
        super().build(input_shape)

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        axes = list(range(1, inputs.shape.rank - 1))
        mean = tf.reduce_mean(inputs, axis=axes, keepdims=True)
        centred = inputs - mean
        variance = tf.reduce_mean(tf.square(centred), axis=axes, keepdims=True)
        normalised = centred / tf.sqrt(variance + tf.cast(self.epsilon, inputs.dtype))
        return normalised * tf.cast(self.gamma, inputs.dtype) + tf.cast(self.beta, inputs.dtype)

    def get_config(self) -> dict:
        return {**super().get_config(), "epsilon": self.epsilon}
