"""A TFJob's start order: a peer's name (a Kubernetes headless service) resolves only once its pod
is ready. Roles wait for such names until cluster.startup_timeout_s, saying every 10 s which
peer is missing, instead of refusing the first one. Also: the control token as a Kubernetes
Secret mounts it for a non-root pod (root's file, group-readable through the pod's fsGroup)."""
from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.procs import child_env, kill_group, unet_train_cmd

REPO = Path(__file__).resolve().parent.parent


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.01)


def test_a_name_that_resolves_late_is_waited_for_and_the_wait_is_reported(caplog):
    from trainer.runtime.ps.peers import roles_by_host, wait_until_resolvable

    clock = FakeClock()
    late = {"ps-0.ns.svc": 25.0, "worker-1.ns.svc": 12.0}  # seconds until their pods are ready

    def resolver(host: str) -> list[str]:
        return ["10.0.0.7"] if clock.now >= late.get(host, 0.0) else []

    spec = {"ps": ["ps-0.ns.svc:2222"], "worker": ["worker-0.ns.svc:2222", "worker-1.ns.svc:2222"],
            "chief": ["chief-0.ns.svc:2222"]}
    with caplog.at_level(logging.INFO, logger="trainer.runtime.ps.peers"):
        waited = wait_until_resolvable([a for addresses in spec.values() for a in addresses], 60, "worker 0",
                                       roles_by_host(spec), resolver=resolver, clock=clock, sleep=clock.sleep)
    assert 25.0 <= waited < 26.0
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert lines[0].startswith("worker 0: waiting for ps-0.ns.svc (ps 0), worker-1.ns.svc (worker 1) to resolve (10 s")
    assert lines[1].startswith("worker 0: waiting for ps-0.ns.svc (ps 0) to resolve (20 s")  # worker 1 came
    assert len(lines) == 2  # one line every 10 s, not one per retry
    assert "every peer resolves now (after 25 s)" in caplog.text


def test_a_name_that_never_resolves_is_named_after_the_timeout():
    from trainer.errors import UserError
    from trainer.runtime.ps.peers import roles_by_host, wait_until_resolvable

    clock = FakeClock()
    spec = {"ps": ["gone.ns.svc:2222"], "chief": ["127.0.0.1:2225"]}
    with pytest.raises(UserError, match=r"chief: gone.ns.svc \(ps 0\) did not resolve within 30 s "
                                        r"\(cluster.startup_timeout_s\)"):
        wait_until_resolvable(["gone.ns.svc:2222", "127.0.0.1:2225"], 30, "chief", roles_by_host(spec),
                              resolver=lambda host: ["127.0.0.1"] if host == "127.0.0.1" else [],
                              clock=clock, sleep=clock.sleep)
    assert 30.0 <= clock.now < 31.0


# ---------------------------------------------------------------- real processes

# Runs unet-train with Python's resolver failing for one name until a given time: that name then
# "appears", as a headless service does once its pod is ready. gRPC resolves names itself, so
# only the role's own checks see the delay.
LATE_DNS = """
import os, runpy, socket, sys, time
late, until = os.environ["LATE_HOST"], float(os.environ["LATE_UNTIL"])
real = socket.getaddrinfo
def getaddrinfo(host, *args, **kwargs):
    if host == late and time.time() < until:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return real(host, *args, **kwargs)
socket.getaddrinfo = getaddrinfo
sys.argv = ["unet-train", *sys.argv[1:]]
runpy.run_module("trainer.cli", run_name="__main__")
"""


