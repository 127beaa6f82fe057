"""2.5D context for the 2D model: each slice with ``k`` slices above and below, every modality.

One order everywhere (training reads, inference, exports): the slice itself first, then its
neighbours nearest first, below before above, ``[0, -s, +s, -2s, +2s, ...]`` for a stride ``s``
(``model.context_stride_2d``: the same planes reach s times as far); each plane carries the run's
channels. A neighbour outside the brain or the volume is zeros: skull-stripped scans
are zero there, so the prepared slices (brain slices only) and whole volumes agree.
"""
from __future__ import annotations

import numpy as np


def context_offsets(k: int, stride: int = 1) -> list[int]:
    """[0, -s, s, -2s, 2s, ...]: the slice, then its neighbours nearest first."""
    return [0] + [sign * distance * stride for distance in range(1, k + 1) for sign in (-1, 1)]


def stack_volume_context(volume: np.ndarray, k: int, stride: int = 1) -> np.ndarray:
    """(x, y, z, C) -> (x, y, z, C x (2k + 1)): every axial slice with its neighbours, zeros past
    the volume's ends."""
    if k == 0:
        return volume
    depth = volume.shape[2]
    planes = []
    for offset in context_offsets(k, stride):
        shifted = np.zeros_like(volume)
        if abs(offset) < depth:
            source = slice(max(0, offset), depth + min(0, offset))
            target = slice(max(0, -offset), depth - max(0, offset))
            shifted[:, :, target] = volume[:, :, source]
        planes.append(shifted)
    return np.concatenate(planes, axis=-1)


def neighbour_rows(rows: np.ndarray, case: np.ndarray, z: np.ndarray, k: int, stride: int = 1) -> np.ndarray:
    """(len(rows), 2k + 1) row numbers of each row's context slices in a prepared split, -1 where
    that slice is not stored (outside the brain or the volume). Found by (case, z), not by row
    arithmetic, so a slice missing between two stored ones hides only itself."""
    span = int(z.max()) + 1 if len(z) else 1
    keys = case.astype(np.int64) * span + z
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    out = np.full((len(rows), 2 * k + 1), -1, np.int64)
    for column, offset in enumerate(context_offsets(k, stride)):
        target = z[rows] + offset
        wanted = case[rows].astype(np.int64) * span + target
        at = np.minimum(np.searchsorted(sorted_keys, wanted), len(keys) - 1)
        found = (target >= 0) & (target < span) & (sorted_keys[at] == wanted)
        out[:, column] = np.where(found, order[at], -1)
    return out
