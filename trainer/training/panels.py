"""RGB overlays of MRI, ground truth and prediction (TensorBoard panels, predict PNGs)."""
from __future__ import annotations

import numpy as np

TRUTH_RGB = np.array([0, 220, 0], np.float32)
PRED_RGB = np.array([230, 30, 30], np.float32)


def to_gray(image: np.ndarray) -> np.ndarray:
    """Robustly window a 2D slice to uint8 (1st-99th percentile of non-zero voxels)."""
    values = image[image != 0]
    lo, hi = (np.percentile(values, [1, 99]) if values.size else (0.0, 1.0))
    scaled = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)
    return (scaled * 255).astype(np.uint8)


def overlay(gray: np.ndarray, mask: np.ndarray, color: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    rgb = np.repeat(gray[..., None].astype(np.float32), 3, axis=-1)
    selected = mask > 0.5
    rgb[selected] = (1 - alpha) * rgb[selected] + alpha * color
    return rgb.astype(np.uint8)


def panel(image: np.ndarray, truth: np.ndarray | None, prediction: np.ndarray) -> np.ndarray:
    """[MRI | MRI+truth (green) | MRI+prediction (red)] side by side, (H, 3W, 3) uint8."""
    gray = to_gray(image)
    parts = [np.repeat(gray[..., None], 3, axis=-1)]
    if truth is not None:
        parts.append(overlay(gray, truth, TRUTH_RGB))
    parts.append(overlay(gray, prediction, PRED_RGB))
    return np.concatenate(parts, axis=1)


def volume_planes(volume: np.ndarray) -> list[np.ndarray]:
    """Mid-slices of an (x, y, z) volume in the axial, coronal and sagittal planes."""
    x, y, z = (n // 2 for n in volume.shape[:3])
    return [volume[:, :, z], volume[:, y, :], volume[x, :, :]]


def volume_panel(image: np.ndarray, truth: np.ndarray | None, prediction: np.ndarray) -> np.ndarray:
    """Three planes (rows) of [MRI | truth | prediction], each row padded to a common width."""
    rows = [panel(i, t, p) for i, t, p in zip(volume_planes(image),
                                              volume_planes(truth) if truth is not None else [None] * 3,
                                              volume_planes(prediction))]
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return np.concatenate(padded, axis=0)
