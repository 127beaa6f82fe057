"""Time limits and preemption without a cluster: the signal handler's rules, the Slurm batch
script's forwarding and self-requeue (run by sh with a stand-in srun and scontrol), the task
runner's exit report, and a single-process run that checkpoints on SIGUSR1, exits 75 and
resumes mid-epoch. The same on a real slurmctld (Horovod and PS): tests/test_slurm.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from support.procs import child_env, kill_group, run_bounded, unet_train_cmd

ROOT = Path(__file__).resolve().parents[1]


def python(code: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=child_env(), cwd=ROOT)


def test_usr1_is_noted_and_term_only_while_the_steps_run():
    result = python("""
        import os, signal, time
        from trainer.runtime import preemption as p
        p.install(term=True)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        name, at = p.requested()
        print("noted", name, abs(time.time() - at) < 5)
        with p.watching():
            os.kill(os.getpid(), signal.SIGTERM)  # inside the steps: noted, the process lives on
            time.sleep(0.05)
        print("alive after SIGTERM while armed", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)  # outside them: SIGTERM ends the process as always
        time.sleep(1)
        print("not reached")
    """)
    assert "noted SIGUSR1 True" in result.stdout and "alive after SIGTERM while armed" in result.stdout
    assert result.returncode == -signal.SIGTERM and "not reached" not in result.stdout


def test_term_keeps_its_default_unless_enabled():
    """Outside a Slurm task (no install(term=True)) the loop takes SIGUSR1 only: the SSH
    launcher's stop (SIGTERM) still ends a trainer at once."""
    result = python("""
        import os, signal, time
        from trainer.runtime import preemption as p
        with p.watching():
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.05)
            print("usr1 noted:", p.requested()[0], flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        print("not reached")
    """)
    assert "usr1 noted: SIGUSR1" in result.stdout and result.returncode == -signal.SIGTERM


def test_after_the_decision_sigterm_is_ignored_until_exit():
    """srun --kill-on-bad-exit sends SIGTERM to ranks still leaving when one has exited 75 first;
    Python restores default actions while it finalizes, so the decision sets SIG_IGN instead."""
    result = python("""
        import os, signal, sys
        import numpy as np
        from trainer.runtime import preemption as p

        class Alone:
            def sum_over_workers(self, values):
                return values

        p.install(term=True)
        with p.watching():
            os.kill(os.getpid(), signal.SIGUSR1)
            assert p.agreed(Alone())
        print("decided", signal.getsignal(signal.SIGTERM) is signal.SIG_IGN, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        sys.exit(75)
    """)
    assert "decided True" in result.stdout and result.returncode == 75, result.stderr


# ---------------------------------------------------------------- the batch script, with stand-ins

FAKE_SRUN = """#!/bin/sh
# stand-in srun: says it is up, then exits 75 on USR1/TERM (a checkpoint), or 0 after 20 s
echo "$$" > "$FAKE_DIR/srun.pid"
trap 'echo USR1 >> "$FAKE_DIR/srun.signals"; exit 75' USR1
trap 'echo TERM >> "$FAKE_DIR/srun.signals"; exit 75' TERM
i=0
while [ $i -lt ${FAKE_SRUN_S:-200} ]; do sleep 0.1; i=$((i + 1)); done
exit 0
"""
FAKE_SCONTROL = """#!/bin/sh
echo "$@" >> "$FAKE_DIR/scontrol.calls"
"""


def render(tmp_path: Path, **slurm) -> Path:
    from launcher.slurm.job import JobFiles, JobSpec, render_script
    from trainer.config.settings import ClusterSettings, SlurmSettings

    spec = JobSpec("pre", "horovod", sys.executable, str(ROOT), str(tmp_path), JobFiles(tmp_path / "runs" / "pre"))
    script = tmp_path / "job.sbatch"
    script.write_text(render_script(ClusterSettings(slurm=SlurmSettings(**slurm)), spec))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return script


