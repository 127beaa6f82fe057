"""``prepare``'s library: check a raw dataset (either layout) and write a prepared dataset folder.

The 2D model trains on slices (one HDF5 file per image size), the 3D model on volumes (an
optional cache of normalised arrays). Either comes from either layout, into one folder whose
manifest (trainer.data.prepared) records the source, its fingerprint and the one split both share.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from trainer.config.kinds import kind_of
from trainer.config.settings import DataSettings, Settings
from trainer.data.datasets import RawDataset
from trainer.data.layouts import named
from trainer.data.prepared import (DEFAULT_PARENT, MANIFEST_NAME, VOLUMES_DIR, PreparedDataset, remember_last,
                                   slices_name, source_fingerprint, split_settings_dict)
from trainer.data.split import split_cases
from trainer.errors import UserError
from trainer.fsutil import is_within

FILE_SUFFIXES = (".h5", ".hdf5", ".json", ".npy", ".npz")  # an --out that names a file, as before folders


@dataclass(frozen=True)
class PrepareChoice:
    src: Path | None
    out: Path | None
    layout: str | None = None  # --format; None: detected from the folder
    model: str | None = None   # --model; None: the layout's usual model
    workers: int = 0
    overwrite: bool = False


def prepare(settings: Settings, choice: PrepareChoice, progress: bool = True) -> str:
    """Prepare, record the folder as the last one prepared here, and return the line that says what
    was written."""
    src = choice.src if choice.src is not None else settings.data.source
    if src is None and choice.out is not None and (Path(choice.out) / MANIFEST_NAME).is_file():
        src = PreparedDataset.open(Path(choice.out)).source  # the other model's data for a folder prepared before
    if src is None:
        raise UserError("--src: required (the raw dataset folder: BraTS, Decathlon or nnU-Net raw), or set "
                        "data.source")
    dataset = RawDataset.open(src, settings.data.max_voxels)
    if choice.layout is not None and choice.layout != dataset.layout:
        what = named(dataset.layout).signature
        raise UserError(f"--format {choice.layout}: {src} {what}, so it is a {dataset.layout} folder (drop "
                        f"--format, which is detected, or point --src at the {choice.layout} folder)")
    model = choice.model or named(dataset.layout).usual_model
    out = Path(choice.out if choice.out is not None else DEFAULT_PARENT / Path(src).absolute().name).absolute()
    if out.suffix.lower() in FILE_SUFFIXES:
        raise UserError(f"--out {choice.out}: prepare writes a dataset folder (prepared.json, the 2D slices, the 3D "
                        f"cache), not a {out.suffix} file; name a folder, e.g. --out {out.with_suffix('')}")
    prepared = prepare_into(dataset, out, model, settings.data, choice.workers, choice.overwrite, progress)
    remember_last(out)
    if kind_of(model).slices:
        counts = prepared.slices[str(settings.data.image_size)]["counts"]
        what = (f"2D slices {settings.data.image_size} x {settings.data.image_size} ("
                + ", ".join(f"{k} {v}" for k, v in counts.items()) + ")")
    else:
        cached = "a normalised cache" if prepared.volume_cache() else "no cache (data.cache_volumes: false)"
        what = f"3D volumes, {prepared.volumes['cases']} case(s) checked, {cached}"
    split = prepared.split
    line = (f"prepared {out}: {what} from {dataset.describe()}; split "
            f"{len(split['train'])}/{len(split['val'])}/{len(split['test'])} cases (train/val/test); "
            f"train with: unet-train train --model {model} --data {out}")
    if not split["train"] or not split["val"]:
        line += (f"\nwarning: {len(dataset.cases)} labelled case(s) leave no training or no validation case: "
                 f"train needs at least one of each (data.split's fractions, or more cases)")
    return line


def prepare_into(dataset: RawDataset, out: Path, model: str, data: DataSettings, workers: int = 0,
                 overwrite: bool = False, progress: bool = True) -> PreparedDataset:
    """Write what ``model`` trains on into the dataset folder ``out`` and update its manifest.

    A folder prepared earlier from the same cases keeps its split, and its other model's data; a
    folder of other cases, or a split asked with other fractions or seed, is refused unless
    ``overwrite`` (which then starts the folder afresh). A folder that is not a prepared dataset is
    never written into, and neither is the raw dataset."""
    out = Path(out).absolute()
    _refuse_overlap(dataset.root, out)
    fingerprint = source_fingerprint(dataset)
    wanted = split_settings_dict(data.split)
    existing, replaced = _existing(out), None
    if existing is not None:
        problem = _mismatch(existing, dataset, fingerprint, wanted)
        if problem and not overwrite:
            raise UserError(f"{out}: {problem}; prepare into another --out, or pass --overwrite to start this "
                            f"folder afresh")
        if problem:  # afresh, but only once the new data are written: a failure keeps the old folder
            existing, replaced = None, existing
        else:  # the same cases, perhaps moved: the source is where they are now
            existing = replace(existing, source=dataset.root.absolute())
    if existing is None:
        split = split_cases([c.case_id for c in dataset.cases], data.split.val_fraction, data.split.test_fraction,
                            data.split.seed)
        existing = PreparedDataset(root=out, source=dataset.root.absolute(), layout=dataset.layout, split=split,
                                   split_settings=wanted, fingerprint=fingerprint)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        prepared = _write_model_data(existing, dataset, model, data, workers, overwrite, progress)
        if replaced is not None:
            _remove_stale(replaced, prepared)
        prepared.save()
    except BaseException:
        if created:  # a failed first prepare leaves no folder behind (the writers left no partial file)
            shutil.rmtree(out, ignore_errors=True)
        raise
    return prepared


def _write_model_data(prepared: PreparedDataset, dataset: RawDataset, model: str, data: DataSettings, workers: int,
                      overwrite: bool, progress: bool) -> PreparedDataset:
    if kind_of(model).slices:
        from trainer.data.prepare2d import PrepareRequest, prepare_slices

        request = PrepareRequest(out=prepared.root / slices_name(data.image_size), split=prepared.split,
                                 image_size=data.image_size, workers=workers, overwrite=overwrite)
        return prepared.with_slices(data.image_size, prepare_slices(dataset, request, progress))
    from trainer.data.volumes import prepare_volumes

    cache = prepared.root / VOLUMES_DIR if data.cache_volumes else None
    prepare_volumes(dataset, cache, progress, overwrite)
    return prepared.with_volumes(cached=cache is not None)


def _refuse_overlap(source: Path, out: Path) -> None:
    """The prepared folder never lies inside the raw dataset, nor holds it (by the folders
    themselves, not their spelling)."""
    if is_within(out, source):
        raise UserError(f"--out {out}: inside the raw dataset {source}; prepare writes nothing into its input, "
                        f"choose a folder outside it")
    if is_within(source, out):
        raise UserError(f"--out {out}: holds the raw dataset {source}; choose a folder of its own")


def _existing(out: Path) -> PreparedDataset | None:
    if not out.exists():
        return None
    if not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder (expected a prepared-dataset folder)")
    if (out / MANIFEST_NAME).exists():
        return PreparedDataset.open(out)
    if any(out.iterdir()):
        raise UserError(f"--out {out}: a folder that is not a prepared dataset (no {MANIFEST_NAME}) and not "
                        f"empty; prepare writes only into a new or empty folder, or into one it prepared")
    return None


def _mismatch(existing: PreparedDataset, dataset: RawDataset, fingerprint: dict, wanted: dict) -> str | None:
    if existing.fingerprint != fingerprint:
        return (f"prepared from other cases ({existing.fingerprint.get('cases')} case(s) of {existing.source}; "
                f"--src has {fingerprint['cases']} of {dataset.root})")
    if existing.split_settings != wanted:
        return (f"its split was made with {_show(existing.split_settings)}, this prepare asks "
                f"{_show(wanted)} (data.split)")
    return None


def _remove_stale(old: PreparedDataset, new: PreparedDataset) -> None:
    """Remove what an earlier prepare wrote into this folder (and only that) and the new one did not
    write again: it was made from other cases or another split."""
    kept = {entry["file"] for entry in new.slices.values()}
    for entry in old.slices.values():
        if entry["file"] not in kept:
            (old.root / entry["file"]).unlink(missing_ok=True)
    if new.volumes is None and (old.root / VOLUMES_DIR).is_dir():
        shutil.rmtree(old.root / VOLUMES_DIR)


def _show(split: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in split.items())
