"""Outputs never touch inputs: the output folder of ``predict -o`` / ``evaluate --out``, checked
before a model is loaded.

Refused (UserError, exit 2): an output that exists and is not a folder; one that is, lies inside,
or contains an input folder (``predict -i D -o D`` once replaced every input image by its mask,
``-o labelsTr`` the ground truth); an output file that is an input file; a folder that cannot be
written. Folders are compared as the file system sees them, by (device, inode) of the folder and
of each of its parents, so no spelling gets through: a symlink, a bind mount, ``..`` or ``//``.
``os.path.realpath`` only finds the folders to stat; what decides is their identity.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Optional

from trainer.errors import UserError

FileId = tuple[int, int]


def _identity(path: Path) -> Optional[FileId]:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _existing_chain(path: Path) -> list[tuple[Path, FileId]]:
    """(folder, identity) of ``path`` (where it exists) and of every parent up to the root."""
    real = Path(os.path.realpath(path))
    chain = []
    for folder in (real, *real.parents):
        found = _identity(folder)
        if found is not None:
            chain.append((folder, found))
    return chain


def check_output_folder(out: Path, input_folders: Iterable[Path], flag: str = "-o",
                        input_files: Iterable[Path] = (), output_files: Iterable[Path] = ()) -> None:
    """Raise UserError unless ``out`` can be a folder of new files that no input lives in.

    ``input_folders``: every folder an input is read from; ``input_files``/``output_files``: an output
    file that exists must not be one of the input files (the same inode, a hard link or a symlink)."""
    out = Path(out)
    if os.path.lexists(out) and not out.is_dir():
        raise UserError(f"{flag} {out}: exists and is not a folder; expected a folder for the outputs")
    out_chain = _existing_chain(out)
    out_id = _identity(out)
    folders = {folder: found for folder in dict.fromkeys(Path(f) for f in input_folders)
               if (found := _identity(folder)) is not None}
    for folder, found in folders.items():
        if found == out_id:
            raise UserError(f"{flag} {out}: is the input folder {folder}; the outputs would replace the inputs "
                            f"(choose another folder)")
    for folder, found in folders.items():
        if any(found == parent for _, parent in out_chain):
            raise UserError(f"{flag} {out}: lies inside the input folder {folder}; nothing is written into an "
                            f"input folder (choose a folder outside it)")
    for folder in folders if out_id is not None else ():
        if any(found == out_id for _, found in _existing_chain(folder)):
            raise UserError(f"{flag} {out}: contains the input folder {folder}; nothing is written around the "
                            f"inputs (choose a folder outside it)")
    inputs = {found: Path(path) for path in input_files if (found := _identity(Path(path))) is not None}
    for path in output_files:
        source = inputs.get(_identity(Path(path)))  # None when the output does not exist yet
        if source is not None:
            raise UserError(f"{flag} {out}: the output {path} is the input {source}; it would be overwritten")
    _check_writable(out, out_chain, flag)


def _check_writable(out: Path, chain: list[tuple[Path, FileId]], flag: str) -> None:
    """A folder can be made in the nearest existing parent (or a file in ``out``): tried, then removed.
    Permission bits say nothing to root; a read-only mount, /proc or a file as parent only show on use."""
    if not chain:
        raise UserError(f"{flag} {out}: no parent folder of it exists")
    nearest = chain[0][0]
    if not nearest.is_dir():
        raise UserError(f"{flag} {out}: {nearest} is not a folder; expected a folder for the outputs")
    try:
        probe = tempfile.mkdtemp(prefix=".unet-train-probe-", dir=nearest)
        os.rmdir(probe)
    except OSError as exc:
        raise UserError(f"{flag} {out}: cannot be written ({exc.strerror or exc} in {nearest})") from None
