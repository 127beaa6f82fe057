"""`unet-train distributed --scheduler slurm` against a real single-node Slurm (slurmctld + slurmd
+ munged on 127.0.0.1, started by the fixture), plus the pieces that need no cluster."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.procs import (child_env, free_port_block, kill_group, processes_mentioning, run_bounded, unet_train_cmd,
                           wait_until_gone)
from support.slurm_cluster import NODE, PARTITION, available, start_slurm_cluster

pytestmark = pytest.mark.slow  # trains models or starts processes: not in scripts/test.sh --fast

needs_slurm = pytest.mark.skipif(not available(), reason="slurm-wlm/munge not installed or not root (scripts/setup.sh)")
TIMEOUT = 300


# Slurm holds a requeued job until the job credentials of its last run have expired (AuthInfo
# cred_expire, 120 s by default) before it may start again. The tests' cluster uses 20 s.
CRED_EXPIRE_S = 20


@pytest.fixture(scope="module")
def slurm():
    import support.slurm_cluster as cluster_module

    config = cluster_module._config
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cluster_module, "_config", lambda *args: re.sub(
            r"^(AuthInfo=\S+)$", rf"\1,cred_expire={CRED_EXPIRE_S}", config(*args), flags=re.M))
        cluster = start_slurm_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()




def tiny(prepared_brats, tmp_path, epochs: int = 1) -> list[str]:
    base = free_port_block(5)  # 4 tasks on the node + the chief's control port
    return ["--model", "2d", "--epochs", str(epochs), "--set", f"data.dataset={prepared_brats}",
            "--set", "model.base_filters_2d=4", "--set", "train.batch_size=2", "--set", "train.steps_per_epoch=3",
            "--set", "train.validation_steps=1", "--set", "train.image_every_epochs=0", "--quiet",
            "--set", f"train.run_dir={tmp_path / 'runs'}", "--set", f"cluster.python={sys.executable}",
            "--set", f"cluster.slurm.port_base={base}", "--set", f"cluster.control_port={base + 4}",
            "--set", "cluster.slurm.poll_s=0.5"]


def job_processes(settings_file: Path) -> list[str]:
    """Processes of a run's job: every task's command line names the run's settings file."""
    return processes_mentioning(settings_file)


def wait_gone(settings_file: Path, timeout: float = 30) -> list[str]:
    return wait_until_gone(settings_file, timeout)


# ---------------------------------------------------------------- no cluster needed