@pytest.mark.slow
def test_a_worker_whose_ps_name_resolves_late_waits_then_the_job_trains(prepared_brats, tmp_path):
    from test_ps import free_ports

    ps, worker, chief, control = free_ports(4)
    flags = ["--set", f"cluster.ps_hosts=[localhost:{ps}]", "--set", f"cluster.worker_hosts=[127.0.0.1:{worker}]",
             "--set", f"cluster.chief_host=127.0.0.1:{chief}", "--set", f"cluster.control_port={control}",
             "--set", "cluster.startup_timeout_s=90", "--set", f"cluster.token_file={tmp_path / 'token'}"]
    wrapper = tmp_path / "late_dns.py"
    wrapper.write_text(LATE_DNS)
    logs = {name: tmp_path / f"{name}.log" for name in ("ps0", "worker0", "chief")}
    late_until = time.time() + 14  # the worker's view: the PS's name resolves 14 s from now
    commands = {
        "ps0": unet_train_cmd("ps", "--index", "0", *flags),
        "worker0": [sys.executable, wrapper, "worker", "--index", "0", *flags],
        "chief": unet_train_cmd("chief", "--model", "2d", "--run-dir", tmp_path / "runs", "--run-name", "late",
                                "--epochs", "1", "--batch-size", "2", "--set", f"data.dataset={prepared_brats}",
                                "--set", "model.base_filters_2d=4", "--set", "train.steps_per_epoch=2",
                                "--set", "train.validation_steps=1", "--set", "train.validate_full_volumes=false",
                                "--quiet", *flags)}
    procs = {}
    try:
        for name, cmd in commands.items():
            procs[name] = subprocess.Popen([str(c) for c in cmd], cwd=tmp_path, stdout=open(logs[name], "w"),
                                           stderr=subprocess.STDOUT, start_new_session=True,
                                           env=child_env(LATE_HOST="localhost", LATE_UNTIL=str(late_until)))
        codes = {name: proc.wait(timeout=240) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                kill_group(proc)
    text = {name: path.read_text(errors="replace") for name, path in logs.items()}
    assert codes == {"ps0": 0, "worker0": 0, "chief": 0}, text["chief"][-3000:] + text["worker0"][-3000:]
    worker_log = text["worker0"]
    assert f"worker 0: waiting for localhost (ps 0) to resolve (10 s of 90 s" in worker_log, worker_log[-3000:]
    assert "worker 0: every peer resolves now (after 1" in worker_log  # ~13-14 s after its start
    assert worker_log.index("every peer resolves now") < worker_log.index("worker 0 serving on")
    assert "chief: waiting for worker 0 (127.0.0.1:" in text["chief"]  # the chief said whom it waited for
    assert (tmp_path / "runs" / "late" / "summary.json").exists()


# ---------------------------------------------------------------- the token as a Kubernetes Secret

@pytest.mark.skipif(os.geteuid() != 0, reason="makes root-owned files with chosen groups")
def test_a_secret_mounted_for_a_non_root_pod_is_accepted_and_others_are_not(tmp_path, monkeypatch):
    """What the kubelet makes of a Secret with defaultMode 0400 and the pod's fsGroup: root's file,
    mode 0440, group = the fsGroup. Read as uid 1000 in that group (the process's ids simulated,
    the file real): accepted. Readable by others, group-writable, or another group: refused."""
    from trainer.errors import UserError
    from trainer.runtime.ps.token import new_token, read_token

    token = tmp_path / "token"
    token.write_text(new_token() + "\n")
    os.chown(token, 0, 1000)
    monkeypatch.setattr(os, "getuid", lambda: 1000)
    monkeypatch.setattr(os, "getgid", lambda: 1000)
    monkeypatch.setattr(os, "getgroups", lambda: [1000])
    token.chmod(0o440)
    assert len(read_token(token)) == 64
    token.chmod(0o400)  # without fsGroup the kubelet leaves 0400: the kernel alone then refuses uid 1000
    assert len(read_token(token)) == 64
    for mode, group, why in ((0o444, 1000, "readable by others"), (0o460, 1000, "readable by others"),
                             (0o640, 1000, "readable by others"), (0o440, 2000, "readable by others")):
        token.chmod(mode)
        os.chown(token, 0, group)
        with pytest.raises(UserError, match=why):
            read_token(token)
    os.chown(token, 1000, 1000)  # the pod user's own file: the usual rule (0600, its owner)
    token.chmod(0o600)
    assert len(read_token(token)) == 64
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
