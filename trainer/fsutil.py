"""Filesystem helpers that never leave half-written output behind."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from trainer.errors import UserError


def refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise UserError(f"{path}: output already exists (pass --overwrite to replace it)")


def open_regular(path: Path, label: str | None = None) -> tuple[BinaryIO, os.stat_result]:
    """Open ``path`` for reading only if it is a regular file, and return it with its status.

    The check is made on the open descriptor (what is read is what was checked, a symlink
    included), and the open itself cannot block: a FIFO would hang a plain ``open`` until a writer
    appears, and /dev/zero would feed a reader for ever."""
    label = label or str(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"{label}: not a regular file ({_kind(info.st_mode)}); expected a file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), info
    except BaseException:
        os.close(fd)
        raise


def read_regular_text(path: Path, label: str | None = None, limit: int = 64 << 20) -> str:
    """The text of a regular file of at most ``limit`` bytes (see :func:`open_regular`)."""
    handle, _ = open_regular(path, label)
    with handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"{label or path}: larger than {limit:,} bytes; expected a small text file")
    return data.decode("utf-8", errors="replace")


def check_regular(path: Path, label: str | None = None, limit: int | None = None) -> os.stat_result:
    """Raise UserError unless ``path`` is a regular file of at most ``limit`` bytes (see
    :func:`open_regular`; a missing file raises FileNotFoundError). For files that another library
    opens next (TensorFlow, h5py, OpenVINO): a FIFO would hang it, /dev/zero feed it for ever."""
    handle, info = open_regular(path, label)
    handle.close()
    if limit is not None and info.st_size > limit:
        raise UserError(f"{label or path}: {info.st_size:,} bytes, larger than the {limit:,} expected of this file")
    return info


def read_regular_json(path: Path, label: str | None = None, limit: int = 1 << 20) -> Any:
    """The JSON in a regular file of at most ``limit`` bytes (ValueError when it is not JSON)."""
    return json.loads(read_regular_text(path, label, limit))


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a plain file"


@contextlib.contextmanager
def atomic_dir(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``final``; on success it replaces ``final``, else it is removed."""
    final = Path(final)
    refuse_existing(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700; give the usual folder mode
        yield tmp
        if final.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, trash / final.name)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp path beside ``final`` (same suffix); rename over ``final`` only on success."""
    final = Path(final)
    refuse_existing(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial" + "".join(final.suffixes),
                                dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, data: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    """Rows under ``columns`` (a key a row lacks is an empty cell), written atomically."""
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def folder_identity(path: Path | str) -> tuple[int, int] | None:
    """(device, inode) of what ``path`` names, following symlinks; None when it does not exist."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def is_within(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it, decided by the folders themselves (device
    and inode of ``path`` and each of its parents), not by spelling: symlinks, bind mounts, ``..``
    and ``//`` all resolve to the folder they name. A ``path`` that does not exist yet is judged by
    its nearest existing parent."""
    target = folder_identity(folder)
    if target is None:
        return False
    current = Path(os.path.realpath(path))
    while True:
        if folder_identity(current) == target:
            return True
        if current.parent == current:
            return False
        current = current.parent
