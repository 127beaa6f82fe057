"""nnU-Net v2 raw datasets: ``DatasetXXX_Name/`` with ``dataset.json``, ``imagesTr/`` and ``labelsTr/``.

The format (nnU-Net's documentation/dataset_format.md): each input channel of a case is its own file
``imagesTr/{CASE}_{XXXX}{file_ending}``, XXXX the four-digit channel index; the segmentation is
``labelsTr/{CASE}{file_ending}``; ``imagesTs/`` (optional) holds unlabelled cases. ``dataset.json`` has
``channel_names`` (index -> name; Decathlon's ``modality``), ``labels`` (name -> value, or name -> list
of values for region-based training, with ``regions_class_order``), ``numTraining`` and ``file_ending``.

nnU-Net's own brain-tumour datasets come in two forms (nnunetv2/dataset_conversion), both read here:

* Dataset001_BrainTumour, converted from Decathlon Task01 (convert_MSD_dataset.py): channels
  0 FLAIR, 1 T1w, 2 T1gd, 3 T2w; labels background 0, edema 1, non-enhancing tumor 2,
  enhancing tumour 3.
* Dataset137_BraTS21 (Dataset043_BraTS19 alike): channels 0 T1, 1 T1ce, 2 T2, 3 Flair, *not*
  Task01's order; the BraTS label files are rewritten 2 -> 1 (edema), 1 -> 2 (necrosis), 4 -> 3
  (enhancing) and described as regions: background 0, whole tumor [1, 2, 3], tumor core [2, 3],
  enhancing tumor [3].

Both store the Decathlon numbering (trainer.data.regions.DECATHLON) on disk. The channel order is
read from ``channel_names`` by name, never assumed; other label sets are refused (BraTS 2023+
NETC/SNFH/ET/RC 0-4, say). Files may be ``.nii`` or ``.nii.gz`` whatever ``file_ending`` says
(Dataset043's converter writes ``.nii`` under ``.nii.gz``); macOS ``._*`` files are ignored.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.config.settings import MODALITIES
from trainer.data.brats import BratsCase, check_labels, read_brats_case
from trainer.data.description import read_description as read_dataset_json
from trainer.data.layouts.base import InputCase, Layout, RawCase, dataset_json_keys, visible_files
from trainer.data.nifti import DEFAULT_MAX_VOXELS, Geometry, is_nifti_name, read_volume, strip_nifti_suffix
from trainer.data.normalize import zscore_brain
from trainer.data.regions import DECATHLON
from trainer.errors import DataError

CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>[0-9]{4})$")
DEFAULT_CHANNELS = (0, 1, 2, 3)  # no dataset.json at hand: Dataset001_BrainTumour's FLAIR, T1w, T1gd, T2w
# channel_names, lower-cased without punctuation -> our modality
CHANNEL_NAMES = {"flair": "flair", "t2flair": "flair", "t2f": "flair", "t1": "t1", "t1w": "t1", "t1n": "t1",
                 "t1ce": "t1ce", "t1gd": "t1ce", "t1c": "t1ce", "t2": "t2", "t2w": "t2"}
PLAIN_LABELS = {frozenset({1}), frozenset({2}), frozenset({3})}               # Dataset001_BrainTumour
REGION_LABELS = {frozenset({1, 2, 3}), frozenset({2, 3}), frozenset({3})}     # Dataset137_BraTS21
NOT_OEDEMA = re.compile(r"necro|ncr|netc|core", re.IGNORECASE)  # BraTS' own 1: not converted
KEYS = ("channel_names", "labels", "numTraining", "file_ending")
FILE_ENDINGS = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Description:
    """What unet-train takes from an nnU-Net dataset.json."""

    path: Path
    channels: tuple[int, ...]  # the channel index of flair, t1, t1ce, t2
    label_set: frozenset[int]
    num_training: int
    file_ending: str


class NnUNetLayout(Layout):
    name = "nnunet"
    title = "nnU-Net v2 raw (DatasetXXX_Name)"
    usual_model = "3d"
    convention = DECATHLON
    signature = "holds an nnU-Net v2 dataset.json (with 'channel_names' and 'file_ending')"
    absent = "no nnU-Net v2 dataset.json (with 'channel_names' and 'file_ending')"

    def matches(self, root: Path) -> bool:
        keys = dataset_json_keys(root)
        return bool(keys and keys & {"channel_names", "file_ending"})

    def cases(self, root: Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[RawCase, ...]:
        root = Path(root)
        description = read_description(root)
        images, labels = root / "imagesTr", root / "labelsTr"
        for folder in (images, labels):
            if not folder.is_dir():
                raise DataError(f"{folder}: not found (an nnU-Net raw dataset holds imagesTr/ and labelsTr/ beside "
                                f"dataset.json)")
        groups = _channel_groups(images, strict=True)
        label_files: dict[str, Path] = {}
        for path in visible_files(labels):
            case = strip_nifti_suffix(path.name)
            if case in label_files:
                raise DataError(f"{path}: second label file for case {case!r} (already have {label_files[case].name})")
            label_files[case] = path
        if not label_files:
            raise DataError(f"{labels}: no label files (expected CASE{description.file_ending} for each case "
                            f"in imagesTr)")
        unlabelled = sorted(set(groups) - set(label_files))
        if unlabelled:
            raise DataError(f"{labels}: no label file for case {unlabelled[0]!r}, whose channel files are in "
                            f"{images} (expected {labels / (unlabelled[0] + description.file_ending)})")
        if len(label_files) != description.num_training:
            raise DataError(f"{description.path}: numTraining is {description.num_training}, but {labels} holds "
                            f"{len(label_files)} labelled case(s)")
        return tuple(RawCase(case, self.name, _in_order(case, groups.get(case, {}), images, description.channels),
                             label_files[case], description.label_set, max_voxels) for case in sorted(label_files))

    def read(self, case: RawCase, normalise: bool = True) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
        image, geometry = _read_channels(case.case_id, case.images, case.max_voxels)
        labels = None
        if case.label is not None:
            volume = read_volume(case.label, max_voxels=case.max_voxels)
            if volume.array.shape != image.shape[:3]:
                raise DataError(f"{case.label}: label shape {volume.array.shape} differs from image shape "
                                f"{image.shape[:3]}")
            labels = DECATHLON.canonical(check_labels(volume.array, case.label_set, case.label))
        return (zscore_brain(image) if normalise else image), labels, geometry

    def input_cases(self, folder: Path, claimed: frozenset[Path] = frozenset()) -> list[InputCase]:
        """Channel-file groups in ``folder`` (for an nnU-Net dataset folder: in its imagesTs), in the channel
        order of the dataset.json of the dataset around them, or Dataset001_BrainTumour's."""
        folder = Path(folder)
        if self.matches(folder):
            channels = channel_order(folder)
            folder = folder / "imagesTs"
            if not folder.is_dir():
                return []
        else:
            channels = channel_order(folder.parent) if self.matches(folder.parent) else DEFAULT_CHANNELS
        return [InputCase(case, self.name, _in_order(case, by_channel, folder, channels))
                for case, by_channel in _channel_groups(folder, claimed=claimed).items()]

    def input_case(self, path: Path) -> InputCase | None:
        path = Path(path)
        if path.is_dir() or not is_nifti_name(path.name):
            return None
        match = CHANNEL_FILE.match(strip_nifti_suffix(path.name))
        if not match:
            return None
        folder = path.parent
        channels = channel_order(folder.parent) if self.matches(folder.parent) else DEFAULT_CHANNELS
        by_channel = _channel_groups(folder).get(match.group("case"), {})
        return InputCase(match.group("case"), self.name, _in_order(match.group("case"), by_channel, folder, channels))

    def read_input(self, case: InputCase, max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[np.ndarray, Geometry]:
        image, geometry = _read_channels(case.name, case.paths, max_voxels)
        return zscore_brain(image), geometry


def read_description(root: Path) -> Description:
    """Parse and check an nnU-Net v2 ``dataset.json`` for a brain-tumour dataset unet-train can read."""
    path, meta = _read_meta(root)
    for key in KEYS:
        if key not in meta:
            raise DataError(f"{path}: missing key '{key}' (nnU-Net v2 needs {', '.join(KEYS)})")
    if "dataset" in meta:
        raise DataError(f"{path}: lists its files under 'dataset'; unet-train reads an nnU-Net raw dataset from "
                        f"imagesTr/ and labelsTr/ only (copy or link the files there)")
    ending = meta["file_ending"]
    if ending not in FILE_ENDINGS:
        raise DataError(f"{path}: file_ending {json.dumps(ending)}: unet-train reads NIfTI "
                        f"({' or '.join(FILE_ENDINGS)})")
    count = meta["numTraining"]
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise DataError(f"{path}: 'numTraining' must be a positive whole number, got {json.dumps(count)}")
    return Description(path, _channels(meta["channel_names"], path), _label_set(meta["labels"], path), count,
                       ending)


def channel_order(root: Path) -> tuple[int, ...]:
    """The channel index of flair, t1, t1ce, t2 in the nnU-Net dataset at ``root`` (its channel_names only)."""
    path, meta = _read_meta(root)
    if "channel_names" not in meta:
        raise DataError(f"{path}: missing key 'channel_names'")
    return _channels(meta["channel_names"], path)


def _read_meta(root: Path) -> tuple[Path, dict]:
    return read_dataset_json(root, "an nnU-Net v2 raw dataset folder, DatasetXXX_Name")


def _channels(names, path: Path) -> tuple[int, ...]:
    """channel_names -> the channel index of each of flair, t1, t1ce, t2, told by name."""
    if not isinstance(names, dict):
        raise DataError(f"{path}: 'channel_names' must map channel numbers to names, got {json.dumps(names)}")
    try:
        by_index = {int(key): str(value) for key, value in names.items()}
    except (TypeError, ValueError):
        raise DataError(f"{path}: 'channel_names' must map channel numbers to names") from None
    if sorted(by_index) != list(range(len(MODALITIES))):
        raise DataError(f"{path}: 'channel_names' has channels {sorted(by_index)}; expected {len(MODALITIES)} "
                        f"channels 0-{len(MODALITIES) - 1} ({', '.join(MODALITIES)})")
    index_of: dict[str, int] = {}
    for index, name in sorted(by_index.items()):
        modality = CHANNEL_NAMES.get(re.sub(r"[^a-z0-9]", "", name.lower()))
        if modality is None or modality in index_of:
            raise DataError(f"{path}: channel_names {json.dumps(names)}: cannot tell which channel is "
                            f"{', '.join(MODALITIES)} (expected names such as FLAIR, T1w, T1gd, T2w or T1, T1ce, "
                            f"T2, Flair)")
        index_of[modality] = index
    return tuple(index_of[m] for m in MODALITIES)


def _label_set(labels, path: Path) -> frozenset[int]:
    """Accept the two brain-tumour forms (module docstring); the files then hold DECATHLON's 0-3."""
    expected = ("expected nnU-Net's brain-tumour labels: background 0, edema 1, non-enhancing tumor 2, enhancing "
                "tumour 3 (Dataset001_BrainTumour), or the regions whole tumor [1, 2, 3], tumor core [2, 3], "
                "enhancing tumor [3] (Dataset137_BraTS21)")
    if not isinstance(labels, dict):
        raise DataError(f"{path}: 'labels' must map names to values, got {json.dumps(labels)}; {expected}")
    background, classes = [], {}
    for name, value in labels.items():
        values = value if isinstance(value, list) else [value]
        if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
            raise DataError(f"{path}: labels: {name!r} is {json.dumps(value)}; {expected}")
        if values == [0]:
            background.append(name)
        else:
            classes[frozenset(values)] = name
    if len(background) != 1 or len(classes) != len(labels) - 1 or set(classes) not in (PLAIN_LABELS, REGION_LABELS):
        raise DataError(f"{path}: labels {json.dumps(labels)}: {expected}")
    first = classes.get(frozenset({1}))
    if first is not None and NOT_OEDEMA.search(first):
        raise DataError(f"{path}: label 1 is {first!r}; {expected} (BraTS' own 1 = necrotic core must be "
                        f"renumbered as nnU-Net's Dataset137_BraTS21 conversion does)")
    return DECATHLON.label_set


def _channel_groups(folder: Path, claimed: frozenset[Path] = frozenset(),
                    strict: bool = False) -> dict[str, dict[int, Path]]:
    """case -> {channel: file} for the channel files in ``folder`` (``strict``: any other NIfTI is refused)."""
    groups: dict[str, dict[int, Path]] = {}
    for path in visible_files(folder):
        if path in claimed:
            continue
        match = CHANNEL_FILE.match(strip_nifti_suffix(path.name))
        if not match:
            if strict:
                raise DataError(f"{path}: not an nnU-Net channel file (expected CASE_0000.nii.gz ... "
                                f"CASE_0003.nii.gz)")
            continue
        case, channel = match.group("case"), int(match.group("channel"))
        by_channel = groups.setdefault(case, {})
        if channel in by_channel:
            raise DataError(f"{path}: second file for channel {channel:04d} of case {case!r} "
                            f"(already have {by_channel[channel].name})")
        by_channel[channel] = path
    return groups


def _in_order(case: str, by_channel: dict[int, Path], folder: Path, channels: tuple[int, ...]) -> tuple[Path, ...]:
    """The case's four channel files in the order flair, t1, t1ce, t2."""
    if sorted(by_channel) != sorted(channels):
        have = ", ".join(f"_{c:04d}" for c in sorted(by_channel)) or "none"
        names = ", ".join(MODALITIES[channels.index(c)] for c in sorted(channels))
        raise DataError(f"{folder}: case {case!r} has channel files {have}; expected exactly _0000 ... _0003 "
                        f"({names})")
    return tuple(by_channel[c] for c in channels)


def _read_channels(case: str, paths: tuple[Path, ...], max_voxels: int) -> tuple[np.ndarray, Geometry]:
    """(x, y, z, 4) float32 image from the four channel files (shapes checked), and its geometry."""
    found = BratsCase(case, Path(paths[0]).parent, dict(zip(MODALITIES, paths)), None)
    image, _, first = read_brats_case(found, MODALITIES, max_voxels)
    return image, first.geometry
