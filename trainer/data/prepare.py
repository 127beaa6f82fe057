"""``unet-train prepare``: check a raw dataset (either layout) and write what a model trains on.

The 2D model trains on slices (one HDF5 file), the 3D model on volumes (a checked split and
an optional cache of normalised arrays). Either comes from either layout; the split records
the raw folder and its layout, so later commands find the whole volumes without being told.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer.config.settings import DataSettings, Settings
from trainer.data.datasets import PREPARED, RawDataset, detect_layout
from trainer.data.split import split_path_for
from trainer.errors import UserError

DEFAULT_MODEL = {"brats": "2d", "decathlon": "3d"}  # what each layout was prepared for before either took both


@dataclass(frozen=True)
class PrepareChoice:
    src: Path
    out: Path | None
    layout: str | None = None  # --format; None: detected from the folder
    model: str | None = None   # --model; None: the layout's usual model
    workers: int = 0
    overwrite: bool = False


def prepare(settings: Settings, choice: PrepareChoice, progress: bool = True) -> str:
    """Prepare and return the line that says what was written."""
    layout = detect_layout(choice.src)
    if choice.layout is not None and choice.layout != layout:
        what = "holds dataset.json" if layout == "decathlon" else "has no dataset.json"
        raise UserError(f"--format {choice.layout}: {choice.src} {what}, so it is a {layout} folder (drop --format, "
                        f"which is detected, or point --src at the {choice.layout} folder)")
    model = choice.model or DEFAULT_MODEL[layout]
    dataset = RawDataset.open(choice.src, settings.data.max_voxels)
    slices = PREPARED[model].kind == "slices"
    data = settings.data
    if choice.out is not None:
        data = data.model_copy(update={"slices_h5" if slices else "cache_dir": choice.out})
    counts = prepare_dataset(dataset, model, data, choice.workers, choice.overwrite, progress)
    if slices:
        return (f"wrote {data.slices_h5} from {dataset.describe()} (slices: "
                + ", ".join(f"{k} {v}" for k, v in counts.items()) + f"); split: {split_path_for(data.slices_h5)}")
    return (f"checked {sum(counts.values())} case(s) of {dataset.describe()} for the 3D model; "
            f"cache: {data.cache_dir}; split: {data.decathlon_split}")


def prepare_dataset(dataset: RawDataset, model: str, data: DataSettings, workers: int = 0, overwrite: bool = False,
                    progress: bool = True) -> dict[str, int]:
    """Write what ``model`` trains on to the paths in ``data``: slices to ``slices_h5``, or the checked
    volumes' split to ``decathlon_split`` (and their cache to ``cache_dir`` when set); returns the
    count per split part (slices or cases)."""
    if PREPARED[model].kind == "slices":
        from trainer.data.prepare2d import PrepareRequest, prepare_slices

        request = PrepareRequest(out=Path(data.slices_h5), image_size=data.image_size, split=data.split,
                                 workers=workers, overwrite=overwrite)
        return prepare_slices(dataset, request, progress)
    from trainer.data.volumes import prepare_volumes

    split = prepare_volumes(dataset, data.cache_dir, data.split, data.decathlon_split, progress, overwrite)
    return {part: len(cases) for part, cases in split.items()}