def test_dry_run_shows_the_whole_batch_script_and_writes_nothing(tmp_path):
    result = run_bounded(unet_train_cmd(
        "distributed", "--scheduler", "slurm", "--mode", "horovod", "--nodes", "2", "--ntasks-per-node", "4",
        "--cpus-per-task", "8", "--partition", "knl", "--time", "2:00:00", "--account", "proj1",
        "--constraint", "quad,flat", "--run-name", "dry", "--dry-run", "--set", f"train.run_dir={tmp_path / 'runs'}",
        "--set", "cluster.slurm.extra_sbatch=[--exclusive, --mem=64G]", "--set", "cpu.knl_mcdram=true"),
        60, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    out = result.stdout
    for line in ("#SBATCH --job-name=unet-train-dry", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --partition=knl", "#SBATCH --time=2:00:00",
                 "#SBATCH --account=proj1", "#SBATCH --constraint=quad,flat", "#SBATCH --exclusive",
                 "#SBATCH --mem=64G", f"#SBATCH --output={tmp_path / 'runs' / 'dry' / 'slurm'}/job-%j.out",
                 f"#SBATCH --chdir={tmp_path}"):
        assert f"\n{line}\n" in out, line
    srun = next(line for line in out.splitlines() if line.startswith("srun "))
    assert "--mpi=pmix" in srun and "--kill-on-bad-exit=1" in srun and "--cpus-per-task=8" in srun
    assert "-m trainer.commands.slurm_role --mode horovod --settings" in srun and srun.endswith(" &")
    for line in ("#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@120", "#SBATCH --requeue"):
        assert f"\n{line}\n" in out, line
    assert 'scontrol requeue "$SLURM_JOB_ID"' in out
    assert "sbatch --parsable" in out and "scancel --name=unet-train-dry" in out
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing
    ps = run_bounded(unet_train_cmd("distributed", "--scheduler", "slurm", "--mode", "ps", "--ntasks-per-node", "4",
                                    "--dry-run", "--set", f"train.run_dir={tmp_path / 'runs'}"), 60, cwd=tmp_path)
    assert ps.returncode == 0 and "--mpi=none --kill-on-bad-exit=0" in ps.stdout, ps.stdout[-2000:]


@pytest.mark.parametrize("override, named", [
    ('cluster.slurm.extra_sbatch=["--mem=1G\\n#SBATCH --wrap=id"]', "cluster.slurm.extra_sbatch"),  # YAML \n
    ("cluster.slurm.extra_sbatch=['--comment=$(touch /tmp/x)']", "cluster.slurm.extra_sbatch"),
    ("cluster.slurm.extra_sbatch=[--output=/tmp/elsewhere]", "--output is (sbatch reads it as) --output"),
    # sbatch takes any unambiguous prefix of a long option (getopt_long): the second probe's forms
    ("cluster.slurm.extra_sbatch=[--outp=/tmp/elsewhere]", "--outp is (sbatch reads it as) --output"),
    ("cluster.slurm.extra_sbatch=[--out=/tmp/elsewhere]", "--out is (sbatch reads it as) --output"),
    ("cluster.slurm.extra_sbatch=[--chd=/tmp]", "--chd is (sbatch reads it as) --chdir"),
    ("cluster.slurm.extra_sbatch=[--wra=id]", "--wra is (sbatch reads it as) --wrap"),
    ("cluster.slurm.extra_sbatch=[--export-file=/tmp/env]", "--export-file is (sbatch reads it as) --export-file"),
    ("cluster.slurm.partition=debug;id", "cluster.slurm.partition"),
    ("cluster.slurm.time=1h", "cluster.slurm.time"),
    ("cluster.slurm.constraint=quad flat", "cluster.slurm.constraint"),
])
def test_unsafe_sbatch_values_are_refused(override, named, tmp_path):
    result = run_bounded(unet_train_cmd("distributed", "--scheduler", "slurm", "--dry-run",
                                        "--set", f"train.run_dir={tmp_path / 'runs'}", "--set", override), 60,
                         cwd=tmp_path)
    assert result.returncode != 0 and named in result.stdout, result.stdout[-2000:]
    assert "Traceback" not in result.stdout and not any(line.startswith("#SBATCH") for line in result.stdout.splitlines())


def test_a_run_dir_that_cannot_go_in_an_sbatch_line_is_refused(tmp_path):
    result = run_bounded(unet_train_cmd("distributed", "--scheduler", "slurm", "--dry-run",
                                        "--set", f"train.run_dir={tmp_path / 'my runs'}"), 60, cwd=tmp_path)
    assert result.returncode != 0 and "train.run_dir" in result.stdout and "no spaces" in result.stdout
    assert len(result.stdout.strip().splitlines()) == 1, result.stdout
    too_few = run_bounded(unet_train_cmd("distributed", "--scheduler", "slurm", "--mode", "ps", "--dry-run",
                                         "--ntasks-per-node", "2", "--set", f"train.run_dir={tmp_path}"), 60,
                          cwd=tmp_path)
    assert too_few.returncode != 0 and "PS mode needs cluster.slurm.ps_tasks (1) + 1 chief" in too_few.stdout
    hosts = run_bounded(unet_train_cmd("distributed", "--scheduler", "slurm", "--hosts", "node1", "--dry-run",
                                       "--set", f"train.run_dir={tmp_path}"), 60, cwd=tmp_path)
    assert hosts.returncode != 0 and "--hosts: not used with --scheduler slurm" in hosts.stdout


def test_output_lines_are_labelled_with_node_and_role():
    from launcher.slurm.follow import TaskLabels

    labels = TaskLabels()
    assert labels.label("unet-train: job 7 on n[1-2]") == "[slurm] unet-train: job 7 on n[1-2]"
    assert labels.label(" 3: early line") == "[? task 3] early line"
    labels.label(" 3: unet-train slurm-task: task 3 on n2 is worker1 (threads 8: 8 allocated core(s) / 1 process(es))")
    assert labels.label(" 3: step 1") == "[n2 worker1] step 1"
    labels.label("10: unet-train slurm-task: task 10 on n3 is rank 10 (threads auto: x)")
    assert labels.label("10: loss 0.5") == "[n3 rank 10] loss 0.5"
    labels.label(" 3: unet-train slurm-task: task 3 (worker1) exited 1")
    labels.label("10: unet-train slurm-task: task 10 (rank 10) exited 0")
    assert labels.failed() == {3: 1} and labels.role(3) == "worker1 on n2"


def test_job_output_reads_whole_lines_until_the_end(tmp_path):
    from launcher.slurm.follow import JobOutput

    path = tmp_path / "job.out"
    output = JobOutput(path)
    assert output.read() == []  # not there before the job starts
    path.write_text("0: one\n0: tw")
    assert output.read() == ["0: one"]
    with open(path, "a") as handle:
        handle.write("o\n1: last")
    assert output.read() == ["0: two"] and output.read(final=True) == ["1: last"]


def test_slurm_times():
    from launcher.slurm.walltime import minutes

    assert [minutes(t) for t in ("60", "1:30", "2:00:00", "1-00:00:00", "2-12", "1-00:30")] == \
        [60, 1.5, 120, 1440, 3600, 1470]
    assert minutes("UNLIMITED") is None and minutes("INFINITE") is None


def test_ps_roles_come_from_tensorflows_slurm_resolver(monkeypatch):
    """2 nodes x 2 tasks: task 0 chief, 1 ps0 (node n1), 2-3 workers (node n2); threads = allocated cores."""
    from launcher.slurm.task import task_command
    from trainer.config.settings import ClusterSettings, Settings, SlurmSettings

    settings = Settings(cluster=ClusterSettings(slurm=SlurmSettings(port_base=7000, ps_tasks=1)))
    roles = {}
    for task in range(4):
        env = {"SLURM_PROCID": str(task), "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NODELIST": "n[1-2]",
               "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_CPUS_PER_TASK": "3", "SLURMD_NODENAME": "nX"}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        command = task_command(settings, "ps", "/shared/run/settings.yaml", env, python="/venv/bin/python")
        roles[task] = command
    assert [roles[t].role for t in range(4)] == ["chief", "ps0", "worker0", "worker1"]
    argv = roles[3].argv
    assert argv[:5] == ("/venv/bin/python", "-m", "trainer.cli", "worker", "--index") and argv[5] == "1"
    assert "cluster.ps_hosts=[n1:7001]" in argv and "cluster.worker_hosts=[n2:7000,n2:7001]" in argv
    assert "cluster.chief_host=n1:7000" in argv and "logging.log_file=training-worker1.log" in argv
    assert roles[0].argv[3] == "chief" and "--index" not in roles[0].argv
    assert "cpu.intra_op_threads=3" in argv and "cpu.omp_num_threads=3" in argv  # from the allocation
    runner = roles[3].exec_argv()  # Python itself, no shell in between: Slurm's signals reach it
    assert runner[:6] == ["/venv/bin/python", "-m", "trainer.commands.slurm_role", "--run", "3", "worker1"]
    assert runner[6] == "--" and tuple(runner[7:]) == argv[3:]


def test_horovod_task_is_one_rank_with_the_allocations_threads():
    from launcher.slurm.task import task_command
    from trainer.config.settings import CpuSettings, Settings

    env = {"SLURM_PROCID": "1", "SLURM_CPUS_PER_TASK": "2", "SLURMD_NODENAME": "n7"}
    command = task_command(Settings(cpu=CpuSettings(knl_mcdram=True)), "horovod", "/s.yaml", env, python="/py")
    assert command.role == "rank 1" and command.host == "n7"
    assert command.argv[:3] == ("numactl", "-p", "1") or not _numactl()
    # numactl execs Python, which runs the role: still no shell between Slurm and the trainer
    assert command.exec_argv()[len(command.prefix):len(command.prefix) + 4] == [
        "/py", "-m", "trainer.commands.slurm_role", "--run"]
    assert "train" in command.argv and "horovod" in command.argv and "cpu.intra_op_threads=2" in command.argv
    pinned = task_command(Settings(cpu=CpuSettings(intra_op_threads=5)), "horovod", "/s.yaml", env, python="/py")
    assert "cpu.intra_op_threads=5" in pinned.argv  # cpu.intra_op_threads wins, as on SSH hosts


def _numactl() -> bool:
    import shutil

    return shutil.which("numactl") is not None


def test_a_lost_ps_worker_is_a_warning_when_the_chief_finished(tmp_path):
    import io

    from launcher.base import LaunchError
    from launcher.slurm.client import JobInfo
    from launcher.slurm.launch import SlurmLauncher
    from trainer.config.settings import Settings, TrainSettings

    def launcher(mode, lines):
        out = io.StringIO()
        slurm = SlurmLauncher(Settings(train=TrainSettings(run_dir=tmp_path)), mode, out=out)
        for line in lines:
            slurm.labels.label(line)
        return slurm, out

    announce = "{t}: unet-train slurm-task: task {t} on n1 is {r} (threads 1: x)"
    exited = "{t}: unet-train slurm-task: task {t} ({r}) exited {rc}"
    roles = {0: "chief", 1: "ps0", 2: "worker0", 3: "worker1"}
    lines = [announce.format(t=t, r=r) for t, r in roles.items()]
    codes = {0: 0, 1: 0, 2: 137, 3: 0}
    failed = JobInfo("9", "FAILED", "NonZeroExitCode", 137, 0, "n1")
    slurm, out = launcher("ps", lines + [exited.format(t=t, r=roles[t], rc=rc) for t, rc in codes.items()])
    slurm._check_outcome("9", failed)
    assert "warning: worker0 on n1 exited 137; the chief finished without it" in out.getvalue()
    codes = {0: 1, 1: 0, 2: 0, 3: 0}
    slurm, _ = launcher("ps", lines + [exited.format(t=t, r=roles[t], rc=rc) for t, rc in codes.items()])
    with pytest.raises(LaunchError, match="chief on n1 exited 1"):
        slurm._check_outcome("9", failed)
    ranks = [announce.format(t=0, r="rank 0"), exited.format(t=0, r="rank 0", rc=0)]
    slurm, _ = launcher("horovod", ranks)
    with pytest.raises(LaunchError, match="TIMEOUT"):
        slurm._check_outcome("9", JobInfo("9", "TIMEOUT", "TimeLimit", 0, 15, "n1"))


# ---------------------------------------------------------------- a real slurmctld + slurmd

@needs_slurm
def test_doctor_and_a_bad_partition(slurm, tmp_path):
    flags = ["--set", f"cluster.python={sys.executable}", "--set", f"train.run_dir={tmp_path}"]
    ok = run_bounded(unet_train_cmd("doctor", "--scheduler", "slurm", "--mode", "horovod", *flags), 120,
                     cwd=tmp_path, **slurm.env)
    assert ok.returncode == 0, ok.stdout[-3000:]
    assert f"partition {PARTITION}: UP" in ok.stdout and "horovod 0.28.1" in ok.stdout
    assert "the Slurm cluster can run this job" in ok.stdout
    for command in ("doctor", "distributed"):
        bad = run_bounded(unet_train_cmd(command, "--scheduler", "slurm", "--partition", "gpu-nope", *flags), 120,
                          cwd=tmp_path, **slurm.env)
        lines = bad.stdout.strip().splitlines()
        assert bad.returncode != 0 and len(lines) == 1, bad.stdout
        assert "'gpu-nope'" in lines[0] and "no such partition" in lines[0] and f"partitions: {PARTITION}" in lines[0]
    too_big = run_bounded(unet_train_cmd("doctor", "--scheduler", "slurm", "--nodes", "3", "--time", "2:00:00",
                                         *flags), 120, cwd=tmp_path, **slurm.env)
    assert too_big.returncode != 0 and "--time 2:00:00 exceeds MaxTime=00:30:00 of partition 'debug'" in too_big.stdout
    assert "has 1 usable node(s)" in too_big.stdout and "--nodes asks for 3" in too_big.stdout
    assert not list(tmp_path.rglob("job.sbatch"))  # nothing was submitted


@needs_slurm
def test_horovod_two_tasks_stream_and_finish(slurm, prepared_brats, tmp_path):
    result = run_bounded(unet_train_cmd("distributed", "--scheduler", "slurm", "--mode", "horovod", "--nodes", "1",
                                        "--ntasks-per-node", "2", "--run-name", "hvd",
                                        *tiny(prepared_brats, tmp_path)), TIMEOUT, cwd=tmp_path, **slurm.env)
    assert result.returncode == 0, result.stdout[-5000:]
    out = result.stdout
    run = tmp_path / "runs" / "hvd"
    assert f"[{NODE} rank 0] " in out and f"[{NODE} rank 1] unet-train slurm-task: task 1 on {NODE} is rank 1" in out
    assert "2 worker(s) x batch 2 = global batch 4" in out and "(threads 1: 1 allocated core(s)" in out
    assert f"[{NODE} rank 0] unet-train slurm-task: task 0 (rank 0) exited 0" in out
    assert "[slurm] job " in out and ": COMPLETED" in out
    merged = (run / "training.log").read_text()
    assert f"[{NODE} rank 0] " in merged and "global batch 4" in merged  # streamed into the run's log too
    assert (run / "job.sbatch").read_text().startswith("#!/bin/sh")
    record = json.loads((run / "slurm" / "job.json").read_text())
    assert (run / "slurm" / f"job-{record['job_id']}.out").exists()
    assert (run / "checkpoints" / "last" / "epoch-1.index").exists()
    launch = json.loads((run / "launcher" / "launch.json").read_text())
    assert launch["scheduler"] == "slurm" and launch["submit_to_first_training_s"] > 0
    assert wait_gone(run / "slurm" / "settings.yaml") == []


@needs_slurm
def test_ps_one_ps_two_workers_stream_and_finish(slurm, prepared_brats, tmp_path):
    result = run_bounded(unet_train_cmd("distributed", "--scheduler", "slurm", "--mode", "ps", "--nodes", "1",
                                        "--ntasks-per-node", "4", "--run-name", "psrun",
                                        *tiny(prepared_brats, tmp_path)), TIMEOUT, cwd=tmp_path, **slurm.env)
    assert result.returncode == 0, result.stdout[-5000:]
    out = result.stdout
    for tag in ("chief", "ps0", "worker0", "worker1"):
        assert f"[{NODE} {tag}] " in out, tag
        assert f"({tag}) exited 0" in out, tag
    assert "synchronous SGD" in out and "2 worker(s) x batch 2 = global batch 4" in out
    assert "ps 0: chief says stop (exit 0)" in out  # the lifecycle channel ended every role
    run = tmp_path / "runs" / "psrun"
    assert (run / "checkpoints" / "last" / "epoch-1.index").exists()
    assert wait_gone(run / "slurm" / "settings.yaml") == []


def _start_long_run(slurm, prepared_brats, tmp_path, mode: str, run: str, tasks: str):
    log = open(tmp_path / f"{run}.out", "w")
    proc = subprocess.Popen([str(a) for a in unet_train_cmd(
        "distributed", "--scheduler", "slurm", "--mode", mode, "--ntasks-per-node", tasks, "--run-name", run,
        *tiny(prepared_brats, tmp_path, epochs=1000))], cwd=tmp_path, env=child_env(**slurm.env), stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + TIMEOUT
    while "global batch" not in (tmp_path / f"{run}.out").read_text():
        assert proc.poll() is None, (tmp_path / f"{run}.out").read_text()[-3000:]
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.5)
    return proc


@needs_slurm
def test_stop_cancels_the_running_job_and_leaves_no_process(slurm, prepared_brats, tmp_path):
    settings_file = tmp_path / "runs" / "stopme" / "slurm" / "settings.yaml"
    proc = _start_long_run(slurm, prepared_brats, tmp_path, "ps", "stopme", "4")
    try:
        assert len(job_processes(settings_file)) >= 4  # chief, PS and both workers are running
        stop = run_bounded(unet_train_cmd("distributed", "--stop", "--run-name", "stopme",
                                          "--set", f"train.run_dir={tmp_path / 'runs'}"), 120, cwd=tmp_path,
                           **slurm.env)
        assert stop.returncode == 0, stop.stdout[-3000:]
        assert "scancel" in stop.stdout and "CANCELLED" in stop.stdout
        assert proc.wait(timeout=120) == 1  # the launcher reports the cancelled job
    finally:
        if proc.poll() is None:
            kill_group(proc)
    out = (tmp_path / "stopme.out").read_text()
    assert "training failed: job" in out and "CANCELLED" in out
    assert wait_gone(settings_file) == [], out[-3000:]
    assert slurm.client("squeue", "-h").stdout.strip() == ""
    again = run_bounded(unet_train_cmd("distributed", "--stop", "--run-name", "stopme", "--scheduler", "slurm",
                                       "--set", f"train.run_dir={tmp_path / 'runs'}"), 120, cwd=tmp_path, **slurm.env)
    assert again.returncode == 0 and "has already ended" in again.stdout
    none = run_bounded(unet_train_cmd("distributed", "--stop", "--run-name", "never", "--scheduler", "slurm",
                                      "--set", f"train.run_dir={tmp_path / 'runs'}"), 120, cwd=tmp_path, **slurm.env)
    assert none.returncode != 0 and "no Slurm job recorded for run 'never'" in none.stdout


@needs_slurm
def test_ctrl_c_cancels_the_job(slurm, prepared_brats, tmp_path):
    settings_file = tmp_path / "runs" / "cc" / "slurm" / "settings.yaml"
    proc = _start_long_run(slurm, prepared_brats, tmp_path, "horovod", "cc", "2")
    try:
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            kill_group(proc)
    out = (tmp_path / "cc.out").read_text()
    assert "interrupted: cancelling the job" in out and "scancel" in out
    assert wait_gone(settings_file) == [], out[-3000:]
    assert slurm.client("squeue", "-h").stdout.strip() == ""


# ---------------------------------------------------------------- time limits and preemption

PREEMPT_STEPS = 40  # steps per epoch: the signal lands mid-epoch 1, after the periodic checkpoint at step 10


def preempted_run(slurm, prepared_brats, tmp_path, mode: str, tasks: str, run: str) -> dict:
    """Start a 2-epoch run, send the batch shell SIGUSR1 (what --signal=B:USR1@s does before the
    time limit) once step 10 is checkpointed, and follow it through its requeue to the end.
    Returns the launcher's exit code and output, the job's record and the timings."""
    flags = tiny(prepared_brats, tmp_path, epochs=2) + [
        "--set", f"train.steps_per_epoch={PREEMPT_STEPS}", "--set", "train.checkpoint_every_steps=10",
        "--set", "train.validate_full_volumes=false", "--time", "20:00", "--set", "cluster.slurm.signal_s=60"]
    log_path = tmp_path / f"{run}.out"
    proc = subprocess.Popen([str(a) for a in unet_train_cmd(
        "distributed", "--scheduler", "slurm", "--mode", mode, "--ntasks-per-node", tasks, "--run-name", run,
        *flags)], cwd=tmp_path, env=child_env(**slurm.env), stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    run_dir = tmp_path / "runs" / run
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (run_dir / "checkpoints" / "steps" / "step-10.index").exists():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "training never reached step 10"
            time.sleep(0.2)
        job_id = json.loads((run_dir / "slurm" / "job.json").read_text())["job_id"]
        signalled = time.time()
        sent = slurm.client("scancel", "--signal=USR1", "--batch", job_id, timeout=60)
        assert sent.returncode == 0, sent.stderr
        requeued_at = nudged_at = None
        while proc.poll() is None:
            record = slurm.client("scontrol", "show", "job", "-o", job_id).stdout
            if requeued_at is None and "Restarts=1" in record:
                requeued_at = time.time()
            if (nudged_at is None and requeued_at is not None and "JobState=PENDING" in record
                    and time.time() > requeued_at + CRED_EXPIRE_S + 2):
                # Eligible again (its begin time has passed): start it now rather than at the
                # scheduler's next periodic pass (up to a minute later).
                slurm.client("scontrol", "update", f"JobId={job_id}", "StartTime=now")
                nudged_at = time.time()
            assert time.monotonic() < deadline + TIMEOUT, "the requeued job never finished"
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    return {"rc": proc.returncode, "out": log_path.read_text(), "run_dir": run_dir, "job_id": job_id,
            "signalled": signalled, "requeued_at": requeued_at}


def check_preempted_run(result: dict, rank0: str, roles: list[str]) -> dict:
    out, run_dir = result["out"], result["run_dir"]
    assert result["rc"] == 0, out[-6000:]
    [entry] = json.loads((run_dir / "preemptions.json").read_text())  # one checkpoint on a signal
    assert entry["signal"] == "SIGUSR1" and entry["epoch"] == 1 and entry["slurm_restart_count"] == 0
    assert 10 <= entry["step_in_epoch"] < PREEMPT_STEPS, entry  # mid-epoch, after the periodic step-10 save
    assert entry["checkpoint"].endswith(f"step-{entry['global_step']}")
    for role in roles:  # every task left with 75, the batch script requeued the job
        assert f"({role}) exited 75" in out, role
    assert f"every task checkpointed after SIGUSR1 (exit 75): scontrol requeue {result['job_id']}" in out
    assert "restart 1" in out and "[slurm] job " in out and ": COMPLETED" in out
    resumed = re.search(rf"\[{NODE} {rank0}\] .*resuming from \S+/step-(\d+): epoch 0, step (\d+)", out)
    assert resumed and int(resumed.group(1)) == entry["global_step"], out[-6000:]
    assert f"resuming epoch 1 at step {entry['step_in_epoch']}/{PREEMPT_STEPS}" in out
    steps_lost = entry["global_step"] - int(resumed.group(2))  # applied before the exit, minus resumed from
    assert steps_lost <= 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 2 * PREEMPT_STEPS  # every step once: none skipped, none repeated
    assert entry["signal_to_checkpoint_s"] < 60, entry
    return {"steps_lost": steps_lost, "signal_to_checkpoint_s": entry["signal_to_checkpoint_s"],
            "step_in_epoch": entry["step_in_epoch"]}


@needs_slurm
def test_horovod_usr1_checkpoints_requeues_and_resumes_mid_epoch(slurm, prepared_brats, tmp_path):
    result = preempted_run(slurm, prepared_brats, tmp_path, "horovod", "2", "hvdpre")
    check_preempted_run(result, "rank 0", ["rank 0", "rank 1"])
    script = (result["run_dir"] / "job.sbatch").read_text()
    assert "\n#SBATCH --signal=B:USR1@60\n" in script and "\n#SBATCH --requeue\n" in script
    assert wait_gone(result["run_dir"] / "slurm" / "settings.yaml") == []
    assert slurm.client("squeue", "-h").stdout.strip() == ""


@needs_slurm
def test_ps_usr1_chief_checkpoints_requeues_and_resumes_mid_epoch(slurm, prepared_brats, tmp_path):
    """PS mode: the chief alone decides (only it runs the loop); ps and workers outlive the signal
    until its checkpoint (read from the parameter server) is written, then leave with its 75."""
    result = preempted_run(slurm, prepared_brats, tmp_path, "ps", "4", "pspre")
    check_preempted_run(result, "chief", ["chief", "ps0", "worker0", "worker1"])
    assert "ps 0: chief says stop (exit 75)" in result["out"]
    assert wait_gone(result["run_dir"] / "slurm" / "settings.yaml") == []
