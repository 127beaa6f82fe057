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
