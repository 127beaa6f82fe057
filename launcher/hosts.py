"""Host names from the command line, validated before anything runs."""
from __future__ import annotations

from trainer.config.settings import HOST_NAME
from trainer.errors import UserError


def parse_hosts(text: str, option: str = "--hosts") -> tuple[str, ...]:
    """'node1,node2' -> ('node1', 'node2'); rejects shell metacharacters, spaces, duplicates."""
    if text is None or not text.strip():
        raise UserError(f"{option}: expected a comma-separated list of host names, got nothing")
    hosts = tuple(part.strip() for part in text.split(","))
    for host in hosts:
        if not HOST_NAME.fullmatch(host):
            raise UserError(f"{option}: invalid host {host!r}: only letters, digits, '.' and '-' are allowed "
                            f"(no spaces, quotes or shell characters)")
    duplicates = sorted({h for h in hosts if hosts.count(h) > 1})
    if duplicates:
        raise UserError(f"{option}: host {duplicates[0]!r} is listed twice")
    return hosts
