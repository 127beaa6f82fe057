"""Whole-volume prediction: 2D slice by slice, 3D by sliding window with blending."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import cv2
import numpy as np
import tensorflow as tf

from trainer.config.settings import MODALITIES, Settings
from trainer.data.prepare2d import brain_slices, resize_slices
from trainer.models import build_model
from trainer.checkpoints import restore_weights


@dataclass
class Predictor:
    """Turns a normalised (x, y, z, 4) volume into a WT probability map of shape (x, y, z)."""

    model: tf.keras.Model
    kind: str
    channels: list[int]
    image_size: int
    window: tuple[int, int, int]
    overlap: float = 0.5
    blending: str = "gaussian"
    batch_size: int = 8

    @classmethod
    def from_run(cls, settings: Settings, which: str = "best", **options) -> tuple["Predictor", str]:
        data = settings.data
        model = build_model(settings.train.model, settings.model, len(data.channels), data.image_size,
                            data.crop_size)
        checkpoint = restore_weights(model, settings.run_path, which)
        return cls(model, settings.train.model, [MODALITIES.index(c) for c in data.channels],
                   data.image_size, tuple(data.crop_size), **options), checkpoint

    def predict(self, image: np.ndarray) -> np.ndarray:
        image = image[..., self.channels]
        return self._predict_2d(image) if self.kind == "2d" else self._predict_3d(image)

    def _predict_2d(self, image: np.ndarray) -> np.ndarray:
        probability = np.zeros(image.shape[:3], dtype=np.float32)
        keep = brain_slices(image)
        if not len(keep):
            return probability
        slices = resize_slices(image[:, :, keep], self.image_size)
        predicted = self.model.predict(slices, batch_size=self.batch_size, verbose=0)[..., 0]
        width, height = image.shape[1], image.shape[0]
        for z, plane in zip(keep, predicted):
            probability[:, :, z] = cv2.resize(plane, (width, height), interpolation=cv2.INTER_LINEAR)
        return probability

    def _predict_3d(self, image: np.ndarray) -> np.ndarray:
        shape = np.asarray(image.shape[:3])
        window = np.asarray(self.window)
        padded_shape = np.maximum(shape, window)
        padded = np.zeros((*padded_shape, image.shape[-1]), dtype=np.float32)
        padded[: shape[0], : shape[1], : shape[2]] = image
        weights = importance_map(tuple(window), self.blending)
        total = np.zeros(padded_shape, dtype=np.float32)
        norm = np.zeros(padded_shape, dtype=np.float32)
        starts = [window_starts(n, w, self.overlap) for n, w in zip(padded_shape, window)]
        corners = list(itertools.product(*starts))
        for first in range(0, len(corners), self.batch_size):
            group = corners[first:first + self.batch_size]
            batch = np.stack([padded[tuple(slice(c, c + w) for c, w in zip(corner, window))] for corner in group])
            predicted = self.model.predict_on_batch(batch)[..., 0]
            for corner, patch in zip(group, predicted):
                region = tuple(slice(c, c + w) for c, w in zip(corner, window))
                total[region] += patch * weights
                norm[region] += weights
        probability = total / np.maximum(norm, 1e-8)
        return probability[: shape[0], : shape[1], : shape[2]]


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Window origins covering [0, length) with the requested overlap; the last one flush with the end."""
    if length <= window:
        return [0]
    stride = max(1, int(window * (1 - overlap)))
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def importance_map(window: tuple[int, ...], blending: str) -> np.ndarray:
    """Gaussian weights (sigma = window/8) favour window centres, where context is complete."""
    if blending == "mean":
        return np.ones(window, dtype=np.float32)
    axes = [np.exp(-0.5 * ((np.arange(n) - (n - 1) / 2) / (n / 8)) ** 2) for n in window]
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weights /= weights.max()
    return np.maximum(weights, 1e-3).astype(np.float32)
