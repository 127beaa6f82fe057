"""2.5D context for the 2D model: each slice with ``k`` slices above and below, every modality.

One order everywhere (training reads, inference, exports): the slice itself first, then its
neighbours nearest first, below before above, ``[0, -1, +1, -2, +2, ...]``; each plane carries
the run's channels. A neighbour outside the brain or the volume is zeros: skull-stripped scans
are zero there, so the prepared slices (brain slices only) and whole volumes agree.
"""
from __future__ import annotations

import numpy as np


def context_offsets(k: int) -> list[int]:
    """[0, -1, 1, -2, 2, ...]: the slice, then its neighbours nearest first."""
    return [0] + [sign * distance for distance in range(1, k + 1) for sign in (-1, 1)]


def stack_volume_context(volume: np.ndarray, k: int) -> np.ndarray:
    """(x, y, z, C) -> (x, y, z, C x (2k + 1)): every axial slice with its neighbours, zeros past
    the volume's ends."""
    if k == 0:
        return volume
    depth = volume.shape[2]
    planes = []
    for offset in context_offsets(k):
        shifted = np.zeros_like(volume)
        source = slice(max(0, offset), depth + min(0, offset))
        target = slice(max(0, -offset), depth - max(0, offset))
        shifted[:, :, target] = volume[:, :, source]
        planes.append(shifted)
    return np.concatenate(planes, axis=-1)


def neighbour_rows(rows: np.ndarray, case: np.ndarray, z: np.ndarray, k: int) -> np.ndarray:
    """(len(rows), 2k + 1) row numbers of each row's context slices in a prepared split (rows of
    one case in z order), -1 where that slice is not stored (outside the brain or the volume)."""
    count = len(case)
    out = np.full((len(rows), 2 * k + 1), -1, np.int64)
    for column, offset in enumerate(context_offsets(k)):
        candidate = rows + offset
        inside = (candidate >= 0) & (candidate < count)
        safe = np.where(inside, candidate, 0)
        found = inside & (case[safe] == case[rows]) & (z[safe] == z[rows] + offset)
        out[:, column] = np.where(found, candidate, -1)
    return out
