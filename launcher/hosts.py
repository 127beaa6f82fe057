"""Host names from the command line, validated before anything runs."""
from __future__ import annotations

from trainer.config.settings import check_host_names
from trainer.errors import UserError


def parse_hosts(text: str, option: str = "--hosts") -> tuple[str, ...]:
    """'node1,node2' -> ('node1', 'node2'); rejects shell metacharacters, spaces, duplicates."""
    if text is None or not text.strip():
        raise UserError(f"{option}: expected a comma-separated list of host names, got nothing")
    try:
        return check_host_names(tuple(part.strip() for part in text.split(",")))
    except ValueError as exc:
        raise UserError(f"{option}: {exc}") from None


def hosts_and_slots(text: str, slots_per_host: int | None, option: str = "--hosts") -> tuple[str, int]:
    """horovodrun's 'node1:4,node2:4' -> ('node1,node2', 4); plain names keep --slots-per-host
    (default 1). Every host runs the same number of ranks, so the counts must agree."""
    names, counts, with_slots = [], set(), 0
    for part in (text or "").split(","):
        name, sep, slots = part.strip().partition(":")
        names.append(name)
        if sep:
            if not slots.isdigit() or int(slots) < 1:
                raise UserError(f"{option}: {part.strip()!r}: expected host:slots with slots >= 1, e.g. node1:4")
            counts.add(int(slots))
            with_slots += 1
    if not counts:
        return text, slots_per_host or 1
    if len(counts) > 1 or with_slots != len(names):
        raise UserError(f"{option}: every host must have the same number of slots (got {text!r}); "
                        f"write node1:4,node2:4, or plain names with --slots-per-host N")
    slots = counts.pop()
    if slots_per_host is not None and slots_per_host != slots:
        raise UserError(f"{option}: {text!r} gives {slots} slots per host, but --slots-per-host is {slots_per_host}")
    return ",".join(names), slots
