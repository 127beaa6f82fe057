"""Refuse a process whose launcher and ``train.dist`` disagree, before anything is written.

A launcher gives each process it starts its rank and the world's size in the environment:

* horovodrun (Gloo): ``HOROVOD_RANK`` / ``HOROVOD_SIZE`` (what Horovod's Gloo context reads);
* mpirun of Open MPI (also under horovodrun --mpi, Kubeflow's MPIJob): ``OMPI_COMM_WORLD_RANK`` / ``_SIZE``;
* MPICH / Intel MPI (Hydra) and ``srun --mpi=pmi2``: ``PMI_RANK`` / ``PMI_SIZE``; MVAPICH2: ``MV2_COMM_WORLD_*``;
* ``srun --mpi=pmix`` (the Slurm launcher's Horovod mode): ``PMIX_RANK``, the size in ``SLURM_STEP_NUM_TASKS``.

Without ``--dist horovod`` every one of N such ranks would train alone, as its own chief, on the
same runs/R (seen: ``HOROVOD_RANK=1 HOROVOD_SIZE=2 unet-train train`` logged ``rank 0/1`` and trained).
With ``--dist horovod`` and one rank, Horovod trains one process and calls it distributed: refused
unless ``train.allow_single_rank``. Slurm's own task variables (SLURM_PROCID, SLURM_NTASKS) are not
read: a batch script with --ntasks=4 runs one process, and the Slurm PS mode starts its roles with
``srun --mpi=none`` as ``chief`` / ``ps`` / ``worker``, which never come here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

from trainer.config.settings import TrainSettings
from trainer.errors import UserError

# (rank variable, size variable): the size variable is read only when the rank variable is set
FAMILIES: tuple[tuple[str, str], ...] = (
    ("HOROVOD_RANK", "HOROVOD_SIZE"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("PMI_RANK", "PMI_SIZE"),
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"),
    ("PMIX_RANK", "SLURM_STEP_NUM_TASKS"),
)


@dataclass(frozen=True)
class LaunchWorld:
    """The world a launcher says this process belongs to (size 1 and nothing seen: no launcher)."""

    size: int
    seen: tuple[str, ...]  # "NAME=value" of every launcher variable found

    def describe(self) -> str:
        return ", ".join(self.seen) if self.seen else "no launcher variables"


def _integer(text: Optional[str]) -> Optional[int]:
    try:
        value = int(text or "", 10)
    except ValueError:
        return None
    return value if value >= 0 else None


def launch_world(env: Mapping[str, str]) -> LaunchWorld:
    """The largest world any launcher variable states; a rank above 0 means at least two ranks."""
    size, seen = 1, []
    for rank_name, size_name in FAMILIES:
        rank = _integer(env.get(rank_name))
        if rank is None:
            continue
        seen.append(f"{rank_name}={rank}")
        size = max(size, rank + 1)
        stated = _integer(env.get(size_name))
        if stated is not None:
            seen.append(f"{size_name}={stated}")
            size = max(size, stated)
    return LaunchWorld(size, tuple(seen))


def check_launch(train: TrainSettings, env: Mapping[str, str] | None = None) -> LaunchWorld:
    """Raise UserError when the launcher's world and ``train.dist`` disagree; else the world."""
    world = launch_world(os.environ if env is None else env)
    if world.size > 1 and train.dist != "horovod":
        raise UserError(f"this process is one of {world.size} ranks ({world.describe()}) but train.dist is "
                        f"{train.dist!r}: every rank would train alone as chief on the same run folder; "
                        f"add --dist horovod")
    if world.size == 1 and train.dist == "horovod" and not (train.allow_single_rank or train.elastic):
        raise UserError(f"train.dist=horovod with a single rank ({world.describe()}): start it under "
                        f"horovodrun -np N / mpirun -np N / srun --mpi=pmix (or 'unet-train distributed --mode "
                        f"horovod'), or set train.allow_single_rank=true to train one Horovod rank")
    return world
