"""Whole-volume prediction: 2D slice by slice, 3D by sliding window with blending, on any engine,
averaged over test-time mirrors (``model.mirror_axes_2d`` / ``mirror_axes_3d``)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from trainer.config.kinds import kind_of
from trainer.config.settings import MODALITIES, Settings
from trainer.data.context import stack_volume_context
from trainer.data.prepare2d import brain_slices, resize_slices
from trainer.inference.engines import Engine, EngineRequest, open_engine


@dataclass
class Predictor:
    """Turns a normalised (x, y, z, 4) volume into probability maps, through any inference engine."""

    engine: Engine
    kind: str
    channels: list[int]
    image_size: int
    window: tuple[int, int, int]
    overlap: float = 0.5
    blending: str = "gaussian"
    batch_size: int = 0  # 0 = 32 slices (2D) or 8 windows (3D)
    mirror_axes: tuple[int, ...] = ()  # volume axes flipped at test time; every combination is averaged
    context: int = 0  # 2D: context slices on each side (model.context_slices_2d)
    context_stride: int = 1  # 2D: slices between context planes (model.context_stride_2d)

    @classmethod
    def from_run(cls, settings: Settings, which: str = "best", engine: str = "auto", precision: str = "auto",
                 ir: Path | None = None, **options) -> tuple["Predictor", str]:
        data = settings.data
        runner, source = open_engine(settings, EngineRequest(engine, precision, ir), which)
        return cls(runner, settings.train.model, [MODALITIES.index(c) for c in data.channels],
                   data.image_size, tuple(data.crop_size), mirror_axes=settings.model.mirror_axes(settings.train.model),
                   context=settings.model.context_slices_2d, context_stride=settings.model.context_stride_2d,
                   **options), source

    def predict(self, image: np.ndarray) -> np.ndarray:
        """The whole-tumour probability (x, y, z): the models' output channel 0."""
        return self.predict_channels(image)[..., 0]

    def predict_channels(self, image: np.ndarray) -> np.ndarray:
        """Every output channel's probability, (x, y, z, K): the mean over the test-time mirrors."""
        image = image[..., self.channels]
        predict_once = self._predict_2d if kind_of(self.kind).slices else self._predict_3d
        mirrors = self.mirrors()
        total = None
        for axes in mirrors:
            flipped = np.ascontiguousarray(np.flip(image, axes)) if axes else image
            probability = predict_once(flipped)
            probability = np.flip(probability, axes) if axes else probability
            total = probability if total is None else total + probability
        return total if len(mirrors) == 1 else total / np.float32(len(mirrors))

    def mirrored_axes(self) -> tuple[int, ...]:
        """The axes really mirrored: the 2D model sees slices one by one, so flipping their order
        (axis 2) would only repeat a pass."""
        return kind_of(self.kind).mirrorable(self.mirror_axes)

    def mirrors(self) -> list[tuple[int, ...]]:
        """Every subset of the mirrored axes, the identity first."""
        axes = self.mirrored_axes()
        return [combo for size in range(len(axes) + 1) for combo in itertools.combinations(axes, size)]

    def _batches(self, items, default: int):
        size = self.batch_size or default
        return (items[first:first + size] for first in range(0, len(items), size))

    def _predict_2d(self, image: np.ndarray) -> np.ndarray:
        keep = brain_slices(image)
        if not len(keep):
            return np.zeros((*image.shape[:3], self._output_channels()), dtype=np.float32)
        slices = resize_slices(stack_volume_context(image, self.context, self.context_stride)[:, :, keep], self.image_size)
        predicted = np.concatenate([self.engine.predict(group) for group in self._batches(slices, 32)])
        probability = np.zeros((*image.shape[:3], predicted.shape[-1]), dtype=np.float32)
        width, height = image.shape[1], image.shape[0]
        for z, plane in zip(keep, predicted):
            resized = cv2.resize(plane, (width, height), interpolation=cv2.INTER_LINEAR)
            probability[:, :, z] = resized.reshape(height, width, -1)  # OpenCV drops a single channel axis
        return probability

    def _output_channels(self) -> int:
        sample = np.zeros((1, *(d or 16 for d in self.engine.input_shape)), dtype=np.float32)
        return int(self.engine.predict(sample).shape[-1])

    def _predict_3d(self, image: np.ndarray) -> np.ndarray:
        shape = np.asarray(image.shape[:3])
        window = np.asarray(self.window)
        padded_shape = np.maximum(shape, window)
        padded = np.zeros((*padded_shape, image.shape[-1]), dtype=np.float32)
        padded[: shape[0], : shape[1], : shape[2]] = image
        weights = importance_map(tuple(window), self.blending)[..., None]
        total = norm = None
        starts = [window_starts(n, w, self.overlap) for n, w in zip(padded_shape, window)]
        for group in self._batches(list(itertools.product(*starts)), 8):
            batch = np.stack([padded[tuple(slice(c, c + w) for c, w in zip(corner, window))] for corner in group])
            predicted = self.engine.predict(batch)
            if total is None:
                total = np.zeros((*padded_shape, predicted.shape[-1]), dtype=np.float32)
                norm = np.zeros((*padded_shape, 1), dtype=np.float32)
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
