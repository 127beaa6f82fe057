"""The batch script of a Slurm run (``runs/<run>/job.sbatch``), as pure text from settings.

``#SBATCH`` lines are read by sbatch, not by a shell, but a newline or a space in a value would
add a directive or split one: every value there is either held to a strict pattern by the
settings schema or checked here (paths). Every value in the shell part is ``shlex.quote``d.

Time limits (Slurm's sbatch --signal and --requeue): ``--signal=B:USR1@<cluster.slurm.signal_s>``
sends SIGUSR1 to the batch shell that long before the limit (Slurm may send it up to a minute
early); the shell forwards it to srun, which passes it to every task. The tasks checkpoint at the
next step boundary and exit 75 (trainer/runtime/preemption.py); on that exit status after
SIGUSR1 the script runs ``scontrol requeue $SLURM_JOB_ID`` (``--requeue`` allows it), and the
requeued job, the same id, resumes mid-epoch from the checkpoint. SIGTERM (scancel, the limit
itself) is forwarded too, but never requeues: a cancelled job stays cancelled. Slurm holds a
requeued job until the old job credentials have expired (AuthInfo cred_expire, 120 s by default).
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from launcher.slurm.walltime import minutes
from trainer.config.settings import ClusterSettings, SlurmSettings
from trainer.errors import UserError

PS_MODE, HOROVOD_MODE = "ps", "horovod"
# A path in an #SBATCH line: no whitespace, quotes or '%' (sbatch expands %j, %u, ... in --output).
_SBATCH_PATH = re.compile(r"/[A-Za-z0-9_./+@,:=-]*")


@dataclass(frozen=True)
class JobFiles:
    """Where a Slurm run keeps its files: all inside runs/<run>/, on the filesystem every node sees."""

    run_dir: Path

    @property
    def script(self) -> Path:
        return self.run_dir / "job.sbatch"

    @property
    def slurm_dir(self) -> Path:
        return self.run_dir / "slurm"

    @property
    def settings(self) -> Path:
        return self.slurm_dir / "settings.yaml"

    @property
    def record(self) -> Path:
        """job.json: the submitted job's id and name, for ``--stop`` and for the log's reader."""
        return self.slurm_dir / "job.json"

    @property
    def output_pattern(self) -> Path:
        return self.slurm_dir / "job-%j.out"

    def output(self, job_id: str) -> Path:
        return self.slurm_dir / f"job-{job_id}.out"


@dataclass(frozen=True)
class JobSpec:
    run: str
    mode: str
    python: str        # absolute interpreter path, the same on every node
    code_dir: str      # this checkout (PYTHONPATH), on the shared filesystem
    submit_dir: str    # the job's working folder: relative settings paths mean what they mean here
    files: JobFiles

    @property
    def name(self) -> str:
        return job_name(self.run)


def job_name(run: str) -> str:
    return f"unet-train-{run}"


def task_count(slurm: SlurmSettings) -> int:
    return slurm.nodes * slurm.ntasks_per_node


def check_layout(cluster: ClusterSettings, mode: str) -> None:
    """Refuse a job whose tasks cannot form the requested cluster, before anything is submitted."""
    slurm = cluster.slurm
    tasks = task_count(slurm)
    if mode == PS_MODE:
        if tasks < slurm.ps_tasks + 2:
            raise UserError(f"--nodes {slurm.nodes} x --ntasks-per-node {slurm.ntasks_per_node} = {tasks} task(s): "
                            f"PS mode needs cluster.slurm.ps_tasks ({slurm.ps_tasks}) + 1 chief + at least 1 worker")
        last = slurm.port_base + slurm.ntasks_per_node - 1
        if slurm.port_base <= cluster.control_port <= last:
            raise UserError(f"cluster.control_port {cluster.control_port} lies in the gRPC ports "
                            f"{slurm.port_base}..{last} (cluster.slurm.port_base + tasks per node): pick another")
    elif mode != HOROVOD_MODE:
        raise UserError(f"--mode: expected 'ps' or 'horovod', got {mode!r}")


def sbatch_path(path: Path | str, what: str) -> str:
    text = str(path)
    if not _SBATCH_PATH.fullmatch(text):
        raise UserError(f"{what} {text!r}: a path in the batch script must be absolute and hold only letters, "
                        f"digits and _./+@,:=- (no spaces, quotes, '%' or newlines)")
    return text


def directives(slurm: SlurmSettings, spec: JobSpec) -> list[str]:
    options = [f"--job-name={spec.name}", f"--nodes={slurm.nodes}", f"--ntasks-per-node={slurm.ntasks_per_node}",
               f"--cpus-per-task={slurm.cpus_per_task}"]
    for key in ("partition", "time", "account", "constraint"):
        value = getattr(slurm, key)
        if value:  # schema patterns: no spaces, quotes or newlines
            options.append(f"--{key}={value}")
    options += [f"--output={sbatch_path(spec.files.slurm_dir, 'train.run_dir')}/{spec.files.output_pattern.name}",
                f"--chdir={sbatch_path(spec.submit_dir, 'the working folder')}",
                "--open-mode=append"]  # a requeued job appends to the same job-<id>.out: the launcher reads on
    if slurm.signal_s:
        options.append(f"--signal=B:USR1@{slurm.signal_s}")  # B: the batch shell, which forwards it to srun
    options.append("--requeue" if slurm.requeue else "--no-requeue")
    for option in slurm.extra_sbatch:  # schema: '--key=value' from a strict character set, none reserved
        name = option[2:].split("=", 1)[0]
        if any(word.startswith(name) for word in _PREEMPTION_OPTIONS):
            raise UserError(f"cluster.slurm.extra_sbatch {option!r}: --{name} is set by the launcher (use "
                            f"cluster.slurm.signal_s / cluster.slurm.requeue)")
        options.append(option)
    return [f"#SBATCH {option}" for option in options]


# Options the preemption handling sets (sbatch takes any unambiguous prefix of a long option).
_PREEMPTION_OPTIONS = ("signal", "requeue", "no-requeue")
# python -m RUNNER: each task's process; takes the signals first, runs its role, reports its exit
RUNNER = "trainer.commands.slurm_role"


def srun_argv(slurm: SlurmSettings, spec: JobSpec) -> list[str]:
    """One task per Horovod rank or PS-mode role. --distribution=block: tasks 0..k-1 on the first
    node, and so on, the order SlurmClusterResolver assumes when it maps SLURM_PROCID to a role.
    --cpus-per-task is repeated because srun 22.05 no longer inherits it from the batch job.
    Each task is ``python -m RUNNER`` (what ``unet-train slurm-task`` runs), which takes
    SIGUSR1/SIGTERM from its first instruction and runs the role in its own process."""
    argv = ["srun", "--label", "--distribution=block", f"--cpus-per-task={slurm.cpus_per_task}"]
    if spec.mode == HOROVOD_MODE:
        # a dead rank ends the job at once (allreduce would hang), like horovodrun
        argv += [f"--mpi={slurm.srun_mpi}", "--kill-on-bad-exit=1"]
    else:
        # a dead worker is survived: the chief re-runs its closures on another worker
        argv += ["--mpi=none", "--kill-on-bad-exit=0"]
    return argv + [spec.python, "-m", RUNNER, "--mode", spec.mode,
                   "--settings", str(spec.files.settings)]


# The step runs in the background so that the batch shell can take the signals Slurm sends it
# (--signal=B:USR1@s, and SIGTERM at the time limit or on scancel) and forward them to srun,
# which passes them to every task. `wait` returns early when a trapped signal arrives: the loop
# waits again until srun itself has ended, then takes its exit status.
_STEP = """\
warned=0 step=
trap 'warned=1; [ -z "$step" ] || kill -USR1 "$step" 2>/dev/null' USR1
trap '[ -z "$step" ] || kill -TERM "$step" 2>/dev/null' TERM
{srun} &
step=$!
[ "$warned" = 0 ] || kill -USR1 "$step" 2>/dev/null
rc=0
wait "$step" || rc=$?
while kill -0 "$step" 2>/dev/null; do rc=0; wait "$step" || rc=$?; done
if [ "$rc" = {code} ]; then
{after}
fi
exit "$rc"
"""


# Exit 75 after SIGUSR1 (the time-limit warning, or `scancel --signal=USR1 --batch`): every task
# checkpointed; the job requeues itself and resumes there. After SIGTERM alone (scancel, the time
# limit itself, preemption) it does not: a cancelled job stays cancelled, and Slurm requeues a
# preempted one itself where the cluster's PreemptMode says so.
_REQUEUE = """\
  if [ "$warned" = 1 ]; then
    echo "unet-train: every task checkpointed after SIGUSR1 (exit {code}): scontrol requeue $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || echo "unet-train: scontrol requeue failed: resubmit the job to resume"
  else
    echo "unet-train: the tasks checkpointed after SIGTERM (exit {code}); not requeued: resubmit to resume"
  fi"""
_NO_REQUEUE = ('  echo "unet-train: the tasks checkpointed after a signal; cluster.slurm.requeue is off: '
               'resubmit to resume"')


def render_script(cluster: ClusterSettings, spec: JobSpec) -> str:
    from trainer.runtime.preemption import PREEMPTED_EXIT

    slurm = cluster.slurm
    check_layout(cluster, spec.mode)
    check_signal_time(slurm)
    lines = ["#!/bin/sh",
             f"# Rendered by `unet-train distributed --scheduler slurm` (run {spec.run}, mode {spec.mode}).",
             "# Do not edit: rerun the command (or --dry-run to see it). Values below are validated/quoted.",
             *directives(slurm, spec),
             "set -u",
             'echo "unet-train: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST: $SLURM_NTASKS task(s),'
             ' $SLURM_CPUS_PER_TASK CPU(s) each, restart ${SLURM_RESTART_COUNT:-0}"',
             f"export PYTHONPATH={shlex.quote(spec.code_dir)}",
             _STEP.format(srun=shlex.join(srun_argv(slurm, spec)), code=PREEMPTED_EXIT,
                          after=_REQUEUE.format(code=PREEMPTED_EXIT) if slurm.requeue else _NO_REQUEUE)]
    return "\n".join(lines)


def check_signal_time(slurm: SlurmSettings) -> None:
    """A warning signal due before the job has even started would make it requeue itself for ever."""
    limit = minutes(slurm.time) if slurm.time else None
    if slurm.signal_s and limit is not None and slurm.signal_s >= limit * 60 / 2:
        raise UserError(f"cluster.slurm.signal_s {slurm.signal_s}: must be less than half of --time {slurm.time} "
                        f"({limit * 60:g} s), or every run would spend most of its time checkpointing and requeueing; "
                        f"lower it, raise --time, or set 0 for no warning signal")
