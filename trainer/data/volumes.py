"""The 3D model's prepared data: a checked split and, optionally, a cache of normalised volumes.

The 3D pipeline reads cases straight from the raw NIfTI files (either layout), or from a cache
of normalised float32 ``.npy`` copies (memory-mapped, so a crop reads only the bytes it needs).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from trainer.data.datasets import RawCase, RawDataset
from trainer.errors import DataError, UserError
from trainer.fsutil import atomic_dir, check_regular, read_regular_text, refuse_existing

log = logging.getLogger(__name__)
# Bumped when the cached arrays change meaning (2: canonical label maps instead of WT masks;
# 3: stamps for either layout; 4: stamps by file name, size and modification time, not path);
# a cache stamped otherwise is stale and the raw source is read.
CACHE_FORMAT = 4
STAMP_LIMIT = 1 << 16  # a case's stamp names a few files


@dataclass(frozen=True)
class CaseArrays:
    """Where a case's normalised image and canonical labels live: the cache (memory-mapped) or its NIfTI."""

    case: RawCase
    image_file: Path | None = None
    labels_file: Path | None = None

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        if self.image_file is not None:
            return np.load(self.image_file, mmap_mode="r"), np.load(self.labels_file, mmap_mode="r")
        image, labels, _ = self.case.load()
        if labels is None:
            raise DataError(f"{self.case.images[0]}: case {self.case.case_id} has no labels")
        return image, labels


def build_cache(dataset: RawDataset, cache_dir: Path, progress: bool = True,
                overwrite: bool = False) -> list[CaseArrays]:
    """Write normalised .npy copies of every labelled case into ``cache_dir``, all or nothing.

    The cache is built in a temporary folder beside ``cache_dir`` and renamed into place only
    when every case is written: a bad case must not leave a partial cache, which
    :func:`case_arrays` would silently mix with NIfTI reads. An existing ``cache_dir`` is
    refused unless ``overwrite``; then its still up-to-date cases are hard-linked (or
    copied) into the new cache instead of being recomputed.
    """
    cache_dir = Path(cache_dir)
    previous = cache_dir if overwrite and cache_dir.is_dir() else None
    with atomic_dir(cache_dir, overwrite) as tmp:
        for case in tqdm(dataset.cases, desc=f"cache {dataset.layout}", unit="case", disable=not progress):
            names = _cache_names(case.case_id)
            source = _source_stamp(case)
            if previous is not None and _reuse_cached(previous, tmp, names, source):
                continue
            image, labels, _ = case.load()
            np.save(tmp / names[0], image)
            np.save(tmp / names[1], labels)
            (tmp / names[2]).write_text(json.dumps(source))
    return [CaseArrays(case, *(cache_dir / name for name in _cache_names(case.case_id)[:2]))
            for case in dataset.cases]


def _cache_names(case_id: str) -> tuple[str, str, str]:
    return f"{case_id}.image.npy", f"{case_id}.labels.npy", f"{case_id}.source.json"


def _reuse_cached(previous: Path, target: Path, names: tuple[str, str, str], source: dict) -> bool:
    """Link a case's files from the previous cache when its stamp matches the source NIfTI."""
    if not all((previous / name).is_file() for name in names) or not _stamp_matches(previous / names[2], source):
        return False
    for name in names:
        try:
            os.link(previous / name, target / name)
        except OSError:  # e.g. a filesystem without hard links
            shutil.copy2(previous / name, target / name)
    return True


def case_arrays(dataset: RawDataset, cache_dir: Path | None) -> dict[str, CaseArrays]:
    """Per case: the cache when it is complete and still matches its NIfTI source (each file's name,
    size and modification time, as stamped by prepare: the same files reached by another path still
    match), else the NIfTI source itself."""
    result, stale = {}, []
    for case in dataset.cases:
        image_file = labels_file = None
        if cache_dir is not None:
            image_name, labels_name, stamp_name = (Path(cache_dir) / n for n in _cache_names(case.case_id))
            if _regular(image_name) and _regular(labels_name) and _stamp_matches(stamp_name, _source_stamp(case)):
                image_file, labels_file = image_name, labels_name
            elif image_name.exists() or stamp_name.exists():
                stale.append(case.case_id)
        result[case.case_id] = CaseArrays(case, image_file, labels_file)
    if stale:
        log.warning("%s: cache of %d case(s) (%s) is older than its NIfTI source or than this unet-train's cache "
                    "format; reading the source instead (refresh: unet-train prepare --model 3d --overwrite)",
                    cache_dir, len(stale), ", ".join(stale[:3]) + (", ..." if len(stale) > 3 else ""))
    return result


def _source_stamp(case: RawCase) -> dict:
    return {"format": CACHE_FORMAT, **case.stamp()}


def _stamp_matches(stamp: Path, source: dict) -> bool:
    try:
        return json.loads(read_regular_text(stamp, limit=STAMP_LIMIT)) == source
    except (OSError, ValueError, UserError):
        return False


def _regular(path: Path) -> bool:
    """A cached array is used only when it is a regular file (np.load maps it): a FIFO or a device
    in the cache makes the case stale, read from its NIfTI, instead of hanging or flooding a reader."""
    try:
        check_regular(path)
    except (OSError, UserError):
        return False
    return True


def prepare_volumes(dataset: RawDataset, cache_dir: Path | None, progress: bool = True,
                    overwrite: bool = False) -> None:
    """Validate every labelled case (by loading it) and, with ``cache_dir``, cache it there.
    An existing cache folder is refused unless ``overwrite`` (checked before any work)."""
    if cache_dir is not None:
        refuse_existing(Path(cache_dir), overwrite)
        build_cache(dataset, cache_dir, progress, overwrite)
        return
    for case in tqdm(dataset.cases, desc=f"check {dataset.layout}", unit="case", disable=not progress):
        case.load()
