"""Slurm's time format (``sbatch --time``, a partition's MaxTime) in minutes: one reading for the
job script's checks (job.py) and the preflight (doctor.py)."""
from __future__ import annotations

import re

_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")


def minutes(text: str) -> float | None:
    """A Slurm time (``60``, ``1:30:00``, ``2-00:00``, ``UNLIMITED``) in minutes; None = no limit.

    With a day part, the fields are days-hours[:minutes[:seconds]]; without, a single number
    is minutes, two are minutes:seconds and three hours:minutes:seconds (sbatch --time)."""
    if text.upper() in ("UNLIMITED", "INFINITE", "NONE", ""):
        return None
    match = _TIME.fullmatch(text)
    if not match:
        raise ValueError(f"not a Slurm time: {text!r}")
    days, *rest = match.groups()
    fields = [int(part) for part in rest if part is not None]
    if days is not None:
        hours, mins, secs = (fields + [0, 0, 0])[:3]
        return int(days) * 1440 + hours * 60 + mins + secs / 60
    if len(fields) == 1:
        return fields[0]
    if len(fields) == 2:
        return fields[0] + fields[1] / 60
    return fields[0] * 60 + fields[1] + fields[2] / 60
