"""Horovod Elastic's host-discovery script, rendered from the inventory.

``horovodrun --host-discovery-script`` runs the script on the first host about once a second
and reads ``host:slots`` lines; it scales the job down when a host disappears from them and up
when one appears. So the script lists every inventory host that answers a live SSH check right
now: a lost host drops out, a host that answers again is listed again and can rejoin (after
horovodrun's blacklist cooldown, ``cluster.elastic_cooldown_s``).

The check uses the launcher's own SSH options (user, key, port, host-key policy, BatchMode, bounded
waits), runs for all hosts in parallel (one dead host costs ConnectTimeout once, not per host), and
always exits 0: horovodrun treats a failing script as a broken job. Host names are validated
before this is rendered, and every value is shell-quoted anyway: horovodrun runs the script
through ``/bin/sh``.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path

from launcher.ssh.inventory import ssh_options, ssh_user
from launcher.ssh.plan import DISCOVERY_SCRIPT
from trainer.config.settings import ClusterSettings
from trainer.fsutil import atomic_file

__all__ = ["DISCOVERY_SCRIPT", "render_discovery_script", "write_discovery_script"]


def render_discovery_script(run: str, hosts: tuple[str, ...], slots_per_host: int, cluster: ClusterSettings) -> str:
    ssh = ["ssh", "-p", str(cluster.ssh_port), "-l", ssh_user(cluster), *ssh_options(cluster)]
    if cluster.ssh_key:
        ssh += ["-i", str(cluster.ssh_key)]
    lines = [
        "#!/bin/sh",
        f"# Rendered by `unet-train distributed --elastic` for run {run}; do not edit.",
        "# horovodrun runs it on the first host about once a second and reads host:slots lines.",
        "# A host is listed while it answers a live SSH check (same user, key, port and host-key",
        "# options as the launcher), so a lost host drops out and a host that answers again rejoins.",
        "up() {  # up HOST SLOTS: print HOST:SLOTS if HOST answers over SSH now",
        f"  if {shlex.join(ssh)} -- \"$1\" true </dev/null >/dev/null 2>&1; then",
        "    echo \"$1:$2\"",
        "  fi",
        "}",
        *(f"up {shlex.quote(host)} {int(slots_per_host)} &" for host in hosts),
        "wait",
        "exit 0  # no host answering is an empty list, not an error: horovodrun waits for hosts",
        "",
    ]
    return "\n".join(lines)


def write_discovery_script(path: Path, text: str) -> Path:
    """Written atomically and executable (horovodrun runs it by path); rsync -a keeps the mode."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    os.chmod(path, 0o755)
    return path
