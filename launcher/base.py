"""What every launcher does.

A launcher starts a run's processes on machines it does not own: SSH hosts driven by Ansible
(:mod:`launcher.ssh`) or a Slurm job (:mod:`launcher.slurm`). Each entry point returns the
process exit code, so the command only dispatches; which launcher a command gets is decided
above the launchers (``trainer.commands.distributed.open_launcher``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from trainer.errors import UserError


SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the checkout the launchers sync or point jobs at


class LaunchError(UserError):
    exit_code = 1


@dataclass(frozen=True)
class LaunchRequest:
    hosts: str = ""
    mode: str = "ps"
    ps_hosts: str | None = None
    dry_run: bool = False
    slots_per_host: int = 1
    controller: str = "gloo"
    elastic: bool = False            # Horovod Elastic: horovodrun with a host-discovery script
    min_hosts: int | None = None     # elastic: default 1
    max_hosts: int | None = None     # elastic: default every host in --hosts
    scheduler_given: bool = False    # --scheduler named on the command line


class Launcher(Protocol):
    def dry_run(self) -> int:
        """Print what would be run (inventory or job script, every command); change nothing."""

    def launch(self) -> int:
        """Start the run, stream its output until it ends; the run's exit code."""

    def stop(self) -> int:
        """Stop every process an earlier launch of this run started."""

    def doctor(self) -> int:
        """Preflight only: can these machines run this job?"""
