"""Segmentation metrics, per sample, shared by training (Keras) and evaluation (numpy).

Conventions for empty sets: when both truth and prediction are empty, Dice, sensitivity
and precision are 1 (nothing to find, nothing wrongly found); specificity with no
negatives is 1. HD95 is undefined (NaN) when exactly one of the two masks is empty and 0
when both are.

Masks carry one channel per region (last axis). Per-sample metrics score each region on
its own and average over regions; ``confusion_counts`` keeps the regions apart, so that
validation can pool a whole case's counts per region before taking a ratio.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from trainer.models.losses import soft_dice, spatial_axes

COUNT_NAMES = ("tp", "fp", "fn", "tn")


def confusion_counts(y_true, y_pred, threshold: float = 0.5):
    """Per sample and region: (tp, fp, fn, tn) voxel counts, shape (batch, regions, 4)."""
    y_true = tf.cast(y_true > 0.5, tf.float32)
    y_hat = tf.cast(y_pred > threshold, tf.float32)
    axes = spatial_axes(y_hat)
    tp = tf.reduce_sum(y_true * y_hat, axis=axes)
    fp = tf.reduce_sum((1.0 - y_true) * y_hat, axis=axes)
    fn = tf.reduce_sum(y_true * (1.0 - y_hat), axis=axes)
    tn = tf.reduce_sum((1.0 - y_true) * (1.0 - y_hat), axis=axes)
    return tf.stack([tp, fp, fn, tn], axis=-1)


def _counts(y_true, y_pred, threshold: float):
    counts = confusion_counts(y_true, y_pred, threshold)
    return tuple(counts[..., i] for i in range(4))


def _ratio(numerator, denominator):
    """numerator / denominator averaged over regions; a region whose denominator is 0 scores 1
    (empty-set convention)."""
    safe = tf.where(denominator > 0, denominator, tf.ones_like(denominator))
    return tf.reduce_mean(tf.where(denominator > 0, numerator / safe, tf.ones_like(denominator)), axis=-1)


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


def count_ratios(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Dice, sensitivity, specificity and precision from pooled (..., 4) counts (numpy), with the
    empty-set convention of the tensor metrics."""
    tp, fp, fn, tn = (counts[..., i].astype(np.float64) for i in range(4))

    def ratio(numerator, denominator):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), 1.0)

    return {"dice": ratio(2 * tp, 2 * tp + fp + fn), "sensitivity": ratio(tp, tp + fn),
            "specificity": ratio(tn, tn + fp), "precision": ratio(tp, tp + fp)}


# Per-sample training metrics, by the names every runtime logs (per slice/crop, averaged over
# regions). ``slice_dice`` is named for what it is: a mean of per-sample Dice scores, which
# counts every empty-and-correct slice as 1 and so ranks checkpoints differently from the
# case-level Dice that validation reports as ``dice``.
TRAIN_METRIC_NAMES = ("slice_dice", "soft_dice", "sensitivity", "specificity", "precision")


def train_metric_fns(threshold: float, smooth_numerator: float, smooth_denominator: float) -> dict:
    return {"slice_dice": lambda t, p: hard_dice(t, p, threshold),
            "soft_dice": lambda t, p: soft_dice(t, p, smooth_numerator, smooth_denominator),
            "sensitivity": lambda t, p: sensitivity(t, p, threshold),
            "specificity": lambda t, p: specificity(t, p, threshold),
            "precision": lambda t, p: precision(t, p, threshold)}


def keras_metrics(threshold: float = 0.5, smooth_numerator: float = 1.0,
                  smooth_denominator: float = 1.0) -> list[tf.keras.metrics.Metric]:
    """Epoch-level means of the per-sample metrics (what Keras logs as slice_dice, soft_dice, ...).

    ``soft_dice`` takes the loss's smoothing (``train.loss.smooth_*``), so the logged value
    is exactly 1 - the Dice loss. With ``smooth_numerator`` 0 an empty truth with an empty
    prediction scores 0, not the 1 of the hard metrics (defined, but the opposite convention).
    """
    fns = train_metric_fns(threshold, smooth_numerator, smooth_denominator)
    return [tf.keras.metrics.MeanMetricWrapper(fns[name], name=name) for name in TRAIN_METRIC_NAMES]


def case_metrics(truth: np.ndarray, probability: np.ndarray, threshold: float,
                 spacing: tuple[float, ...]) -> dict[str, float]:
    """All evaluation metrics of one region of one whole volume (arrays without batch/channel axes)."""
    counts = confusion_counts(tf.constant(truth[None, ..., None].astype(np.float32)),
                              tf.constant(probability[None, ..., None].astype(np.float32)), threshold)
    values = {name: float(value[0, 0]) for name, value in count_ratios(counts.numpy()).items()}
    values["hd95"] = hd95(truth > 0.5, probability > threshold, spacing)
    return values


def surface(mask: np.ndarray) -> np.ndarray:
    """Face-connected surface: mask voxels with at least one of their 6 face neighbours outside
    the mask (the surface MONAI, medpy and DeepMind's surface-distance use)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.transpose(mask).astype(np.uint8))
    return np.transpose(sitk.GetArrayFromImage(sitk.BinaryContour(image, fullyConnected=False))) > 0


def directed_surface_distances(source: np.ndarray, target: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """For each surface voxel of ``source``: the distance in mm to the nearest surface voxel of ``target``."""
    import SimpleITK as sitk

    target_surface = surface(target)
    image = sitk.GetImageFromArray(np.transpose(target_surface).astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in spacing))
    distance = np.transpose(sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
        image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)))
    distance = np.where(target_surface, 0.0, distance)  # on the target surface itself: 0
    return distance[surface(source)]


def hd95(truth: np.ndarray, prediction: np.ndarray, spacing: tuple[float, ...]) -> float:
    """95th-percentile Hausdorff distance in mm, MONAI's convention: face-connected surfaces,
    the 95th percentile (linear interpolation) of each directed surface-to-surface distance set,
    then the larger of the two directions."""
    if not truth.any() and not prediction.any():
        return 0.0
    if not truth.any() or not prediction.any():
        return float("nan")
    forward = directed_surface_distances(truth, prediction, spacing)
    backward = directed_surface_distances(prediction, truth, spacing)
    return float(max(np.percentile(forward, 95), np.percentile(backward, 95)))
