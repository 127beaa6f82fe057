"""``doctor --scheduler slurm`` (also the launch's preflight): is there a Slurm to talk to, does
the partition exist and is it up, and does the job fit its limits? Every failure names the
partition, the limit and the flag that asked for more."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from launcher.slurm.client import SlurmClient, SlurmError, field
from launcher.slurm.job import HOROVOD_MODE, task_count
from launcher.slurm.walltime import minutes
from trainer.config.settings import Settings

_UNUSABLE = ("down", "drain", "fail", "inval", "maint", "future", "not_responding")
_VERSIONS = ("import json, platform, importlib.metadata as m\nv = {'python': platform.python_version()}\n"
             "for p in ('tensorflow-cpu', 'tensorflow', 'horovod'):\n    try:\n        v[p] = m.version(p)\n"
             "    except m.PackageNotFoundError:\n        v[p] = None\nprint(json.dumps(v))")


def _limit(record: str, key: str) -> int | None:
    value = field(record, key)
    return int(value) if value.isdigit() else None


def check_slurm(client: SlurmClient, settings: Settings, mode: str, python: str) -> list[str]:
    """Raise SlurmError naming every problem; return what was found, one line per fact."""
    slurm = settings.cluster.slurm
    version = client.version()
    partitions = client.partitions()
    if not partitions:
        raise SlurmError("slurm: the cluster has no partitions (scontrol show partition)")
    name = slurm.partition or next((p for p, rec in partitions.items() if field(rec, "Default") == "YES"), "")
    if not name:
        raise SlurmError(f"--partition: required, this cluster has no default partition "
                         f"(partitions: {', '.join(partitions)})")
    if name not in partitions:
        raise SlurmError(f"--partition {name!r}: no such partition on this cluster "
                         f"(partitions: {', '.join(partitions)})")
    record = partitions[name]
    problems: list[str] = []
    state = field(record, "State")
    if state != "UP":
        problems.append(f"partition {name!r} is {state or 'in an unknown state'}, not UP")
    max_nodes = _limit(record, "MaxNodes")
    if max_nodes is not None and slurm.nodes > max_nodes:
        problems.append(f"--nodes {slurm.nodes} exceeds MaxNodes={max_nodes} of partition {name!r}")
    max_time = field(record, "MaxTime")
    if slurm.time and (limit := minutes(max_time)) is not None and (minutes(slurm.time) or float("inf")) > limit:
        problems.append(f"--time {slurm.time} exceeds MaxTime={max_time} of partition {name!r}")
    cpus_needed = slurm.ntasks_per_node * slurm.cpus_per_task
    max_cpus = _limit(record, "MaxCPUsPerNode")
    if max_cpus is not None and cpus_needed > max_cpus:
        problems.append(f"--ntasks-per-node {slurm.ntasks_per_node} x --cpus-per-task {slurm.cpus_per_task} = "
                        f"{cpus_needed} CPUs exceeds MaxCPUsPerNode={max_cpus} of partition {name!r}")
    nodes = client.partition_nodes(name)
    usable = [n for n in nodes if not any(word in n[2].lower() for word in _UNUSABLE)]
    fitting = [n for n in usable if n[1] >= cpus_needed]
    if len(fitting) < slurm.nodes:
        problems.append(f"partition {name!r} has {len(fitting)} usable node(s) with >= {cpus_needed} CPUs "
                        f"(--ntasks-per-node x --cpus-per-task); --nodes asks for {slurm.nodes}")
    if mode == HOROVOD_MODE and slurm.srun_mpi not in client.mpi_plugins().split():
        problems.append(f"srun --mpi={slurm.srun_mpi}: this Slurm has no such MPI plugin (srun --mpi=list); "
                        f"set cluster.slurm.srun_mpi")
    versions = _versions(python)
    if versions is None:
        problems.append(f"{python}: cannot run the cluster's Python (cluster.python; it must be on a path every "
                        f"node sees, with scripts/setup.sh run once)")
    else:
        if not (versions.get("tensorflow-cpu") or versions.get("tensorflow")):
            problems.append(f"{python}: TensorFlow not installed")
        if mode == HOROVOD_MODE and not versions.get("horovod"):
            problems.append(f"{python}: Horovod not installed (run scripts/setup.sh)")
    if problems:
        raise SlurmError("slurm preflight failed:\n  " + "\n  ".join(problems))
    return [f"slurm: {version}",
            f"partition {name}: {state}, {len(usable)} usable node(s), MaxNodes={field(record, 'MaxNodes')}, "
            f"MaxTime={max_time}, MaxCPUsPerNode={field(record, 'MaxCPUsPerNode')}",
            f"job: {slurm.nodes} node(s) x {slurm.ntasks_per_node} task(s) x {slurm.cpus_per_task} CPU(s) = "
            f"{task_count(slurm)} task(s)",
            f"python {python}: " + ", ".join(f"{k} {v}" for k, v in (versions or {}).items() if v)]


def _versions(python: str) -> dict | None:
    if not Path(python).is_file():
        return None
    try:
        result = subprocess.run([python, "-c", _VERSIONS], capture_output=True, text=True, timeout=120)
        return json.loads(result.stdout) if result.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
