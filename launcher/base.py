"""What every launcher does, and which one a command gets.

A launcher starts a run's processes on machines it does not own: SSH hosts driven by Ansible
(:mod:`launcher.ssh`) or a Slurm job (:mod:`launcher.slurm`). Each entry point returns the
process exit code, so the CLI only dispatches.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from trainer.config.settings import Settings
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


def open_launcher(settings: Settings, request: LaunchRequest, stopping: bool = False) -> Launcher:
    """The Slurm launcher when cluster.scheduler is slurm (or, for --stop, when the run has a Slurm
    job record and no --scheduler was named), else the SSH one."""
    from launcher.slurm.launch import SlurmLauncher, has_job_record

    slurm = settings.cluster.scheduler == "slurm" or (stopping and not request.scheduler_given
                                                       and has_job_record(settings))
    if slurm:
        if request.hosts:
            raise UserError("--hosts: not used with --scheduler slurm (Slurm picks the nodes; see --nodes, "
                            "--partition)")
        if request.elastic:
            raise UserError("--elastic: SSH hosts only (--scheduler ssh); a Slurm job has a fixed set of nodes")
        return SlurmLauncher(settings, request.mode)
    from launcher.ssh.launch import SshLauncher

    if not request.hosts and not stopping:
        raise UserError("--hosts: required (e.g. --hosts node1,node2), or set cluster.hosts in settings.yaml")
    return SshLauncher(settings, request)
