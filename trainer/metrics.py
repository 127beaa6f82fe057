"""Segmentation metrics, per sample, shared by training (Keras) and evaluation (numpy).

Conventions for empty sets: when both truth and prediction are empty, Dice, sensitivity
and precision are 1 (nothing to find, nothing wrongly found); specificity with no
negatives is 1. HD95 is undefined (NaN) when exactly one of the two masks is empty and 0
when both are.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from trainer.losses import soft_dice


def _counts(y_true, y_pred, threshold: float):
    y_true = tf.cast(y_true > 0.5, tf.float32)
    y_hat = tf.cast(y_pred > threshold, tf.float32)
    axes = list(range(1, len(y_hat.shape)))
    tp = tf.reduce_sum(y_true * y_hat, axis=axes)
    fp = tf.reduce_sum((1.0 - y_true) * y_hat, axis=axes)
    fn = tf.reduce_sum(y_true * (1.0 - y_hat), axis=axes)
    tn = tf.reduce_sum((1.0 - y_true) * (1.0 - y_hat), axis=axes)
    return tp, fp, fn, tn


def _ratio(numerator, denominator):
    """numerator / denominator, defined as 1 where the denominator is 0 (empty-set convention)."""
    safe = tf.where(denominator > 0, denominator, tf.ones_like(denominator))
    return tf.where(denominator > 0, numerator / safe, tf.ones_like(denominator))


def hard_dice(y_true, y_pred, threshold: float = 0.5):
    tp, fp, fn, _ = _counts(y_true, y_pred, threshold)
    return _ratio(2.0 * tp, 2.0 * tp + fp + fn)


def sensitivity(y_true, y_pred, threshold: float = 0.5):
    tp, _, fn, _ = _counts(y_true, y_pred, threshold)
    return _ratio(tp, tp + fn)


def specificity(y_true, y_pred, threshold: float = 0.5):
    _, fp, _, tn = _counts(y_true, y_pred, threshold)
    return _ratio(tn, tn + fp)


def precision(y_true, y_pred, threshold: float = 0.5):
    tp, fp, _, _ = _counts(y_true, y_pred, threshold)
    return _ratio(tp, tp + fp)


def keras_metrics(threshold: float = 0.5, smooth_numerator: float = 1.0,
                  smooth_denominator: float = 1.0) -> list[tf.keras.metrics.Metric]:
    """Epoch-level means of the per-sample metrics (what Keras logs as dice, soft_dice, ...).

    ``soft_dice`` takes the loss's smoothing (``train.loss.smooth_*``), so the logged value
    is exactly 1 - the Dice loss. With ``smooth_numerator`` 0 an empty truth with an empty
    prediction scores 0, not the 1 of the hard metrics (defined, but the opposite convention).
    """
    wrap = tf.keras.metrics.MeanMetricWrapper
    return [
        wrap(hard_dice, name="dice", threshold=threshold),
        wrap(soft_dice, name="soft_dice", smooth_numerator=smooth_numerator, smooth_denominator=smooth_denominator),
        wrap(sensitivity, name="sensitivity", threshold=threshold),
        wrap(specificity, name="specificity", threshold=threshold),
        wrap(precision, name="precision", threshold=threshold),
    ]


def case_metrics(truth: np.ndarray, probability: np.ndarray, threshold: float,
                 spacing: tuple[float, ...]) -> dict[str, float]:
    """All evaluation metrics for one whole volume (arrays without batch/channel axes)."""
    t = tf.constant(truth[None].astype(np.float32))
    p = tf.constant(probability[None].astype(np.float32))
    values = {name: float(fn(t, p, threshold)[0]) for name, fn in
              (("dice", hard_dice), ("sensitivity", sensitivity), ("specificity", specificity),
               ("precision", precision))}
    values["hd95"] = hd95(truth > 0.5, probability > threshold, spacing)
    return values


def hd95(truth: np.ndarray, prediction: np.ndarray, spacing: tuple[float, ...]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (max of the two directed HD95s)."""
    import SimpleITK as sitk

    if not truth.any() and not prediction.any():
        return 0.0
    if not truth.any() or not prediction.any():
        return float("nan")

    def surface_distances(source: np.ndarray, target: np.ndarray) -> np.ndarray:
        target_image = sitk.GetImageFromArray(np.transpose(target).astype(np.uint8))
        target_image.SetSpacing(tuple(float(s) for s in spacing))
        distance = sitk.GetArrayFromImage(sitk.Abs(sitk.SignedMaurerDistanceMap(
            target_image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)))
        source_image = sitk.GetImageFromArray(np.transpose(source).astype(np.uint8))
        border = sitk.GetArrayFromImage(sitk.BinaryContour(source_image, fullyConnected=True)) > 0
        # Maurer distances are to the target's boundary; for surface-to-surface use the border voxels.
        return distance[border]

    forward = surface_distances(truth, prediction)
    backward = surface_distances(prediction, truth)
    return float(max(np.percentile(forward, 95), np.percentile(backward, 95)))
