"""A prepared dataset: one folder that describes itself, what ``prepare`` hands every later command.

``prepare --src RAW [--out DIR]`` writes, under DIR::

    prepared.json        the manifest: the raw source (absolute) and its layout, a fingerprint of
                         its cases, the patient-level split, and what is prepared for which model
    slices-128.h5        the 2D model's slices at that image size (one file per size)
    volumes/             the 3D model's normalised cache (optional: 3D reads the NIfTI otherwise)

The 2D and 3D preparations of one source sit side by side and share one split. ``train --data
DIR`` needs nothing else; without ``--data``, the last dataset prepared from the current folder
is used (recorded in ``data/prepared/last.json``) and the log says so.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from trainer.config.settings import Settings, SplitSettings
from trainer.data.datasets import RawCase, RawDataset
from trainer.data.nifti import Geometry
from trainer.errors import DataError
from trainer.fsutil import check_regular, read_regular_text, write_json

MANIFEST_NAME = "prepared.json"
MANIFEST_FORMAT = 1
DEFAULT_PARENT = Path("data/prepared")        # prepare's --out default: data/prepared/<source folder name>
LAST_PREPARED = DEFAULT_PARENT / "last.json"  # the last dataset prepared from the current folder
VOLUMES_DIR = "volumes"
from trainer.data.split import SPLITS
MANIFEST_LIMIT = 64 << 20  # the manifest lists case ids: 64 MiB is thousands of times a real one
log = logging.getLogger(__name__)


def slices_name(image_size: int) -> str:
    return f"slices-{image_size}.h5"


def source_fingerprint(dataset: RawDataset) -> dict:
    """What identifies the raw cases a split was made from: their ids and the sizes of their files.
    Names and sizes, not paths: the same data moved or mounted elsewhere is the same data."""
    digest = hashlib.sha256()
    total = 0
    for case in dataset.cases:
        for path in (*case.images, *([case.label] if case.label is not None else [])):
            size = os.stat(path).st_size
            total += size
            digest.update(f"{case.case_id}\0{Path(path).name}\0{size}\n".encode())
    return {"cases": len(dataset.cases), "bytes": total, "sha256": digest.hexdigest()}


def split_settings_dict(split: SplitSettings) -> dict:
    return {"val_fraction": split.val_fraction, "test_fraction": split.test_fraction, "seed": split.seed}


@dataclass(frozen=True)
class PreparedDataset:
    """The manifest of a prepared dataset folder, read and checked."""

    root: Path                                   # absolute
    source: Path                                 # the raw dataset folder, absolute, as prepared
    layout: str                                  # brats | decathlon
    split: dict[str, list[str]]                  # patient ids per part (train / val / test)
    split_settings: dict                         # the fractions and seed it was made with
    fingerprint: dict                            # source_fingerprint() of the raw cases
    slices: dict[str, dict] = field(default_factory=dict)  # image size -> {"file", "counts"}
    volumes: dict | None = None                  # {"cached": bool, "cases": n} once prepared for 3D

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    @classmethod
    def open(cls, root: Path) -> "PreparedDataset":
        root = Path(root).absolute()
        path = root / MANIFEST_NAME
        if not root.is_dir():
            what = "a file, not a folder" if root.exists() else "not found"
            raise DataError(f"{root}: prepared dataset {what} (make one with: unet-train prepare --src RAW "
                            f"--out DIR, then --data DIR)")
        try:
            data = json.loads(read_regular_text(path, f"{path}: manifest", MANIFEST_LIMIT))
        except FileNotFoundError:
            raise DataError(f"{root}: not a prepared dataset (no {MANIFEST_NAME}); {_what_it_is(root)}") from None
        except ValueError as exc:
            raise DataError(f"{path}: malformed manifest ({exc})") from None
        return cls._checked(root, path, data)

    @classmethod
    def _checked(cls, root: Path, path: Path, data) -> "PreparedDataset":
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise DataError(f"{path}: not a prepared-dataset manifest of format {MANIFEST_FORMAT} (re-run "
                            f"unet-train prepare --overwrite --out {root})")
        try:
            split = {part: [str(c) for c in data["split"][part]] for part in SPLITS}
            prepared = cls(root=root, source=Path(str(data["source"])), layout=str(data["layout"]), split=split,
                           split_settings=dict(data["split_settings"]), fingerprint=dict(data["fingerprint"]),
                           slices={str(k): dict(v) for k, v in dict(data.get("slices") or {}).items()},
                           volumes=None if data.get("volumes") is None else dict(data["volumes"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}: malformed manifest (missing or wrong {exc})") from None
        if not prepared.source.is_absolute():
            raise DataError(f"{path}: source must be an absolute path, got {prepared.source}")
        for entry in prepared.slices.values():
            if Path(str(entry.get("file", ""))).name != entry.get("file"):
                raise DataError(f"{path}: a slices entry names {entry.get('file')!r}; expected a file inside "
                                f"the dataset folder")
        return prepared

    def as_dict(self) -> dict:
        return {"format": MANIFEST_FORMAT, "source": str(self.source), "layout": self.layout,
                "fingerprint": self.fingerprint, "split_settings": self.split_settings, "split": self.split,
                "slices": self.slices, "volumes": self.volumes}

    def save(self) -> None:
        write_json(self.manifest_path, self.as_dict())

    def with_slices(self, image_size: int, counts: dict[str, int]) -> "PreparedDataset":
        return replace(self, slices={**self.slices, str(image_size): {"file": slices_name(image_size),
                                                                      "counts": counts}})

    def with_volumes(self, cached: bool) -> "PreparedDataset":
        return replace(self, volumes={"cached": cached, "cases": sum(len(v) for v in self.split.values())})

    # What a model reads.
    def slices_file(self, image_size: int) -> Path:
        """The 2D slices at ``image_size``; a clear error naming the command when not prepared."""
        entry = self.slices.get(str(image_size))
        if entry is None:
            have = ", ".join(f"{size} x {size}" for size in sorted(self.slices, key=int)) or "none"
            raise DataError(f"{self.root}: no 2D slices of {image_size} x {image_size} prepared (have: {have}); "
                            f"prepare them with: unet-train prepare --model 2d --out {self.root} "
                            f"--set data.image_size={image_size}")
        path = self.root / entry["file"]
        try:
            check_regular(path, f"{path}: prepared slices")  # before h5py opens it: a FIFO would hang it
        except FileNotFoundError:
            raise DataError(f"{path}: prepared slices missing although {self.manifest_path} lists them; prepare "
                            f"them again with: unet-train prepare --model 2d --overwrite --out {self.root}") from None
        return path

    def volume_cache(self) -> Path | None:
        """The 3D cache folder when prepared with one, else None (3D then reads the NIfTI source)."""
        if self.volumes and self.volumes.get("cached"):
            return self.root / VOLUMES_DIR
        return None

    def prepared_for(self) -> list[str]:
        return (["2d"] if self.slices else []) + (["3d"] if self.volumes else [])

    def raw(self, source: Path | None = None, max_voxels: int | None = None) -> RawDataset:
        """The raw cases: the recorded source, or ``source`` (data.source) where the data now live."""
        folder = Path(source) if source is not None else self.source
        if not folder.is_dir():
            how = "data.source" if source is not None else f"the source recorded in {self.manifest_path}"
            raise DataError(f"{folder}: raw dataset not found ({how}); if the data moved, pass "
                            f"--set data.source=DIR")
        return RawDataset.open(folder, **({} if max_voxels is None else {"max_voxels": max_voxels}))

    def describe(self, how: str = "") -> str:
        models = " and ".join(self.prepared_for()) or "no model yet"
        return (f"{self.root} ({how + '; ' if how else ''}{self.layout} from {self.source}; "
                f"{self.fingerprint.get('cases', '?')} cases, "
                f"split {len(self.split['train'])}/{len(self.split['val'])}/{len(self.split['test'])}; "
                f"prepared for {models})")


def _what_it_is(folder: Path) -> str:
    """What to do with a folder given as a prepared dataset that is none: a raw dataset is prepared
    into a folder of its own (prepare never writes into its source)."""
    from trainer.data.layouts import detect

    try:
        layout = detect(folder).name
    except DataError:
        return "make one with: unet-train prepare --src RAW --out DIR, then --data DIR"
    return (f"it is a raw {layout} dataset: prepare it with: unet-train prepare --src {folder} (it writes "
            f"{DEFAULT_PARENT / folder.name}), then --data that folder")


def find_dataset(given: Path | None) -> tuple[Path, str]:
    """The prepared dataset folder a command works on, and how it was found (for the log): the one
    named (``--data``, ``data.dataset`` or a run's own), else the last one prepared from the current
    folder."""
    if given is not None:
        return Path(given).absolute(), "named by --data, data.dataset or the run"
    try:
        record = json.loads(read_regular_text(LAST_PREPARED, f"{LAST_PREPARED}", 1 << 16))
        folder = Path(record["dataset"])
    except FileNotFoundError:
        raise DataError("no prepared dataset: run 'unet-train prepare --src RAW' first (it writes "
                        f"{DEFAULT_PARENT}/NAME), or pass --data DIR") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{LAST_PREPARED}: malformed record of the last prepared dataset ({exc}); pass "
                        f"--data DIR") from None
    if not folder.is_dir():
        raise DataError(f"{LAST_PREPARED} names {folder} as the last dataset prepared here, and it is gone; "
                        f"prepare again (unet-train prepare --src RAW) or pass --data DIR")
    return folder, f"the last one prepared here ({LAST_PREPARED})"


def remember_last(root: Path) -> None:
    """Record ``root`` as the last dataset prepared from the current folder."""
    write_json(LAST_PREPARED, {"dataset": str(Path(root).absolute())})


def prepared_dataset(settings: Settings) -> PreparedDataset:
    """The prepared dataset the settings name (data.dataset), else the last one prepared here."""
    return PreparedDataset.open(find_dataset(settings.data.dataset)[0])


def raw_source(settings: Settings) -> tuple[str, Path]:
    """The setting and the folder that hold the whole raw volumes: data.source where it is set,
    else the source the prepared dataset recorded."""
    if settings.data.source is not None:
        return "data.source", Path(settings.data.source)
    return "data.source", prepared_dataset(settings).source


def raw_dataset(settings: Settings, prepared: PreparedDataset | None = None) -> RawDataset:
    prepared = prepared or prepared_dataset(settings)
    return prepared.raw(settings.data.source, settings.data.max_voxels)


@dataclass(frozen=True)
class LabelledCase:
    case_id: str
    image: np.ndarray   # normalised (x, y, z, 4)
    labels: np.ndarray  # canonical labels (x, y, z) uint8
    geometry: Geometry


def split_cases_of(settings: Settings, split_name: str, dataset: RawDataset,
                   prepared: PreparedDataset | None = None) -> list[RawCase]:
    """The raw cases of one part of the prepared dataset's split, checked against the raw dataset."""
    prepared = prepared or prepared_dataset(settings)
    ids = prepared.split[split_name]
    by_id = dataset.by_id()
    missing = [i for i in ids if i not in by_id]
    if missing:  # e.g. data.source names another dataset: say so before loading a model
        raise DataError(f"{prepared.manifest_path}: split case {missing[0]} is not a labelled case of "
                        f"{dataset.describe()}")
    return [by_id[i] for i in ids]


def iter_cases(settings: Settings, split_name: str, limit: int | None,
               dataset: RawDataset | None = None) -> tuple[int, Iterator[LabelledCase]]:
    """The split's cases, read one at a time from the raw dataset (either layout)."""
    prepared = prepared_dataset(settings)
    dataset = dataset or raw_dataset(settings, prepared)
    cases = split_cases_of(settings, split_name, dataset, prepared)
    cases = cases[:limit] if limit else cases

    def read():
        for case in cases:
            image, labels, geometry = case.load()
            yield LabelledCase(case.case_id, image, labels, geometry)
    return len(cases), read()
