"""``unet-train distributed --scheduler slurm``: preflight -> render runs/<run>/job.sbatch ->
``sbatch --parsable`` -> stream the job's output, labelled, to the console and
runs/<run>/training.log -> ``scancel`` on Ctrl-C, SIGTERM, SIGHUP or a launcher failure.
``--stop --run-name R`` cancels R's job later (from runs/R/slurm/job.json).

Slurm does what the SSH launcher's playbooks do: it places and starts the tasks, tracks every
process they start and kills them all on cancel. Code, data and runs must live on a filesystem
every node sees; nothing is synced.

Time limits and preemption (job.py, trainer/runtime/preemption.py): cluster.slurm.signal_s
before the time limit the tasks get SIGUSR1, checkpoint at the next step and exit 75; the batch
script then requeues the job, which resumes from that step. The launcher keeps following the same
job id through PENDING and RUNNING again (the output file is appended to, --open-mode=append),
and the run counts as done when the job finally completes.
"""
from __future__ import annotations

import json
import shlex
import signal
import sys
import time
from pathlib import Path

from launcher.console import Console
from launcher.base import SOURCE_ROOT, LaunchError
from launcher.interrupts import Interrupts, signals_ignored
from launcher.slurm.client import JobInfo, SlurmClient
from launcher.slurm.doctor import check_slurm
from launcher.slurm.follow import JobOutput, TaskLabels
from launcher.slurm.job import PS_MODE, JobFiles, JobSpec, job_name, render_script
from trainer.config.settings import Settings, settings_to_yaml
from trainer.fsutil import write_json, write_text
from trainer.runtime.preemption import PREEMPTED_EXIT

CANCEL_WAIT_S = 180.0  # scancel: SIGTERM, then SIGKILL after the cluster's KillWait (default 30 s)


def has_job_record(settings: Settings) -> bool:
    return JobFiles((settings.train.run_dir / settings.train.run_name).resolve()).record.exists()


