"""The Slurm commands the launcher uses (sbatch, scontrol, sinfo, scancel, srun --mpi=list),
each an argv list with a timeout, each failure one line that says which command and why."""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import UserError

# Job states after which nothing more runs or prints (squeue/scontrol JobState).
FINISHED = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                      "PREEMPTED", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED"})


class SlurmError(UserError):
    exit_code = 1


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    state: str          # PENDING, RUNNING, COMPLETED, ...
    reason: str         # why pending / why it failed ("None" when there is nothing to say)
    exit_code: int
    signal: int
    nodes: str          # node list ("(null)" while pending)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    def describe(self) -> str:
        text = f"job {self.job_id}: {self.state}"
        if self.nodes and self.nodes not in ("(null)", "None"):
            text += f" on {self.nodes}"
        if self.reason and self.reason != "None":
            text += f" ({self.reason})"
        return text


def field(text: str, key: str) -> str:
    """``KEY=value`` from scontrol's one-line output (values here never hold spaces)."""
    match = re.search(rf"(?:^|\s){re.escape(key)}=(\S*)", text)
    return match.group(1) if match else ""


class SlurmClient:
    def __init__(self, timeout_s: float = 60.0):
        self.timeout_s = timeout_s

    def run(self, argv: list[str], what: str | None = None) -> subprocess.CompletedProcess:
        if shutil.which(argv[0]) is None:
            raise SlurmError(f"{argv[0]}: not found on PATH (the Slurm client commands are needed on this host)")
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            raise SlurmError(f"{what or argv[0]}: no answer within {self.timeout_s:.0f} s "
                             f"(is slurmctld running and reachable?)") from None

    def checked(self, argv: list[str], what: str) -> str:
        result = self.run(argv, what)
        if result.returncode != 0:
            raise SlurmError(f"{what}: {last_line(result)}")
        return result.stdout

    def version(self) -> str:
        return self.checked(["sinfo", "--version"], "sinfo --version").strip()

    def partitions(self) -> dict[str, str]:
        """Every partition's one-line ``scontrol show partition -o`` record, by name."""
        out = self.checked(["scontrol", "show", "partition", "-o"], "scontrol show partition")
        return {field(line, "PartitionName"): line for line in out.splitlines() if "PartitionName=" in line}

    def partition_nodes(self, partition: str) -> list[tuple[str, int, str]]:
        """(node, CPUs, state) of each node in ``partition``, from sinfo."""
        out = self.checked(["sinfo", "-h", "-N", "-p", partition, "-o", "%N %c %T"], f"sinfo -p {partition}")
        nodes = []
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1].isdigit():
                nodes.append((parts[0], int(parts[1]), parts[2]))
        return nodes

    def mpi_plugins(self) -> str:
        result = self.run(["srun", "--mpi=list"], "srun --mpi=list")
        return result.stdout + result.stderr

    def submit(self, script: Path) -> str:
        out = self.checked(["sbatch", "--parsable", str(script)], "sbatch")
        job_id = out.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
        if not job_id.isdigit():
            raise SlurmError(f"sbatch: unexpected answer {out.strip()[:200]!r} (expected a job id)")
        return job_id

    def job(self, job_id: str) -> JobInfo | None:
        """The job's state; None once slurmctld has forgotten it (MinJobAge after it ended)."""
        result = self.run(["scontrol", "show", "job", "-o", job_id], "scontrol show job")
        if result.returncode != 0 or "JobState=" not in result.stdout:
            if "Invalid job id" in result.stdout + result.stderr:
                return None
            raise SlurmError(f"scontrol show job {job_id}: {last_line(result)}")
        text = result.stdout
        code, _, sig = field(text, "ExitCode").partition(":")
        return JobInfo(job_id, field(text, "JobState"), field(text, "Reason"),
                       int(code) if code.isdigit() else -1, int(sig) if sig.isdigit() else 0, field(text, "NodeList"))

    def cancel(self, job_id: str, job_name: str) -> None:
        """scancel, restricted to the job's own name: a recycled id never cancels someone else's job."""
        self.checked(["scancel", f"--name={job_name}", job_id], f"scancel {job_id}")


def last_line(result: subprocess.CompletedProcess) -> str:
    lines = [line.strip() for line in (result.stderr + "\n" + result.stdout).splitlines() if line.strip()]
    return lines[-1][:300] if lines else f"exit {result.returncode}"
