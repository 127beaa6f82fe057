"""The parameter-server roles as every launcher writes them: the ``unet-train`` command a role
runs, its name, and the cluster layout every role is handed as settings.

Where the roles go is each launcher's own: SSH hosts (launcher/ssh/plan.py), the tasks of a
Slurm job step (launcher/slurm/task.py), a TFJob's replicas (launcher/kubeflow.py). What the roles
are told is written here once, and read back by every role through
``trainer.runtime.ps.cluster.ClusterLayout.from_settings``.
"""
from __future__ import annotations

from typing import Sequence

CHIEF, PS, WORKER = "chief", "ps", "worker"
# A Horovod launch of one rank is asked for by whoever wrote the launch (the launcher knows the
# world it starts); the trainer otherwise refuses --dist horovod with one rank (runtime/launch_env.py).
ONE_RANK_ASKED = ("--set", "train.allow_single_rank=true")


def role_name(job: str, index: int | str) -> str:
    """``chief``, ``ps0``, ``worker1``: the role's label in log file names and launcher output."""
    return CHIEF if job == CHIEF else f"{job}{index}"


def role_args(job: str, index: int | str) -> list[str]:
    """The role's ``unet-train`` command: ``chief``, or ``ps|worker --index i``."""
    return [CHIEF] if job == CHIEF else [job, "--index", str(index)]


def layout_values(ps: Sequence[str], workers: Sequence[str], chief: str) -> dict[str, object]:
    """Every task's ``host:port`` as settings (what ClusterLayout.from_settings reads)."""
    return {"cluster.ps_hosts": list(ps), "cluster.worker_hosts": list(workers), "cluster.chief_host": chief}


def layout_overrides(ps: Sequence[str], workers: Sequence[str], chief: str) -> tuple[str, ...]:
    """The same layout as ``--set`` overrides on a role's command line."""
    overrides: list[str] = []
    for key, value in layout_values(ps, workers, chief).items():
        text = "[" + ",".join(value) + "]" if isinstance(value, list) else value
        overrides += ["--set", f"{key}={text}"]
    return tuple(overrides)
