"""Instance normalisation written so that inference engines recognise it, and trained with a
hand-written gradient.

The maths is Keras's ``GroupNormalization(groups=-1)`` (one group per channel): per sample and
channel, over the spatial axes, ``(x - mean) / sqrt(var + eps) * gamma + beta``. Keras reaches
it through reshapes into groups, a mask and ``weighted_moments``; OpenVINO cannot fuse that
chain and ran the 2D UNet 4-5x slower than TensorFlow (2-core EPYC). Written as below, its
converter folds the whole layer into one ``MVN`` operation. The weights (``gamma``, ``beta``,
shape ``(channels,)``) keep Keras's names, so checkpoints of either layer restore into the other.

Training takes another route to the same numbers. TensorFlow's automatic gradient of the
formula above walks the activation about twenty times (each broadcast op and its reduction);
these layers were the largest part of the 2D step outside oneDNN, and the same in bf16 as in
fp32, since the statistics are fp32 either way. ``_normalise_for_training`` writes the forward
pass as one scale and shift per sample and channel and the backward pass as
``dx = scale * dy + k * x + k0``, which halves the layers' time (benchmarks/throughput.py).
Inference (``training`` false, and every export) keeps the formula above.

Under mixed precision the statistics are computed in float32 and only the output is cast to
the compute dtype: a bfloat16 mean of inputs around 5 is off by ~0.03, enough to leave a small
2D UNet unable to learn.
"""
from __future__ import annotations

import tensorflow as tf


def _spatial_axes(x: tf.Tensor) -> list[int]:
    return list(range(1, x.shape.rank - 1))


@tf.custom_gradient
def _normalise_for_training(x: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor, epsilon: float):
    """Instance norm of ``x`` with its gradient in four passes over the activation, not twenty."""
    axes = _spatial_axes(x)
    x32 = tf.cast(x, tf.float32)
    mean, variance = tf.nn.moments(x32, axes, keepdims=True)
    inv_std = tf.math.rsqrt(variance + epsilon)
    scale = gamma * inv_std
    y = tf.cast(x32 * scale + (beta - mean * scale), x.dtype)

    def gradient(dy: tf.Tensor):
        # With xhat = (x - mean) * inv_std and means over the spatial axes:
        #   dx = scale * (dy - mean(dy) - xhat * mean(dy * xhat)),  mean(dy * xhat) = inv_std * (mean(dy x) - mean * mean(dy))
        dy32 = tf.cast(dy, tf.float32)
        mean_dy = tf.reduce_mean(dy32, axis=axes, keepdims=True)
        mean_dy_xhat = inv_std * (tf.reduce_mean(dy32 * x32, axis=axes, keepdims=True) - mean * mean_dy)
        k = -scale * inv_std * mean_dy_xhat
        dx = tf.cast(dy32 * scale + (x32 * k + (-scale * mean_dy - k * mean)), x.dtype)
        count = tf.cast(tf.reduce_prod(tf.shape(x)[1:-1]), tf.float32)
        batch_and_space = [0, *axes]
        dgamma = tf.reshape(tf.reduce_sum(mean_dy_xhat, axis=batch_and_space) * count, tf.shape(gamma))
        dbeta = tf.reshape(tf.reduce_sum(mean_dy, axis=batch_and_space) * count, tf.shape(beta))
        return dx, dgamma, dbeta, None

    return y, gradient


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

    def call(self, inputs: tf.Tensor, training=None) -> tf.Tensor:
        if training:
            return _normalise_for_training(inputs, tf.convert_to_tensor(self.gamma), tf.convert_to_tensor(self.beta),
                                           self.epsilon)
        x = tf.cast(inputs, tf.float32)
        axes = _spatial_axes(x)
        mean = tf.reduce_mean(x, axis=axes, keepdims=True)
        centred = x - mean
        variance = tf.reduce_mean(tf.square(centred), axis=axes, keepdims=True)
        normalised = centred / tf.sqrt(variance + self.epsilon)
        return tf.cast(normalised * self.gamma + self.beta, self.compute_dtype)

    def get_config(self) -> dict:
        return {**super().get_config(), "epsilon": self.epsilon}
