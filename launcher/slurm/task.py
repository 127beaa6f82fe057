"""``unet-train slurm-task``: what srun starts for every task of a Slurm run, on that task's node.

It turns the task's place in the job step (SLURM_PROCID, the step's node list and tasks per
node) into the command of an ordinary role, prints one line saying which, and runs it:

- horovod: every task is one rank, ``unet-train train --dist horovod``; the MPI ranks come from
  srun's PMIx (SLURM_PROCID == the MPI rank), so no horovodrun and no SSH between nodes;
- ps: TensorFlow's own ``SlurmClusterResolver`` maps the task to chief, ps i or worker i and
  gives every task's address; the role command gets them as ``--set cluster.*_hosts=[...]``.

Threads come from the allocation (SLURM_CPUS_PER_TASK, in physical cores), through the same
``cpu_choice`` the SSH launcher applies to a host's facts (numactl, cpu.intra_op_threads wins).

The role runs in the task's own process (trainer/commands/slurm_role.py; ``exec`` of Python, or of
numactl, which execs Python), never under a shell that stays in between: Slurm's signals
(SIGUSR1 before the time limit, SIGTERM at it) reach the Python that checkpoints on them
(trainer/runtime/preemption.py). That process prints the role's exit status as its last line,
so the launcher can name the role that failed, as the SSH launcher does.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import sys
from dataclasses import dataclass
from typing import Mapping

from launcher.roles import CHIEF, ONE_RANK_ASKED, PS, WORKER, layout_overrides, role_args, role_name
from launcher.ssh.plan import HostFacts, cpu_choice
from launcher.slurm.job import HOROVOD_MODE, PS_MODE, RUNNER
from trainer.config.settings import Settings
from trainer.errors import UserError
from trainer.hardware.cpu import physical_cores

PREFIX = "unet-train slurm-task:"
ANNOUNCED = re.compile(re.escape(PREFIX) + r" task (\d+) on (\S+) is (.+?) \(")
EXITED = re.compile(re.escape(PREFIX) + r" task (\d+) \((.+)\) exited (-?\d+)$")


def exit_line(task: int | str, role: str, code: int) -> str:
    return f"{PREFIX} task {task} ({role}) exited {code}"


@dataclass(frozen=True)
class TaskCommand:
    task: int
    host: str
    role: str
    threads: int | None
    reason: str
    argv: tuple[str, ...]   # the role's own command: [numactl ...] python -m trainer.cli ROLE ...
    log_name: str
    prefix: tuple[str, ...] = ()   # numactl and its options, when a NUMA binding is asked for

    def announcement(self) -> str:
        return (f"{PREFIX} task {self.task} on {self.host} is {self.role} (threads {self.threads or 'auto'}: "
                f"{self.reason})")

    @property
    def cli_args(self) -> tuple[str, ...]:
        """The role's ``unet-train`` arguments (argv without numactl, python, -m, trainer.cli)."""
        return self.argv[len(self.prefix) + 3:]

    def exec_argv(self) -> list[str]:
        """What replaces the task's process: [numactl ...] python -m RUNNER --run TASK ROLE -- ARGS.
        No shell: task, role and arguments are argv items, nothing is re-parsed."""
        python = self.argv[len(self.prefix)]
        return [*self.prefix, python, "-m", RUNNER, "--run", str(self.task), self.role, "--", *self.cli_args]


def allocation_cores(env: Mapping[str, str]) -> int:
    """Physical cores Slurm gave this task: --cpus-per-task counts hardware threads."""
    cpus = int(env.get("SLURM_CPUS_PER_TASK") or 1)
    threads_per_core = max(1, (os.cpu_count() or 1) // physical_cores())
    return max(1, cpus // threads_per_core)


def _slurm_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except (KeyError, ValueError):
        raise UserError(f"{name} is not set: unet-train slurm-task runs inside a Slurm job step "
                        f"(srun), started by `unet-train distributed --scheduler slurm`") from None


def ps_layout(settings: Settings, env: Mapping[str, str]) -> tuple[str, int, dict[str, list[str]]]:
    """(job, index, cluster spec) of this task, from TensorFlow's SlurmClusterResolver.

    The resolver reads SLURM_PROCID, SLURM_STEP_NODELIST and SLURM_STEP_TASKS_PER_NODE itself
    (from os.environ). Job names are taken in sorted order, so task 0 is the chief, tasks
    1..ps_tasks the parameter servers and the rest the workers. Ports are port_base + the
    task's slot on its node. It would also hand out GPUs: this mode runs on CPUs, so that is
    off, and gpus_per_node is the task count only to satisfy its GPU bookkeeping."""
    slurm = settings.cluster.slurm
    tasks = _slurm_int(env, "SLURM_STEP_NUM_TASKS")
    workers = tasks - 1 - slurm.ps_tasks
    if workers < 1:
        raise UserError(f"the job step has {tasks} task(s): PS mode needs cluster.slurm.ps_tasks "
                        f"({slurm.ps_tasks}) + 1 chief + at least 1 worker")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # the roles' own default: no INFO banner on import
    from tensorflow.python.distribute.cluster_resolver.slurm_cluster_resolver import SlurmClusterResolver

    try:
        resolver = SlurmClusterResolver(jobs={CHIEF: 1, PS: slurm.ps_tasks, WORKER: workers},
                                        port_base=slurm.port_base, gpus_per_node=tasks, gpus_per_task=1,
                                        auto_set_gpu=False)
        spec = resolver.cluster_spec().as_dict()
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"SlurmClusterResolver: {exc}") from None
    job, index = resolver.get_task_info()
    return job, index, {name: list(addresses) for name, addresses in spec.items()}


def task_command(settings: Settings, mode: str, settings_file: str, env: Mapping[str, str],
                 python: str = sys.executable) -> TaskCommand:
    task = _slurm_int(env, "SLURM_PROCID")
    host = env.get("SLURMD_NODENAME") or socket.gethostname()
    facts = HostFacts(physical_cores=allocation_cores(env), numactl=shutil.which("numactl") is not None)
    choice = cpu_choice(settings, facts, 1, derive=True)
    reason = choice.reason.replace("physical cores", "allocated core(s)")
    argv = [*choice.numactl, python, "-m", "trainer.cli"]
    common = ["--settings", settings_file]
    if choice.threads:
        common += ["--set", f"cpu.intra_op_threads={choice.threads}", "--set", f"cpu.omp_num_threads={choice.threads}"]
    if mode == HOROVOD_MODE:
        role, log_name = f"rank {task}", "rank0"  # only rank 0 writes its log file
        argv += ["train", "--dist", "horovod", *common]
        if env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS")) == "1":
            argv += list(ONE_RANK_ASKED)
    elif mode == PS_MODE:
        job, index, spec = ps_layout(settings, env)
        role = log_name = role_name(job, index)
        argv += role_args(job, index) + common + list(layout_overrides(spec[PS], spec[WORKER], spec[CHIEF][0]))
    else:
        raise UserError(f"--mode: expected 'ps' or 'horovod', got {mode!r}")
    argv += ["--set", f"logging.log_file=training-{log_name}.log"]
    return TaskCommand(task, host, role, choice.threads, reason, tuple(argv), log_name, tuple(choice.numactl))


