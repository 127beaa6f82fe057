"""``unet-train prepare``: check a raw dataset (either layout) and write what a model trains on.

The 2D model trains on slices (one HDF5 file), the 3D model on volumes (a checked split and
an optional cache of normalised arrays). Either comes from either layout; the split records
the raw folder and its layout, so later commands find the whole volumes without being told.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer.config.settings import Settings
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
    data = settings.data
    if PREPARED[model].kind == "slices":
        from trainer.data.prepare2d import PrepareRequest, prepare_slices

        request = PrepareRequest(out=choice.out or data.slices_h5, image_size=data.image_size, split=data.split,
                                 workers=choice.workers, overwrite=choice.overwrite)
        counts = prepare_slices(dataset, request, progress)
        return (f"wrote {request.out} from {dataset.describe()} (slices: "
                + ", ".join(f"{k} {v}" for k, v in counts.items()) + f"); split: {split_path_for(request.out)}")
    from trainer.data.volumes import prepare_volumes

    cache = choice.out or data.cache_dir
    split = prepare_volumes(dataset, cache, data.split, data.decathlon_split, progress, choice.overwrite)
    return (f"checked {sum(len(v) for v in split.values())} case(s) of {dataset.describe()} for the 3D model; "
            f"cache: {cache}; split: {data.decathlon_split}")
