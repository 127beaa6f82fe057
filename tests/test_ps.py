"""Parameter-server mode with real PS, worker and chief processes on 127.0.0.1."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from support.procs import kill_group, child_env, unet_train_cmd
from test_horovod import SGD_EXACT, model_weights, train_single

pytestmark = pytest.mark.slow  # trains models or starts processes: not in scripts/test.sh --fast

TIMEOUT = 240


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class Cluster:
    """1 PS + N workers + chief as separate processes, each in its own group, killed by PID at the end."""

    def __init__(self, tmp_path: Path, log_dir: Path, workers: int = 2, startup_timeout: float = 60):
        ps, *rest = free_ports(workers + 3)
        self.worker_ports, (chief, control) = rest[:workers], rest[workers:]
        self.flags = ["--set", f"cluster.ps_hosts=[127.0.0.1:{ps}]",
                      "--set", "cluster.worker_hosts=[" + ",".join(f"127.0.0.1:{p}" for p in self.worker_ports) + "]",
                      "--set", f"cluster.chief_host=127.0.0.1:{chief}", "--set", f"cluster.control_port={control}",
                      "--set", f"cluster.startup_timeout_s={startup_timeout}"]
        self.tmp_path, self.log_dir = tmp_path, log_dir
        log_dir.mkdir(parents=True)
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "w")
        proc = subprocess.Popen([str(a) for a in unet_train_cmd(*args, *self.flags)], cwd=self.tmp_path,
                                env=child_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_servers(self, workers: int | None = None) -> None:
        self.start("ps0", "ps", "--index", "0")
        for index in range(len(self.worker_ports) if workers is None else workers):
            self.start(f"worker{index}", "worker", "--index", str(index))

    def chief(self, *args) -> subprocess.Popen:
        return self.start("chief", "chief", "--model", "2d", "--run-dir", self.tmp_path / "runs", *args)

    def wait_all(self, timeout: float = TIMEOUT) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                codes[name] = None  # still running: a lifecycle bug
        return codes

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def cleanup(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                kill_group(proc)


@pytest.fixture
def cluster(tmp_path):
    made: list[Cluster] = []

    def make(**kwargs) -> Cluster:
        made.append(Cluster(tmp_path, tmp_path / f"cluster{len(made)}-logs", **kwargs))
        return made[-1]
    yield make
    for c in made:
        c.cleanup()


def data_flags(prepared_brats):
    return ["--set", f"data.dataset={prepared_brats}"]


def test_ps_sync_sgd_equals_one_process_at_double_batch(cluster, prepared_brats, tmp_path):
    single = model_weights(train_single(tmp_path, "single", 4, prepared_brats, *SGD_EXACT))
    c = cluster()
    c.start_servers()
    c.chief("--run-name", "ps", "--epochs", "1", "--batch-size", "2", *data_flags(prepared_brats), *SGD_EXACT)
    codes = c.wait_all()
    assert codes == {"ps0": 0, "worker0": 0, "worker1": 0, "chief": 0}, c.log("chief")[-3000:]
    assert "model variables on /job:ps/" in c.log("chief")
    assert "2 worker(s) x batch 2 = global batch 4" in c.log("chief")
    distributed = model_weights(tmp_path / "runs" / "ps")
    worst = max(float(np.abs(single[k] - distributed[k]).max()) for k in single)
    assert worst < 2e-5, f"PS sync SGD diverged from 1-process SGD by {worst}"
    summary = json.loads((tmp_path / "runs" / "ps" / "summary.json").read_text())
    assert summary["step"] == 3 and summary["dist"] == "ps" and summary["workers"] == 2


def _wait_for_epoch(run: Path, epoch: int, procs, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    history = run / "history.json"
    while time.monotonic() < deadline:
        if history.exists():
            epochs = json.loads(history.read_text())["epochs"]
            if epochs and epochs[-1]["epoch"] >= epoch:
                return
        assert all(p.poll() is None for p in procs), "a process exited early"
        time.sleep(0.1)
    raise AssertionError(f"epoch {epoch} not reached within {timeout} s")


def test_worker_killed_mid_training_job_finishes_without_double_update(cluster, prepared_brats, tmp_path):
    flags = ["--epochs", "6", "--batch-size", "2", *data_flags(prepared_brats), *SGD_EXACT,
             "--set", "train.steps_per_epoch=2"]
    clean = cluster()
    clean.start_servers()
    clean.chief("--run-name", "clean", *flags)
    assert set(clean.wait_all().values()) == {0}, clean.log("chief")[-3000:]

    faulty = cluster()
    faulty.start_servers()
    chief = faulty.chief("--run-name", "faulty", *flags)
    _wait_for_epoch(tmp_path / "runs" / "faulty", 1, [chief])
    # From here on, worker 1's coordinator thread fails the next closure it takes; TensorFlow puts
    # that closure back and worker 0 re-runs it: the re-run path this test is about.
    os.killpg(faulty.procs["worker1"].pid, signal.SIGKILL)
    codes = faulty.wait_all()
    assert codes["chief"] == 0 and codes["ps0"] == 0 and codes["worker0"] == 0, faulty.log("chief")[-3000:]
    assert "lost worker 1" in faulty.log("chief")
    history = json.loads((tmp_path / "runs" / "faulty" / "history.json").read_text())["epochs"]
    assert [(e["epoch"], e["step"]) for e in history] == [(e, 2 * e) for e in range(1, 7)]
    # Every step applied exactly one average of both shards: the weights equal the clean run's.
    expected, actual = model_weights(tmp_path / "runs" / "clean", 6), model_weights(tmp_path / "runs" / "faulty", 6)
    worst = max(float(np.abs(expected[k] - actual[k]).max()) for k in expected)
    assert worst < 1e-5, f"a killed worker changed the result by {worst} (double or missing update)"


def test_missing_worker_is_named_at_startup(cluster, prepared_brats, tmp_path):
    c = cluster(startup_timeout=4)
    c.start_servers(workers=1)  # worker 1 never starts
    c.chief("--run-name", "x", "--epochs", "1", *data_flags(prepared_brats))
    codes = c.wait_all(timeout=120)
    log = c.log("chief")
    assert codes["chief"] not in (0, None)
    assert f"worker 1 (127.0.0.1:{c.worker_ports[1]})" in log and "within 4 s" in log
    assert "Traceback" not in log
    assert codes["ps0"] == 1 and codes["worker0"] == 1  # told to stop: the job failed


def test_spoofed_control_messages_neither_register_nor_stop_anything(cluster, prepared_brats, tmp_path):
    """Seen: `HELLO worker N` lines from anyone satisfied the start-up wait, and `HELLO ps 0` plus a
    disconnect made the chief report PS 0 lost and kill the job. Now both are refused (no token)."""
    import threading

    c = cluster(startup_timeout=8)
    c.start_servers(workers=1)  # worker 1 never starts: only a spoofer claims to be it
    chief = c.chief("--run-name", "spoof", "--epochs", "1", *data_flags(prepared_brats))
    control = int(next(f for f in c.flags if f.startswith("cluster.control_port=")).split("=", 1)[1])
    done = threading.Event()

    def spoof() -> None:
        while not done.is_set() and chief.poll() is None:
            for line in (b"HELLO worker 1\n", b"HELLO ps 0\n"):
                try:
                    with socket.create_connection(("127.0.0.1", control), timeout=1) as conn:
                        conn.sendall(line)
                except OSError:
                    pass
            time.sleep(0.2)

    spoofer = threading.Thread(target=spoof, daemon=True)
    spoofer.start()
    try:
        codes = c.wait_all(timeout=180)
    finally:
        done.set()
        spoofer.join(10)
    log = c.log("chief")
    assert codes["chief"] not in (0, None), log[-3000:]
    assert f"worker 1 (127.0.0.1:{c.worker_ports[1]})" in log and "within 8 s" in log, log[-3000:]
    assert "connection(s) refused" in log and "lost ps 0" not in log, log[-3000:]
    assert codes["ps0"] == 1 and codes["worker0"] == 1  # the real roles were registered and told to stop


def test_ps_loss_stops_chief_and_rerun_resumes(cluster, prepared_brats, tmp_path):
    flags = ["--run-name", "r", "--epochs", "4", "--batch-size", "2", *data_flags(prepared_brats),
             "--set", "model.base_filters_2d=4", "--set", "train.steps_per_epoch=2",
             "--set", "train.validation_steps=1", "--set", "cluster.step_timeout_s=60", "--quiet"]
    first = cluster()
    first.start_servers()
    chief = first.chief(*flags)
    _wait_for_epoch(tmp_path / "runs" / "r", 1, [chief])
    os.killpg(first.procs["ps0"].pid, signal.SIGKILL)
    codes = first.wait_all(timeout=180)
    log = first.log("chief")
    assert codes["chief"] not in (0, None), log[-3000:]
    assert "parameter-server training stopped: lost ps 0" in log and "resume from" in log, log[-3000:]
    assert "Traceback" not in log
    assert codes["worker0"] is not None and codes["worker1"] is not None  # nobody left blocking
    # The checkpoint, not history.json: the chief may have died between writing the two.
    checkpoint = tf.train.latest_checkpoint(str(tmp_path / "runs" / "r" / "checkpoints" / "last"))
    assert checkpoint, "no checkpoint written before the PS was killed"
    saved = int(checkpoint.rsplit("epoch-", 1)[1])

    second = cluster()
    second.start_servers()
    second.chief(*flags)
    assert set(second.wait_all().values()) == {0}, second.log("chief")[-3000:]
    assert f"epoch {saved}, step {2 * saved}" in second.log("chief")
    history = json.loads((tmp_path / "runs" / "r" / "history.json").read_text())["epochs"]
    assert [e["epoch"] for e in history] == [1, 2, 3, 4] and history[-1]["step"] == 8


@pytest.mark.parametrize("context", [0, 1])
def test_ps_region_model_equals_one_process_at_double_batch(cluster, prepared_brats, tmp_path, context):
    """The WT/TC/ET model, also with 2.5D input, keeps the sync-SGD equivalence with 1 PS + 2 workers."""
    regions = [*SGD_EXACT, "--set", "model.regions=[wt,tc,et]", "--set", f"model.context_slices_2d={context}"]
    single = model_weights(train_single(tmp_path, "single", 4, prepared_brats, *regions))
    c = cluster()
    c.start_servers()
    c.chief("--run-name", "ps", "--epochs", "1", "--batch-size", "2", *data_flags(prepared_brats), *regions)
    assert set(c.wait_all().values()) == {0}, c.log("chief")[-3000:]
    assert "regions wt/tc/et" in c.log("chief")
    distributed = model_weights(tmp_path / "runs" / "ps")
    worst = max(float(np.abs(single[k] - distributed[k]).max()) for k in single)
    assert worst < 2e-5, f"PS region SGD diverged from 1-process SGD by {worst}"


def test_ps_trains_at_the_automatic_precision_and_says_which(cluster, prepared_brats, tmp_path):
    from test_horovod import expected_auto_policy

    c = cluster()
    c.start_servers()
    c.chief("--run-name", "auto", "--epochs", "1", "--batch-size", "2", *data_flags(prepared_brats), *SGD_EXACT,
            "--set", "train.precision=auto")
    assert set(c.wait_all().values()) == {0}, c.log("chief")[-3000:]
    policy = expected_auto_policy()
    assert f"precision: {policy} (auto:" in c.log("chief") and f"{policy}, regions wt" in c.log("chief")
    assert all(v.dtype == np.float32 for v in model_weights(tmp_path / "runs" / "auto").values())
