"""Intensity normalisation shared by preparation, training and inference."""
from __future__ import annotations

import numpy as np


def zscore_brain(image: np.ndarray) -> np.ndarray:
    """Per-channel z-score over brain (non-zero) voxels; background stays exactly 0.

    ``image`` is (..., c). Skull-stripped MRI has a zero background, so non-zero voxels
    are the brain; normalising over them keeps the background from dominating the stats.
    """
    out = np.zeros(image.shape, dtype=np.float32)
    for channel in range(image.shape[-1]):
        values = image[..., channel]
        brain = values != 0
        if not brain.any():
            continue
        selected = values[brain].astype(np.float64)
        std = selected.std()
        out[..., channel][brain] = (selected - selected.mean()) / (std if std > 0 else 1.0)
    return out


def whole_tumour(labels: np.ndarray) -> np.ndarray:
    """WT mask (label > 0) as uint8, for BraTS and Decathlon alike."""
    return (labels > 0).astype(np.uint8)
