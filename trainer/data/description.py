"""A dataset's ``dataset.json`` (Decathlon's and nnU-Net v2's), read once the same way for both."""
from __future__ import annotations

import json
from pathlib import Path

from trainer.errors import DataError, UserError
from trainer.fsutil import read_regular_text

DESCRIPTION_LIMIT = 64 << 20  # Decathlon Task01's is 80 kB; a file past this is not a description


def read_description(root: Path, expected: str) -> tuple[Path, dict]:
    """(path, the JSON object) of ``root/dataset.json``: a regular file of bounded size holding a
    JSON object; each problem is one DataError naming the file (``expected`` says what folder it
    should be, e.g. "the Decathlon Task01_BrainTumour folder")."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        raise DataError(f"{path}: not found (expected {expected})")
    try:
        text = read_regular_text(path, f"{path}", DESCRIPTION_LIMIT)
    except UserError as exc:
        raise DataError(str(exc)) from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty; expected the dataset description of {expected}")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return path, meta
