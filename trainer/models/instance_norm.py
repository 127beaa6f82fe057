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
``dx = scale * dy + k * x + k0``, with float32 statistics but full-size tensors in the compute
dtype, which halved the layers' time in fp32 and cut it further in bf16 (a scratch
micro-benchmark; the step's figures are in benchmarks/results/throughput_2d.json).
Inference (``training`` false, and every export) keeps the formula above.

Under mixed precision the statistics are float32 on both routes: a bfloat16 mean of inputs
around 5 is off by ~0.03, enough to leave a small 2D UNet unable to learn. Inference computes
in float32 and casts only the output; training keeps its elementwise passes in bfloat16 and
corrects for the rounded mean (see ``_normalise_for_training``).
"""
from __future__ import annotations

import tensorflow as tf


def _spatial_axes(x: tf.Tensor) -> list[int]:
    return list(range(1, x.shape.rank - 1))


def _spatial_mean(t: tf.Tensor, axes: list[int], count: tf.Tensor) -> tf.Tensor:
    """float32 mean per sample and channel. TensorFlow sums bfloat16 with a float accumulator
    and rounds only the sum (its bfloat16 reduce_mean is unusable: off by the whole mean)."""
    return tf.cast(tf.reduce_sum(t, axis=axes, keepdims=True), tf.float32) / count


@tf.custom_gradient
def _normalise_for_training(x: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor, epsilon: float):
    """Instance norm of ``x`` and its gradient, with the full-size tensors in bfloat16 when
    ``x`` is bfloat16 and in float32 otherwise (float16 would overflow in sums of squares).

    The activation is centred on a pivot: the mean rounded to that dtype. ``d = x - pivot``
    is then exact or rounded relative to itself, so in bfloat16 no cancellation error scales
    with mean/std, and the pivot's own rounding error is measured on ``d`` (``mean_d``) and
    kept in float32. In float32 the pivot is the mean and ``mean_d`` is 0. Statistics and
    per-channel coefficients are float32; only the elementwise passes run in bfloat16, which
    halves their memory traffic (they are bandwidth-bound).
    """
    work = tf.bfloat16 if x.dtype == tf.bfloat16 else tf.float32
    axes = _spatial_axes(x)
    count = tf.cast(tf.reduce_prod(tf.shape(x)[1:-1]), tf.float32)
    x_work = tf.cast(x, work)
    pivot = tf.cast(_spatial_mean(x_work, axes, count), work)
    d = x_work - pivot
    mean_d = _spatial_mean(d, axes, count) if work != tf.float32 else tf.zeros_like(pivot)
    variance = tf.maximum(_spatial_mean(d * d, axes, count) - tf.square(mean_d), 0.0)
    inv_std = tf.math.rsqrt(variance + epsilon)
    scale = gamma * inv_std
    y = tf.cast(d * tf.cast(scale, work) + tf.cast(beta - mean_d * scale, work), x.dtype)

    def gradient(dy: tf.Tensor):
        # With xhat = (d - mean_d) * inv_std and means over the spatial axes:
        #   dx = scale * (dy - mean(dy) - xhat * mean(dy * xhat)),
        #   mean(dy * xhat) = inv_std * (mean(dy * d) - mean_d * mean(dy))
        dy = tf.cast(dy, work)
        mean_dy = _spatial_mean(dy, axes, count)
        mean_dy_xhat = inv_std * (_spatial_mean(dy * d, axes, count) - mean_d * mean_dy)
        k = -scale * inv_std * mean_dy_xhat
        offset = -scale * mean_dy - k * mean_d
        dx = tf.cast(dy * tf.cast(scale, work) + (d * tf.cast(k, work) + tf.cast(offset, work)), x.dtype)
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