class SlurmLauncher:
    def __init__(self, settings: Settings, mode: str, out=sys.stdout, source_root: Path = SOURCE_ROOT):
        self.settings, self.mode, self.source_root = settings, mode, source_root
        self.run = settings.train.run_name
        self.files = JobFiles((settings.train.run_dir / self.run).resolve())
        self.client = SlurmClient()
        self.console = Console(out)
        self.interrupts = Interrupts()
        self.labels = TaskLabels()
        self._started = time.monotonic()
        self.first_output_s: float | None = None
        self.first_training_s: float | None = None  # the "... global batch ..." line: training starts

    def spec(self) -> JobSpec:
        cluster = self.settings.cluster
        code_dir = (cluster.workdir or str(self.source_root)).rstrip("/")
        python = cluster.python if cluster.python.startswith("/") else f"{code_dir}/{cluster.python}"
        return JobSpec(self.run, self.mode, python, code_dir, str(Path.cwd()), self.files)

    def say(self, text: str) -> None:
        self.console.say(text)

    # ------------------------------------------------------------------ entry points
    def dry_run(self) -> int:
        spec = self.spec()
        script = render_script(self.settings.cluster, spec)
        self.say(f"# {self.files.script} (written when run for real)")
        self.say(script.rstrip("\n"))
        self.say("# commands, in order")
        self.say(f"preflight: sinfo/scontrol (partition, state, limits), srun --mpi=list, {spec.python} versions")
        self.say(f"submit: sbatch --parsable {self.files.script}")
        self.say(f"follow: {self.files.slurm_dir}/job-<id>.out -> console and {self.files.run_dir / 'training.log'}")
        self.say(f"stop: scancel --name={spec.name} <id> (Ctrl-C, or unet-train distributed --stop --run-name {self.run})")
        return 0

    def doctor(self) -> int:
        for line in check_slurm(self.client, self.settings, self.mode, self.spec().python):
            self.say(line)
        self.say("doctor: the Slurm cluster can run this job")
        return 0

    def launch(self) -> int:
        """Submit, stream, report; cancel the job on Ctrl-C or failure. Returns the exit code."""
        self.console.open_log(self.files.run_dir / "training.log")
        try:
            with self.interrupts.installed():
                return self._launch()
        finally:
            self.console.close_log()

    def stop(self) -> int:
        """Cancel the job a previous launch of this run submitted (runs/<run>/slurm/job.json)."""
        if not self.files.record.exists():
            raise LaunchError(f"{self.files.record}: no Slurm job recorded for run '{self.run}' "
                              f"(nothing was submitted under this run name)")
        record = json.loads(self.files.record.read_text())
        self._cancel(str(record["job_id"]), record["job_name"], say_if_ended=True)
        return 0

    # ------------------------------------------------------------------ the launch
    def _launch(self) -> int:
        job_id = None
        try:
            spec = self.spec()
            script = render_script(self.settings.cluster, spec)  # layout and path errors first
            self.doctor()
            write_text(self.files.settings, settings_to_yaml(self.settings))
            write_text(self.files.script, script)
            if self.interrupts.cancelled():
                raise KeyboardInterrupt
            job_id = self.client.submit(self.files.script)
            submitted = time.monotonic()
            write_json(self.files.record, {"job_id": job_id, "job_name": spec.name, "run": self.run,
                                           "mode": self.mode, "script": str(self.files.script),
                                           "output": str(self.files.output(job_id))})
            self.say(f"submitted job {job_id} ({spec.name}): {self.files.script}; "
                     f"output {self.files.output(job_id)}")
            info = self._follow(job_id)
            if self.interrupts.cancelled():
                raise KeyboardInterrupt
            self._check_outcome(job_id, info)
            write_json(self.files.run_dir / "launcher" / "launch.json", {
                "scheduler": "slurm", "job_id": job_id, "mode": self.mode, "nodes": info.nodes if info else None,
                "first_output_s": self.first_output_s, "first_training_s": self.first_training_s,
                "submit_to_first_training_s": (None if self.first_training_s is None
                                               else self.first_training_s - (submitted - self._started)),
                "total_s": time.monotonic() - self._started})
            self.say(f"done: job {job_id} completed; merged log {self.files.run_dir / 'training.log'}")
            if self.settings.cluster.tensorboard:
                serve = shlex.join(["tensorboard", "--logdir", str(self.files.run_dir / "tensorboard"), "--host",
                                    self.settings.logging.tensorboard_host, "--port",
                                    str(self.settings.logging.tensorboard_port)])
                self.say(f"TensorBoard: {self.files.run_dir / 'tensorboard'} is on the shared filesystem; "
                         f"serve it from a login node: {serve}")
            return 0
        except KeyboardInterrupt:
            self.say(f"interrupted: cancelling the job ... ({signal.Signals(self.interrupts.signum).name})")
            if job_id is not None:
                self._cancel(job_id, job_name(self.run))
            return self.interrupts.exit_code
        except BaseException:
            if job_id is not None:
                self._cancel(job_id, job_name(self.run))
            raise

    def _follow(self, job_id: str) -> JobInfo | None:
        """Stream the output until the job has ended (or a signal arrives); returns its last state."""
        output = JobOutput(self.files.output(job_id))
        shown = ""
        while True:
            info = self.client.job(job_id)  # state first: once it has ended, the file is complete
            for line in output.read(final=info is None or info.finished):
                self._show(line)
            if info is not None and info.describe() != shown:
                shown = info.describe()
                self.say(f"[slurm] {shown}")
            if info is None or info.finished:
                return info
            if self.interrupts.event.wait(self.settings.cluster.slurm.poll_s):
                return info

    def _show(self, line: str) -> None:
        now = time.monotonic() - self._started
        if self.first_output_s is None:
            self.first_output_s = now
        if self.first_training_s is None and "global batch" in line:
            self.first_training_s = now
        self.say(self.labels.label(line))

    def _check_outcome(self, job_id: str, info: JobInfo | None) -> None:
        failed = self.labels.failed()
        chief = next((task for task, (_, role) in self.labels.where.items() if role == "chief"), None)
        if self.mode == PS_MODE and chief is not None and self.labels.exit_codes.get(chief) == 0:
            for task in [t for t in failed if self.labels.where.get(t, ("", ""))[1].startswith("worker")]:
                # the chief re-ran the lost worker's closures on the others
                self.say(f"warning: {self.labels.role(task)} exited {failed.pop(task)}; the chief finished without it")
                if info is not None and info.state == "FAILED":
                    info = None  # srun's exit status was that worker's
        state_ok = info is None or (info.state == "COMPLETED" and info.exit_code == 0)
        if failed or not state_ok or not self.labels.exit_codes:
            roles = ", ".join(f"{self.labels.role(t)} exited {rc}" for t, rc in failed.items())
            state = info.describe() if info else f"job {job_id}"
            if info is not None:
                state += f", exit {info.exit_code}" + (f" (signal {info.signal})" if info.signal else "")
            hint = ""
            if PREEMPTED_EXIT in failed.values():
                hint = (f"; exit {PREEMPTED_EXIT} = checkpointed after a signal and not requeued: run the same "
                        f"command again to resume from the checkpoint")
            raise LaunchError(f"training failed: {state}{': ' + roles if roles else ''}{hint} "
                              f"(logs: {self.files.run_dir / 'training.log'}, {self.files.output(job_id)})")

    def _cancel(self, job_id: str, name: str, say_if_ended: bool = False) -> None:
        """scancel and wait until Slurm has ended the job (its processes are then gone). Signals are
        ignored meanwhile: a second Ctrl-C must not abandon the cancel half-way."""
        with signals_ignored():
            info = self.client.job(job_id)
            if info is None or info.finished:
                if say_if_ended:
                    self.say(f"[slurm] job {job_id} ({name}) has already ended" + (f": {info.state}" if info else ""))
                return
            self.client.cancel(job_id, name)
            self.say(f"[slurm] scancel {job_id} ({name})")
            deadline = time.monotonic() + CANCEL_WAIT_S
            while time.monotonic() < deadline:
                info = self.client.job(job_id)
                if info is None or (info.finished and "COMPLETING" not in info.state):
                    break
                time.sleep(0.5)
            self.say(f"[slurm] job {job_id}: {info.state if info else 'ended'}")
