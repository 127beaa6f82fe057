"""RGB overlays of MRI, ground truth and prediction (TensorBoard panels, predict PNGs).

Each region has one colour in every panel (truth and prediction alike, so the two can be
compared side by side); inner regions are painted over outer ones.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

REGION_RGB = {"wt": np.array([0, 210, 0], np.float32),     # whole tumour: green
              "tc": np.array([255, 190, 0], np.float32),   # tumour core: amber
              "et": np.array([235, 30, 30], np.float32)}   # enhancing tumour: red
MIN_EDGE_PX = 240  # panels are upscaled to at least this many pixels per plane edge


def to_gray(image: np.ndarray) -> np.ndarray:
    """Robustly window a 2D slice to uint8 (1st-99th percentile of non-zero voxels)."""
    values = image[image != 0]
    lo, hi = (np.percentile(values, [1, 99]) if values.size else (0.0, 1.0))
    scaled = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)
    return (scaled * 255).astype(np.uint8)


def overlay(gray: np.ndarray, masks: np.ndarray, regions: Sequence[str], alpha: float = 0.5) -> np.ndarray:
    """``gray`` (H, W) with each region of ``masks`` (H, W, R) blended in its colour."""
    rgb = np.repeat(gray[..., None].astype(np.float32), 3, axis=-1)
    for index in np.argsort([("wt", "tc", "et").index(r) for r in regions]):  # outer first
        selected = masks[..., index] > 0.5
        rgb[selected] = (1 - alpha) * rgb[selected] + alpha * REGION_RGB[regions[index]]
    return rgb.astype(np.uint8)


def panel(image: np.ndarray, truth: np.ndarray | None, prediction: np.ndarray,
          regions: Sequence[str] = ("wt",)) -> np.ndarray:
    """[MRI | MRI + truth | MRI + prediction] side by side, (H, 2-3 W, 3) uint8.

    ``truth``/``prediction`` are (H, W, R) region masks (a 2D array means one region).
    """
    def as_regions(mask):
        return mask[..., None] if mask.ndim == 2 else mask

    gray = to_gray(image)
    parts = [np.repeat(gray[..., None], 3, axis=-1)]
    if truth is not None:
        parts.append(overlay(gray, as_regions(truth), regions))
    parts.append(overlay(gray, as_regions(prediction), regions))
    return np.concatenate(parts, axis=1)


def enlarge(picture: np.ndarray, edge: int) -> np.ndarray:
    """Nearest-neighbour upscaling so a plane of ``edge`` pixels is readable at TensorBoard's size."""
    factor = max(1, math.ceil(MIN_EDGE_PX / max(edge, 1)))
    return picture.repeat(factor, axis=0).repeat(factor, axis=1)


def volume_planes(volume: np.ndarray) -> list[np.ndarray]:
    """Slices of an (x, y, z, ...) volume through its centre: axial, coronal, sagittal."""
    x, y, z = (n // 2 for n in volume.shape[:3])
    return [volume[:, :, z], volume[:, y, :], volume[x, :, :]]


def volume_panel(image: np.ndarray, truth: np.ndarray | None, prediction: np.ndarray,
                 regions: Sequence[str] = ("wt",)) -> np.ndarray:
    """Three planes (rows) of [MRI | truth | prediction], each row padded to a common width."""
    rows = [panel(i, t, p, regions) for i, t, p in zip(volume_planes(image),
                                                       volume_planes(truth) if truth is not None else [None] * 3,
                                                       volume_planes(prediction))]
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return np.concatenate(padded, axis=0)