def run_script(tmp_path: Path, script: Path, send: signal.Signals | None, srun_s: int = 200):
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path),
           "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "n1", "SLURM_NTASKS": "2", "SLURM_CPUS_PER_TASK": "1",
           "FAKE_SRUN_S": str(srun_s)}
    proc = subprocess.Popen(["sh", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "srun.pid").exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() else ""
            time.sleep(0.05)
        time.sleep(0.2)  # the stand-in's traps are set
        if send is not None:
            os.kill(proc.pid, send)  # what Slurm does: --signal=B:USR1@s, or SIGTERM, to the batch shell
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    calls = (tmp_path / "scontrol.calls").read_text() if (tmp_path / "scontrol.calls").exists() else ""
    signals = (tmp_path / "srun.signals").read_text() if (tmp_path / "srun.signals").exists() else ""
    return proc.returncode, out, calls, signals


def test_usr1_is_forwarded_to_the_step_and_exit_75_requeues_the_job(tmp_path):
    script = render(tmp_path, signal_s=90, time="1:00:00")
    text = script.read_text()
    assert "\n#SBATCH --signal=B:USR1@90\n" in text and "\n#SBATCH --requeue\n" in text
    assert "\n#SBATCH --open-mode=append\n" in text
    rc, out, calls, signals = run_script(tmp_path, script, signal.SIGUSR1)
    assert signals == "USR1\n" and rc == 75, out
    assert calls == "requeue 42\n" and "scontrol requeue 42" in out


def test_sigterm_is_forwarded_but_never_requeues(tmp_path):
    """scancel (or the time limit itself) sends SIGTERM: the step still checkpoints, but a cancelled
    job must stay cancelled."""
    rc, out, calls, signals = run_script(tmp_path, render(tmp_path), signal.SIGTERM)
    assert signals == "TERM\n" and rc == 75 and calls == "", out
    assert "not requeued" in out


def test_a_job_that_ends_normally_is_not_requeued_and_requeue_can_be_off(tmp_path):
    rc, out, calls, _ = run_script(tmp_path, render(tmp_path), None, srun_s=5)
    assert rc == 0 and calls == "", out
    for name in ("srun.pid", "srun.signals"):
        (tmp_path / name).unlink(missing_ok=True)
    script = render(tmp_path, requeue=False, signal_s=0)
    assert "--signal" not in script.read_text() and "\n#SBATCH --no-requeue\n" in script.read_text()
    rc, out, calls, _ = run_script(tmp_path, script, signal.SIGUSR1)
    assert rc == 75 and calls == "" and "cluster.slurm.requeue is off" in out


def test_a_signal_time_that_leaves_no_time_to_train_is_refused(tmp_path):
    from launcher.slurm.job import render_script  # noqa: F401  (import check)
    from trainer.errors import UserError

    with pytest.raises(UserError, match="cluster.slurm.signal_s 120: must be less than half of --time 3:00"):
        render(tmp_path, time="3:00")
    with pytest.raises(UserError, match="--sig is set by the launcher"):
        render(tmp_path, extra_sbatch=("--sig=USR2@5",))


# ---------------------------------------------------------------- the task runner

def test_the_task_runner_runs_the_role_in_its_own_process_and_reports_the_exit(tmp_path):
    ok = run_bounded([sys.executable, "-m", "trainer.commands.slurm_role", "--run", "7", "rank 7", "--", "--version"],
                     60, cwd=tmp_path)
    assert ok.returncode == 0 and ok.stdout.strip().endswith("unet-train slurm-task: task 7 (rank 7) exited 0")
    bad = run_bounded([sys.executable, "-m", "trainer.commands.slurm_role", "--run", "3", "worker1", "--", "train",
                       "--settings", tmp_path / "missing.yaml"], 60, cwd=tmp_path)
    assert bad.returncode == 2 and "unet-train slurm-task: task 3 (worker1) exited 2" in bad.stdout
    outside = run_bounded([sys.executable, "-m", "trainer.commands.slurm_role", "--mode", "horovod", "--settings",
                           tmp_path / "missing.yaml"], 60, cwd=tmp_path)
    assert outside.returncode == 2 and "settings file not found" in outside.stdout


# ---------------------------------------------------------------- a single process, end to end

@pytest.mark.slow
def test_single_run_checkpoints_on_usr1_exits_75_and_resumes_mid_epoch(prepared_brats, tmp_path):
    steps = 30
    args = ["train", "--model", "2d", "--epochs", "2", "--run-dir", tmp_path / "runs", "--run-name", "s",
            "--set", f"data.dataset={prepared_brats}", "--set", "model.base_filters_2d=4",
            "--set", "train.batch_size=2", "--set", f"train.steps_per_epoch={steps}",
            "--set", "train.checkpoint_every_steps=5", "--set", "train.validation_steps=1",
            "--set", "train.image_every_epochs=0", "--set", "train.validate_full_volumes=false", "--quiet"]
    run = tmp_path / "runs" / "s"
    log = tmp_path / "first.out"
    proc = subprocess.Popen([str(a) for a in unet_train_cmd(*args)], cwd=tmp_path, env=child_env(),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "steps" / "step-5.index").exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGUSR1)
        assert proc.wait(timeout=120) == 75, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            kill_group(proc)
    out = log.read_text()
    [entry] = json.loads((run / "preemptions.json").read_text())
    assert entry["signal"] == "SIGUSR1" and entry["dist"] == "single" and 5 <= entry["step_in_epoch"] < steps
    assert entry["signal_to_checkpoint_s"] < 60 and "exit 75" in out and "Traceback" not in out
    assert out.strip().splitlines()[-1].startswith("unet-train train: error: SIGUSR1: checkpointed at epoch 1")
    again = run_bounded(unet_train_cmd(*args), 300, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:]
    assert f"resuming epoch 1 at step {entry['step_in_epoch']}/{steps}" in again.stdout
    assert f"step-{entry['global_step']}: epoch 0, step {entry['global_step']}" in again.stdout  # no step lost
    assert json.loads((run / "summary.json").read_text())["step"] == 2 * steps  # none repeated
