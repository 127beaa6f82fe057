"""Instance normalisation written so that inference engines recognise it.

The maths is Keras's ``GroupNormalization(groups=-1)`` (one group per channel): per sample and
channel, over the spatial axes, ``(x - mean) / sqrt(var + eps) * gamma + beta``. Keras reaches
it through reshapes into groups, a mask and ``weighted_moments``; OpenVINO cannot fuse that
chain and ran the 2D UNet 4-5x slower than TensorFlow (2-core EPYC). Written as below, its
converter folds the whole layer into one ``MVN`` operation. The weights (``gamma``, ``beta``,
shape ``(channels,)``) keep Keras's names, so checkpoints of either layer restore into the other.

Under mixed precision the statistics are computed in float32 and only the output is cast to
the compute dtype: a bfloat16 mean of inputs around 5 is off by ~0.03, enough to leave a small
2D UNet unable to learn.
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
        # float32 weights inside call() too (no cast to the compute dtype), as in BatchNormalization
        self.gamma = self.add_weight(name="gamma", shape=(channels,), initializer="ones", experimental_autocast=False)
        self.beta = self.add_weight(name="beta", shape=(channels,), initializer="zeros", experimental_autocast=False)
        super().build(input_shape)

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        x = tf.cast(inputs, tf.float32)
        axes = list(range(1, x.shape.rank - 1))
        mean = tf.reduce_mean(x, axis=axes, keepdims=True)
        centred = x - mean
        variance = tf.reduce_mean(tf.square(centred), axis=axes, keepdims=True)
        normalised = centred / tf.sqrt(variance + self.epsilon)
        return tf.cast(normalised * self.gamma + self.beta, self.compute_dtype)

    def get_config(self) -> dict:
        return {**super().get_config(), "epsilon": self.epsilon}
