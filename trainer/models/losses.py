"""Segmentation losses. All are per-sample and then averaged over the batch.

Per-sample (not whole-batch) Dice makes the loss of a batch the mean of its samples'
losses, so the average of N workers' gradients at batch b equals the gradient of one
process at batch N*b: the property synchronous data-parallel SGD relies on.

A region model has one output channel per region (``model.regions``); each region is
scored on its own (nnU-Net's region-based training for BraTS) and a sample's loss is the
mean over its regions.
"""
from __future__ import annotations

import tensorflow as tf

from trainer.config.settings import LossSettings


def spatial_axes(tensor: tf.Tensor) -> list[int]:
    """Every axis but the batch (first) and the region channel (last)."""
    return list(range(1, len(tensor.shape) - 1))


def soft_dice(y_true, y_pred, smooth_numerator: float = 1.0, smooth_denominator: float = 1.0) -> tf.Tensor:
    """Per-sample soft Dice (2|X.Y| + s_n) / (|X| + |Y| + s_d) averaged over regions, shape (batch,)."""
    y_true = tf.cast(y_true, y_pred.dtype)
    axes = spatial_axes(y_pred)
    intersection = tf.reduce_sum(y_true * y_pred, axis=axes)
    total = tf.reduce_sum(y_true, axis=axes) + tf.reduce_sum(y_pred, axis=axes)
    return tf.reduce_mean((2.0 * intersection + smooth_numerator) / (total + smooth_denominator), axis=-1)


def make_loss(settings: LossSettings):
    """The training loss named in settings, returning per-sample values (Keras averages them)."""
    s_n, s_d = settings.smooth_numerator, settings.smooth_denominator

    def dice_loss(y_true, y_pred):
        return 1.0 - soft_dice(y_true, y_pred, s_n, s_d)

    def log_dice_loss(y_true, y_pred):
        return -tf.math.log(soft_dice(y_true, y_pred, s_n, s_d))

    def bce_dice_loss(y_true, y_pred):
        y_true_f = tf.cast(y_true, y_pred.dtype)
        bce = tf.keras.backend.binary_crossentropy(y_true_f, y_pred)
        bce = tf.reduce_mean(bce, axis=list(range(1, len(bce.shape))))
        return settings.bce_weight * bce + dice_loss(y_true, y_pred)

    loss = {"dice": dice_loss, "log_dice": log_dice_loss, "bce_dice": bce_dice_loss}[settings.name]
    loss.__name__ = settings.name + "_loss"
    return loss
