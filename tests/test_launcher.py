"""The cluster launcher against real sshd instances on loopback aliases (127.0.0.2, 127.0.0.3)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from support.procs import REPO_ROOT, child_env, kill_group, processes_mentioning, run_bounded, unet_train_cmd, wait_until_gone
from support.sshd_hosts import HOSTS, SSHD, free_port_on, start_sshd_hosts

pytestmark = pytest.mark.slow  # trains models or starts processes: not in scripts/test.sh --fast

needs_sshd = pytest.mark.skipif(not Path(SSHD).exists(), reason="openssh-server not installed (scripts/setup.sh)")


@pytest.fixture(scope="module")
def ssh_hosts(tmp_path_factory):
    """Two sshd processes, one per loopback alias, stopped by PID at the end of the module."""
    hosts = start_sshd_hosts(tmp_path_factory.mktemp("sshd"))
    try:
        yield {"port": hosts.port, "key": hosts.key, "known_hosts": hosts.known_hosts}
    finally:
        hosts.stop()


def cluster_flags(ssh, workdir: Path, tmp_path: Path) -> list[str]:
    ports = [free_port_on(["127.0.0.1", *HOSTS]) for _ in range(6)]
    return ["--port", ssh["port"], "--key", ssh["key"], "--workdir", workdir,
            "--set", f"cluster.known_hosts_file={ssh['known_hosts']}", "--set", f"cluster.python={sys.executable}",
            "--set", "cluster.connect_timeout_s=5",
            "--set", f"cluster.ps_hosts=[127.0.0.1:{ports[0]}]", "--set", f"cluster.worker_hosts=[127.0.0.1:{ports[1]},127.0.0.1:{ports[5]}]",
            "--set", f"cluster.chief_host=127.0.0.1:{ports[2]}", "--set", f"cluster.control_port={ports[3]}",
            "--set", f"logging.tensorboard_port={ports[4]}", "--set", f"train.run_dir={tmp_path / 'local-runs'}"]


def tiny_training(prepared_brats) -> list[str]:
    return ["--model", "2d", "--set", f"data.dataset={prepared_brats}", "--set", "model.base_filters_2d=4",
            "--set", "train.batch_size=2", "--set", "train.steps_per_epoch=2", "--set", "train.validation_steps=1",
            "--set", "train.image_every_epochs=0"]


def leftover_processes(workdir: Path) -> list[str]:
    return processes_mentioning(workdir)


def stop_run(run: str, flags: list, tmp_path: Path):
    return run_bounded(unet_train_cmd("distributed", "--stop", "--run-name", run, *flags), 120, cwd=tmp_path)


def wait_gone(workdir: Path, timeout: float = 30) -> list[str]:
    return wait_until_gone(workdir, timeout)


def test_dry_run_prints_inventory_and_commands(tmp_path):
    result = run_bounded(unet_train_cmd("distributed", "--hosts", "node1,node2,node3", "--mode", "ps",
                                        "--workdir", "/srv/unet", "--user", "alice", "--key", "/keys/id", "--dry-run",
                                        "--run-name", "dry", "--set", f"train.run_dir={tmp_path}"), 120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    out = result.stdout
    inventory_text = out.split("# commands, in order")[0].split("\n", 1)[1]
    inventory = yaml.safe_load(inventory_text.replace("!unsafe ", ""))
    groups = inventory["all"]["children"]
    assert set(groups["ps"]["hosts"]) == {"node1"} and set(groups["workers"]["hosts"]) == {"node1", "node2", "node3"}
    assert set(groups["chief"]["hosts"]) == {"node1"}
    assert "!unsafe" in inventory_text
    for secret in ("ansible_password", "ansible_ssh_pass", "ansible_become_pass", "PasswordAuthentication=yes"):
        assert secret not in out
    assert "BatchMode=yes" in out  # keys only: ssh never prompts
    for role in ("ps0", "worker0", "worker1", "worker2", "chief", "tensorboard"):
        assert f"] {role}: " in out, role
    sync = next(line for line in out.splitlines() if line.startswith("sync node2:"))
    assert "rsync -a" in sync and "--delete" in sync and "alice@node2:/srv/unet/" in sync
    assert "--exclude=/data/" in sync and "--exclude=data/" not in sync  # anchored: trainer/data/ is synced
    assert not (tmp_path / "dry").exists()  # a dry run writes nothing, not even runs/dry/launcher/inventory.yml


class _Unsafe(str):
    """A scalar the rendered inventory tagged !unsafe."""


class _InventoryLoader(yaml.SafeLoader):
    pass


_InventoryLoader.add_constructor("!unsafe", lambda loader, node: _Unsafe(loader.construct_scalar(node)))


def _strings(node, key=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v, key)
    elif isinstance(node, str):
        yield key, node


def test_inventory_marks_user_values_unsafe_and_ansible_never_templates_them(tmp_path):
    """A Jinja payload in run_dir must reach Ansible as !unsafe and never run; in --key it is refused
    outright (cluster.ssh_key allows only plain path characters)."""
    marker = tmp_path / "pwned"
    payload = "{{ lookup('pipe','touch %s') }}" % marker
    refused = run_bounded(unet_train_cmd("distributed", "--hosts", "node1,node2", "--mode", "horovod",
                                         "--key", f"/keys/{payload}", "--dry-run", "--run-name", "inj",
                                         "--set", f"train.run_dir={tmp_path}"), 120, cwd=tmp_path)
    assert refused.returncode != 0 and "cluster.ssh_key" in refused.stdout and "Traceback" not in refused.stdout
    result = run_bounded(unet_train_cmd("distributed", "--hosts", "node1,node2", "--mode", "horovod",
                                        "--key", "/keys/id", "--dry-run", "--run-name", "inj",
                                        "--set", f"train.run_dir={tmp_path}/{payload}"), 120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    text = result.stdout.split("# commands, in order")[0].split("\n", 1)[1]
    inventory = yaml.load(text, Loader=_InventoryLoader)
    strings = list(_strings(inventory))
    assert sum("lookup(" in value for _, value in strings) >= 2  # stage, tensorboard logdir
    for key, value in strings:
        if "{{" in value or key in ("unet_stage", "unet_source", "unet_workdir", "unet_run", "unet_python",
                                    "unet_state", "unet_rsync_target", "ansible_host", "ansible_user",
                                    "ansible_python_interpreter", "ansible_ssh_private_key_file"):
            assert isinstance(value, _Unsafe), (key, value)
    # Ansible itself, on the controller: the payloads stay text; an untagged control value does run.
    control = tmp_path / "control"
    path = tmp_path / "inventory.yml"
    path.write_text(text.replace("  vars:\n", "  vars:\n    ctl: \"{{ lookup('pipe','touch %s') }}\"\n" % control, 1))
    ansible = run_bounded([Path(sys.executable).parent / "ansible", "all", "-i", path, "-m", "ansible.builtin.debug",
                           "-a", "msg={{ unet_stage }}|{{ ansible_ssh_private_key_file }}|{{ unet_roles }}|{{ ctl }}"],
                          120, cwd=tmp_path, ANSIBLE_NOCOLOR="1")
    assert ansible.returncode == 0, ansible.stdout[-3000:]
    assert control.exists(), ansible.stdout[-3000:]  # the check itself works
    assert not marker.exists() and "touch" in ansible.stdout


def test_dry_run_takes_hosts_and_mode_from_settings(tmp_path):
    result = run_bounded(unet_train_cmd("distributed", "--dry-run", "--run-name", "fromset",
                                        "--set", "cluster.hosts=[node1,node2]", "--set", "cluster.mode=horovod",
                                        "--set", f"train.run_dir={tmp_path}"), 120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "mode horovod, hosts node1, node2" in result.stdout
    assert "launcher/ssh/remote/rank.sh" in result.stdout  # every rank records its PID on its host
    sync = next(line for line in result.stdout.splitlines() if line.startswith("sync node2:"))
    assert " -s " in sync and " -- " in sync and "ServerAliveInterval=5" in sync
    flags = run_bounded(unet_train_cmd("distributed", "--dry-run", "--hosts", "node3", "--mode", "ps",
                                       "--set", "cluster.hosts=[node1,node2]", "--set", "cluster.mode=horovod",
                                       "--set", f"train.run_dir={tmp_path}"), 120, cwd=tmp_path)
    assert flags.returncode == 0 and "mode ps, hosts node3" in flags.stdout, flags.stdout[-3000:]
    none = run_bounded(unet_train_cmd("distributed", "--dry-run", "--set", f"train.run_dir={tmp_path}"), 120,
                       cwd=tmp_path)
    assert none.returncode != 0 and "cluster.hosts" in none.stdout and "Traceback" not in none.stdout


def test_dry_run_preflight_lists_ps_only_hosts(tmp_path):
    """--ps-hosts outside --hosts are preflighted (and synced) too: every host the run touches."""
    import io

    from launcher.ssh import launch as distributed
    from trainer.config.settings import Settings, TrainSettings

    out = io.StringIO()
    settings = Settings(train=TrainSettings(run_dir=tmp_path, run_name="psonly"))
    request = distributed.LaunchRequest(hosts="node1,node2", mode="ps", ps_hosts="node3", dry_run=True)
    assert distributed.SshLauncher(settings, request, out=out).dry_run() == 0
    preflight = next(line for line in out.getvalue().splitlines() if line.startswith("preflight:"))
    assert preflight.endswith("on node1, node2, node3"), preflight
    assert "sync node3:" in out.getvalue()


def test_ps_cpu_plan_counts_ps_and_worker_not_chief():
    """Threads = physical cores / the host's computing processes (PS + worker); the chief only coordinates."""
    from launcher.ssh.plan import PS_MODE, HostFacts, build_plan
    from trainer.config.settings import Settings

    facts = {host: HostFacts(physical_cores=8) for host in ("node1", "node2", "node3")}
    plan = build_plan(Settings(), ("node1", "node2"), PS_MODE, ("node1", "node3"), facts, Path("/srv/unet"))
    assert {host: choice.threads for host, choice in plan.cpu.items()} == {"node1": 4, "node2": 8, "node3": 8}
    assert "8 physical cores / 2 process(es)" in plan.cpu["node1"].reason
    trainers = [role for role in plan.roles_on("node1") if role.name != "tensorboard"]
    assert [role.name for role in trainers] == ["ps0", "worker0", "chief"]
    for role in trainers:  # all three get node1's share
        assert "cpu.intra_op_threads=4" in role.argv, role.name
    single = build_plan(Settings(), ("node1",), PS_MODE, (), facts, Path("/srv/unet"))  # ps0 defaults to node1
    assert single.cpu["node1"].threads == 4


def test_horovod_rank_lines_get_the_prefix_of_their_host():
    """horovodrun fills -H in order: with 2 slots on each of 2 hosts, ranks 0-1 are on h1, 2-3 on h2."""
    from launcher.ssh.plan import horovod_rank_hosts, label_rank_line

    ranks = horovod_rank_hosts(("127.0.0.2", "127.0.0.3"), 2)
    assert ranks == ("127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3")
    assert horovod_rank_hosts(("127.0.0.2", "127.0.0.3"), 1) == ("127.0.0.2", "127.0.0.3")
    assert label_rank_line("[2]<stdout>:2/2 - loss: 1.5 [x]", ranks) == "[127.0.0.3 rank 2] 2/2 - loss: 1.5 [x]"
    assert label_rank_line("[1]<stderr>:INFO rank 1/4", ranks) == "[127.0.0.2 rank 1] INFO rank 1/4"
    assert label_rank_line("[1,3]<stdout>:mpi", ranks) == "[127.0.0.3 rank 3] mpi"  # OpenMPI --tag-output
    for line in ("Launching horovod task function", "[4]<stdout>:no such rank", " [0]<stdout>:indented", ""):
        assert label_rank_line(line, ranks) is None, line


@pytest.mark.parametrize("override", ["cluster.hosts=[node1,node1]", "cluster.hosts=['a;b']",
                                      "cluster.ssh_user=-oProxyCommand=x", "cluster.mode=mpi"])
def test_bad_cluster_settings_rejected(override):
    from trainer.config.settings import ClusterSettings

    key, value = override.split("=", 1)[0].split(".")[1], yaml.safe_load(override.split("=", 1)[1])
    with pytest.raises(ValueError):
        ClusterSettings(**{key: value})


def test_stop_roles_stops_this_runs_groups_only(tmp_path):
    """Roles (run-role.sh) and Horovod ranks (rank.sh) are stopped by process group; a PID file
    naming a process without the run's marker (a reused PID) is left alone."""
    remote, state = REPO_ROOT / "launcher" / "ssh" / "remote", tmp_path / "state"
    started = subprocess.run(["sh", remote / "run-role.sh", state / "role.log", state / "role.rc",
                              state / "role.pid", "sleep", "300"], capture_output=True, text=True, timeout=30)
    assert started.returncode == 0, started.stderr
    role_pid = int((state / "role.pid").read_text())
    rank = subprocess.Popen(["sh", remote / "rank.sh", state, "sleep", "300"], env={**os.environ, "HOROVOD_RANK": "3"})
    stranger = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        rank_file = state / f"rank-{os.uname().nodename}-3.pid"
        deadline = time.monotonic() + 20
        while not rank_file.exists():
            assert time.monotonic() < deadline and rank.poll() is None, "rank.sh wrote no PID file"
            time.sleep(0.05)
        assert int(rank_file.read_text()) == rank.pid  # exec'd in place: horovodrun waits on the rank itself
        (state / "stranger.pid").write_text(str(stranger.pid))
        stop = subprocess.run(["sh", remote / "stop-roles.sh", state, "role", "stranger"], capture_output=True,
                              text=True, timeout=60)
        assert stop.returncode == 0, stop.stderr
        assert f"stopped role (process group {role_pid})" in stop.stdout and "stopped rank 3" in stop.stdout
        assert "stranger" not in stop.stdout
        assert rank.wait(timeout=20) != 0
        assert stranger.poll() is None
        deadline = time.monotonic() + 20
        while any(p.status() != psutil.STATUS_ZOMBIE for p in _group(role_pid)):
            assert time.monotonic() < deadline, "the role's process group survived"
            time.sleep(0.1)
    finally:
        for proc in (rank, stranger):
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        for p in _group(role_pid) if (state / "role.pid").exists() else ():
            p.kill()


def _group(pgid: int) -> list:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def test_stop_cannot_be_cancelled_and_sigterm_stops_the_launch(tmp_path, monkeypatch):
    """A second Ctrl-C must not abandon the cleanup; SIGTERM is handled like Ctrl-C."""
    import io

    from launcher.ssh import launch as distributed
    from launcher.ssh.ansible import PlaybookResult
    from trainer.config.settings import Settings, TrainSettings

    settings = Settings(train=TrainSettings(run_dir=tmp_path, run_name="sig"))
    launcher = distributed.SshLauncher(settings, distributed.LaunchRequest(hosts="node1"), out=io.StringIO())
    launcher.inventory_path = tmp_path / "sig.yml"
    seen = []

    def fake_run(self, playbook, extravars=None, limit=None, on_event=None):
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C again while stopping
        seen.append((playbook, self.cancelled()))
        return PlaybookResult(status="successful", rc=0)

    def fake_doctor(standalone=False):
        launcher.inventory_path.write_text("all: {}\n")
        os.kill(os.getpid(), signal.SIGTERM)
        if launcher._cancel.is_set():
            raise KeyboardInterrupt
        raise AssertionError("SIGTERM was not handled")

    monkeypatch.setattr(distributed.Ansible, "run", fake_run)
    monkeypatch.setattr(launcher, "preflight", fake_doctor)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # a regression must not kill pytest
    try:
        assert launcher.launch() == 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [("stop.yml", False)]
    assert "interrupted: stopping every process" in launcher.out.getvalue()


def test_follow_is_reissued_when_its_window_ends(tmp_path, monkeypatch):
    """A run longer than one follow window (7 days before; 1 s here) is followed again, not declared
    lost. Real Ansible and follow.py, on this machine (local connection), with a role that runs ~6 s."""
    import io

    from launcher.ssh import launch as distributed
    from launcher.ssh.plan import Role
    from trainer.config.settings import Settings, TrainSettings

    state = tmp_path / "state"
    started = subprocess.run(["sh", REPO_ROOT / "launcher" / "ssh" / "remote" / "run-role.sh", state / "chief.log",
                              state / "chief.rc", state / "chief.pid", "sh", "-c", "echo begin; sleep 6; echo end"],
                             capture_output=True, text=True, timeout=30)
    assert started.returncode == 0, started.stderr
    inventory = {"all": {"vars": {"unet_python": sys.executable, "unet_workdir": str(REPO_ROOT),
                                  "unet_state": str(state), "unet_follow_delay": 0.3, "unet_follow_retries": 3},
                         "children": {"chief": {"hosts": {"localhost": {
                             "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                             "unet_roles": [{"name": "chief", "phase": "main", "follow": True, "argv": []}]}}}}}}
    settings = Settings(train=TrainSettings(run_dir=tmp_path / "runs", run_name="long"))
    out = io.StringIO()
    launcher = distributed.SshLauncher(settings, distributed.LaunchRequest(hosts="localhost"), out=out)
    launcher.inventory_path = tmp_path / "long.yml"
    launcher.inventory_path.write_text(yaml.safe_dump(inventory))
    launcher._followed = [Role("chief", "localhost", "chief", (), "main")]
    launcher.follow_delay_s, launcher.follow_window_s = 0.3, 1.0
    runs = []
    real_run = distributed.Ansible.run

    def counting_run(self, playbook, *args, **kwargs):
        runs.append((playbook, kwargs.get("limit")))
        return real_run(self, playbook, *args, **kwargs)

    monkeypatch.setattr(distributed.Ansible, "run", counting_run)
    try:
        assert launcher.follow() == {"chief": 0}, out.getvalue()[-3000:]
    finally:
        subprocess.run(["sh", REPO_ROOT / "launcher" / "ssh" / "remote" / "stop-roles.sh", state, "chief"], timeout=60)
    assert len(runs) >= 2 and runs[0] == ("follow.yml", None) and runs[1] == ("follow.yml", "localhost"), runs
    assert "[localhost chief] begin" in out.getvalue() and "[localhost chief] end" in out.getvalue()


def test_follow_window_over_only_when_polls_ran_out():
    from launcher.ssh.launch import _follow_window_over

    running = '{"role": "chief", "exited": false, "rc": null}'
    assert _follow_window_over({"rc": 0, "attempts": 4, "stdout": running})
    assert not _follow_window_over({"rc": 0, "attempts": 4, "stdout": running + "\n__FINISHED__"})
    assert not _follow_window_over({"rc": 1, "attempts": 4, "stdout": ""})       # follow.py failed
    assert not _follow_window_over({"msg": "The command action failed to execute in the expected time frame"})
    assert not _follow_window_over({"rc": 0, "stdout": running})                  # no retries: not a window


def test_facts_na_and_forks(tmp_path):
    """Facts of "NA" mean unknown, not a traceback; forks cover every host (live follow beyond 5)."""
    from launcher.ssh.ansible import _host_count
    from launcher.ssh.launch import _count

    assert [_count(v) for v in ("NA", "", None, "4", 2)] == [0, 0, 0, 4, 2]
    hosts = {f"node{i}": {"ansible_host": f"node{i}"} for i in range(7)}
    text = yaml.safe_dump({"all": {"vars": {}, "children": {"chief": {"hosts": {"node0": {}}},
                                                            "workers": {"hosts": hosts}}}})
    (tmp_path / "inv.yml").write_text(text.replace("ansible_host: ", "ansible_host: !unsafe "))
    assert _host_count(tmp_path / "inv.yml") == 7
    assert _host_count(tmp_path / "missing.yml") == 0


@pytest.mark.parametrize("hosts", ["node1,node 2", "node1;reboot", "$(touch /tmp/x)", "node1,`id`", "a,a"])
def test_bad_hosts_rejected_before_anything_runs(hosts, tmp_path):
    result = run_bounded(unet_train_cmd("distributed", "--hosts", hosts, "--mode", "horovod",
                                        "--set", f"train.run_dir={tmp_path}"), 60, cwd=tmp_path)
    assert result.returncode != 0 and "--hosts" in result.stdout and "Traceback" not in result.stdout
    assert not (tmp_path / "default").exists()


def test_unreachable_host_is_named_within_a_bound(tmp_path):
    start = time.monotonic()
    result = run_bounded(unet_train_cmd("doctor", "--hosts", "127.0.0.9", "--port", "9", "--set",
                                        "cluster.connect_timeout_s=3", "--set", f"train.run_dir={tmp_path}",
                                        "--set", "train.run_name=unreach"), 120, cwd=tmp_path)
    assert result.returncode != 0
    assert "127.0.0.9: unreachable" in result.stdout, result.stdout[-2000:]
    assert time.monotonic() - start < 90


@needs_sshd
def test_doctor_reports_every_host(ssh_hosts, tmp_path):
    result = run_bounded(unet_train_cmd("doctor", "--hosts", ",".join(HOSTS),
                                        *cluster_flags(ssh_hosts, tmp_path / "remote", tmp_path),
                                        "--set", "train.run_name=doc"), 180, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    for host in HOSTS:
        assert f"{host}: python 3.11" in result.stdout and "tensorflow 2.15.1" in result.stdout
    assert "every host passed" in result.stdout
    assert "gRPC servers listen on ALL interfaces" in result.stdout  # ps mode: said plainly


def test_known_hosts_file_means_strict_host_key_checking(tmp_path):
    from launcher.ssh.inventory import ssh_options
    from trainer.config.settings import ClusterSettings

    assert "StrictHostKeyChecking=accept-new" in ssh_options(ClusterSettings())
    strict = ssh_options(ClusterSettings(known_hosts_file="/etc/unet/known_hosts"))
    assert "StrictHostKeyChecking=yes" in strict and "UserKnownHostsFile=/etc/unet/known_hosts" in strict
    assert not any("accept-new" in option for option in strict)


@needs_sshd
def test_host_with_an_unlisted_key_is_refused(tmp_path):
    """With cluster.known_hosts_file, a host whose key is not the one pinned there is not trusted.
    Its own sshd on a fresh alias: Ansible's ControlPersist would reuse an earlier test's connection."""
    host = "127.0.0.4"
    sshd = start_sshd_hosts(tmp_path / "sshd", (host,))
    try:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
        kind, key = (tmp_path / "other.pub").read_text().split()[:2]
        (tmp_path / "known_hosts").write_text(f"[{host}]:{sshd.port} {kind} {key}\n")
        result = run_bounded(unet_train_cmd(
            "doctor", "--hosts", host, "--port", sshd.port, "--key", sshd.key, "--set", "train.run_name=hk",
            "--set", f"cluster.known_hosts_file={tmp_path / 'known_hosts'}",
            "--set", f"cluster.python={sys.executable}",
            "--set", "cluster.connect_timeout_s=5", "--set", f"train.run_dir={tmp_path / 'runs'}"), 180, cwd=tmp_path)
        assert result.returncode != 0
        assert f"{host}: unreachable" in result.stdout and "Host key verification failed" in result.stdout, \
            result.stdout[-3000:]
        assert (tmp_path / "known_hosts").read_text().count("\n") == 1  # nothing was added to the pinned file
        # the same host with its real key pinned (the helper's known_hosts) passes
        ok = run_bounded(unet_train_cmd(
            "doctor", "--hosts", host, "--port", sshd.port, "--key", sshd.key, "--set", "train.run_name=hk2",
            "--set", f"cluster.known_hosts_file={sshd.known_hosts}", "--set", f"cluster.python={sys.executable}",
            "--set", "cluster.connect_timeout_s=5", "--set", f"train.run_dir={tmp_path / 'runs'}"), 180, cwd=tmp_path)
        assert ok.returncode == 0, ok.stdout[-3000:]
    finally:
        sshd.stop()


@needs_sshd
def test_sync_refuses_a_workdir_that_holds_something_else(ssh_hosts, tmp_path):
    workdir = tmp_path / "home"
    workdir.mkdir()
    (workdir / "thesis.tex").write_text("years of work\n")
    result = run_bounded(unet_train_cmd("distributed", "--hosts", HOSTS[0], "--mode", "ps", "--run-name", "foreign",
                                        *cluster_flags(ssh_hosts, workdir, tmp_path)), 180, cwd=tmp_path)
    assert result.returncode != 0
    assert f"workdir {workdir} is not empty and is not a unet-train" in result.stdout + result.stderr
    assert sorted(p.name for p in workdir.iterdir()) == ["thesis.tex"]  # nothing deleted, nothing added


def test_sync_keeps_run_and_data_paths_from_settings(tmp_path):
    """A real rsync with the launcher's own argv and --delete: checkpoints under a custom run_dir
    (relative, or absolute inside the workdir and nested in a folder the checkout lacks), a cache,
    a split file and the token on the host survive; stale code is removed."""
    from launcher.ssh.inventory import render
    from launcher.ssh.plan import build_plan
    from trainer.config.loader import load_settings

    source = tmp_path / "checkout"
    (source / "trainer").mkdir(parents=True)
    (source / "trainer" / "cli.py").write_text("# code\n")
    for number, (run_dir, checkpoint) in enumerate([("experiments", "experiments/exp1/checkpoints/last/epoch-3.index"),
                                                    ("{remote}/results/deep", "results/deep/exp2/history.json")]):
        remote = tmp_path / f"remote{number}"
        kept = {checkpoint: "ckpt", "ds3d/volumes/BRATS_001.image.npy": "npy", "ds3d/prepared.json": "{}",
                "data/prepared/last.json": "{}", "data/prepared/brats/slices-128.h5": "h5",
                ".unet-train-cluster.token": "secret"}
        for name, text in {**kept, "trainer/stale.py": "old", "leftover.txt": "old"}.items():
            (remote / name).parent.mkdir(parents=True, exist_ok=True)
            (remote / name).write_text(text)
        settings = load_settings(None, [f"train.run_dir={run_dir.format(remote=remote)}", "data.dataset=ds3d",
                                        f"cluster.workdir={remote}"])
        plan = build_plan(settings, ("node1",), "ps", source_root=source)
        rsync = render(plan, settings.cluster, source, tmp_path / "stage")["all"]["vars"]["unet_rsync_argv"]
        result = subprocess.run([*rsync, "--delete", "--", f"{source}/", f"{remote}/"], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        for name, text in kept.items():
            assert (remote / name).read_text() == text, (run_dir, name)
        assert (remote / "trainer" / "cli.py").exists()
        assert not (remote / "trainer" / "stale.py").exists() and not (remote / "leftover.txt").exists()


def test_run_dir_that_is_the_workdir_is_refused(tmp_path):
    result = run_bounded(unet_train_cmd("distributed", "--hosts", "node1", "--dry-run", "--workdir", "/srv/unet",
                                        "--set", "train.run_dir=/srv/unet"), 120, cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stdout
    assert "train.run_dir: /srv/unet is the workdir itself" in result.stdout, result.stdout[-2000:]


def test_rsync_keeps_the_hosts_environment_and_marker(tmp_path):
    from launcher.ssh.inventory import interpreter_excludes

    assert interpreter_excludes("venv/bin/python") == ["/venv/"]
    assert interpreter_excludes("/opt/py/bin/python") == [] and interpreter_excludes("python3") == []
    result = run_bounded(unet_train_cmd("distributed", "--hosts", "node1", "--dry-run", "--run-name", "keep",
                                        "--set", "cluster.python=envs/unet/bin/python",
                                        "--set", f"train.run_dir={tmp_path}"), 120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    for kept in ("--exclude=/envs/", "--exclude=/.venv ", "--exclude=/.unet-train-workdir", "--exclude=/data/"):
        assert kept in result.stdout


@needs_sshd
def test_two_host_horovod_run_streams_logs_and_checkpoints(ssh_hosts, prepared_brats, tmp_path):
    workdir = tmp_path / "remote"
    flags = cluster_flags(ssh_hosts, workdir, tmp_path)
    stop = None
    try:
        result = run_bounded(unet_train_cmd("distributed", "--hosts", ",".join(HOSTS), "--mode", "horovod",
                                            "--run-name", "hvd", "--epochs", "1", *flags,
                                            *tiny_training(prepared_brats)), 420, cwd=tmp_path)
        assert result.returncode == 0, result.stdout[-5000:]
        # each rank's line names the host that rank ran on, not horovodrun's (127.0.0.2); rank 1
        # (on 127.0.0.3) logs warnings only, so it may print nothing
        assert "[127.0.0.2 rank 0] " in result.stdout and "2 worker(s) x batch 2 = global batch 4" in result.stdout
        assert "[127.0.0.2 rank 1]" not in result.stdout and "[127.0.0.3 rank 0]" not in result.stdout
        assert "]<stdout>:" not in result.stdout and "]<stderr>:" not in result.stdout
        merged = (tmp_path / "local-runs" / "hvd" / "training.log").read_text()
        assert "[127.0.0.2 rank 0] " in merged
        assert (workdir / "trainer" / "cli.py").exists() and not (workdir / ".venv").exists()  # synced code only
        assert (workdir / "trainer" / "data" / "pipeline.py").exists()  # anchored excludes: data/ != trainer/data/
        assert (tmp_path / "local-runs" / "hvd" / "checkpoints" / "last" / "epoch-1.index").exists()
        launch = json.loads((tmp_path / "local-runs" / "hvd" / "launcher" / "launch.json").read_text())
        assert launch["first_training_s"] is not None
        assert "TensorBoard on 127.0.0.2" in result.stdout and "ssh -N -L" in result.stdout
    finally:
        # always: TensorBoard outlives a successful launch, and a failed assertion must not leak it
        stop = stop_run("hvd", flags, tmp_path)
    assert stop.returncode == 0, stop.stdout[-3000:]
    assert "stopped tensorboard" in stop.stdout
    assert wait_gone(workdir) == []


@needs_sshd
def test_ps_run_one_ps_two_workers(ssh_hosts, prepared_brats, tmp_path):
    workdir = tmp_path / "remote"
    flags = cluster_flags(ssh_hosts, workdir, tmp_path) + ["--set", "cluster.tensorboard=false"]
    try:
        result = run_bounded(unet_train_cmd("distributed", "--hosts", ",".join(HOSTS), "--mode", "ps",
                                            "--ps-hosts", HOSTS[0], "--run-name", "psrun", "--epochs", "1", *flags,
                                            *tiny_training(prepared_brats)), 420, cwd=tmp_path)
        assert result.returncode == 0, result.stdout[-5000:]
        for tag in ("[127.0.0.2 ps0]", "[127.0.0.2 worker0]", "[127.0.0.3 worker1]", "[127.0.0.2 chief]"):
            assert tag in result.stdout, tag
        assert "synchronous SGD" in result.stdout
        assert (tmp_path / "local-runs" / "psrun" / "checkpoints" / "last" / "epoch-1.index").exists()
        assert "supervise.sh" in result.stdout  # workers run supervised (cluster.max_restarts 3)
        launch = json.loads((tmp_path / "local-runs" / "psrun" / "launcher" / "launch.json").read_text())
        assert launch["restarts"] == {} and "was restarted" not in result.stdout  # nobody died
        assert wait_gone(workdir) == []  # chief told PS and workers to stop; nothing lingers
    finally:
        if leftover_processes(workdir):  # the test failed: still stop the remote roles by PID
            stop_run("psrun", flags, tmp_path)


def _is_worker(proc: psutil.Process, workdir: Path, index: int) -> bool:
    """The worker's own Python process (not the supervise.sh around it)."""
    cmdline = proc.info["cmdline"] or []
    joined = " ".join(cmdline)
    if "trainer.cli" not in cmdline or "supervise.sh" in joined or str(workdir) not in joined:
        return False
    at = cmdline.index("trainer.cli")
    return cmdline[at + 1:at + 4] == ["worker", "--index", str(index)]


def out_line(tmp_path: Path, text: str) -> str:
    """The launcher output's line holding ``text`` ('' if none yet)."""
    return next((line for line in (tmp_path / "launcher.out").read_text().splitlines() if text in line), "")


@needs_sshd
def test_ctrl_c_stops_every_remote_process(ssh_hosts, prepared_brats, tmp_path):
    workdir = tmp_path / "remote"
    flags = cluster_flags(ssh_hosts, workdir, tmp_path)
    log = open(tmp_path / "launcher.out", "w")
    proc = subprocess.Popen([str(a) for a in unet_train_cmd(
        "distributed", "--hosts", ",".join(HOSTS), "--mode", "ps", "--run-name", "cc", "--epochs", "1000", *flags,
        *tiny_training(prepared_brats))], cwd=tmp_path, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "global batch" not in (tmp_path / "launcher.out").read_text():
            assert proc.poll() is None, (tmp_path / "launcher.out").read_text()[-3000:]
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.5)
        assert leftover_processes(workdir)  # the roles are running
        # A worker process dies: its supervisor starts it again and the chief takes it back, all of it
        # streamed; then Ctrl-C must stop the supervisors with everything else.
        worker = next(p for p in psutil.process_iter(["cmdline"]) if _is_worker(p, workdir, 1))
        worker.kill()
        while not ("[127.0.0.2 chief] " in out_line(tmp_path, "worker 1 back (registered again after loss)")
                   and "[127.0.0.3 worker1] " in out_line(tmp_path, "supervise: worker 1 restarted (1/3) after it died")):
            assert proc.poll() is None, (tmp_path / "launcher.out").read_text()[-3000:]
            assert time.monotonic() < deadline + 120, "worker 1 never came back"
            time.sleep(0.5)
        assert "[127.0.0.2 chief] " in out_line(tmp_path, "lost worker 1 ")
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            kill_group(proc)
        if leftover_processes(workdir):  # the test failed early: still stop the remote roles by PID
            stop_run("cc", flags, tmp_path)
    out = (tmp_path / "launcher.out").read_text()
    assert "interrupted: stopping every process" in out
    assert wait_gone(workdir) == [], out[-3000:]


# ------------------------------------------------------------------------------ elastic Horovod launch
def test_elastic_dry_run_shows_horovodrun_elastic_and_the_discovery_script(tmp_path):
    result = run_bounded(unet_train_cmd("distributed", "--hosts", "node1,node2,node3", "--mode", "horovod",
                                        "--elastic", "--min-hosts", "2", "--max-hosts", "3", "--slots-per-host", "2",
                                        "--workdir", "/srv/unet", "--user", "alice", "--key", "/keys/id", "--port",
                                        "2200", "--dry-run", "--run-name", "el", "--set", f"train.run_dir={tmp_path}",
                                        "--set", "cluster.known_hosts_file=/etc/unet/known_hosts",
                                        "--set", "cluster.elastic_cooldown_s=[20,600]"), 120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    out = result.stdout
    horovodrun = next(line for line in out.splitlines() if "] horovod: " in line)
    assert ("horovodrun -np 4 --min-np 4 --max-np 6 --slots-per-host 2 --host-discovery-script "
            "/srv/unet/.launch/el/discover-hosts.sh --blacklist-cooldown-range 20 600 -p 2200 --gloo -i /keys/id sh "
            "/srv/unet/launcher/ssh/remote/rank.sh /srv/unet/.launch/el ") in horovodrun, horovodrun
    assert " -H " not in horovodrun and horovodrun.endswith("--set train.elastic=true")
    script = out.split("# host discovery script (/srv/unet/.launch/el/discover-hosts.sh, run by horovodrun on "
                       "node1; min 2, max 3 host(s))\n", 1)[1]
    assert script.startswith("#!/bin/sh\n")
    check = next(line for line in script.splitlines() if line.strip().startswith("if ssh "))
    for option in ("-p 2200", "-l alice", "-i /keys/id", "BatchMode=yes", "StrictHostKeyChecking=yes",
                   "UserKnownHostsFile=/etc/unet/known_hosts", "ConnectTimeout=10", '-- "$1" true'):
        assert option in check, option
    assert [line for line in script.splitlines() if line.startswith("up ")] == \
        ["up node1 2 &", "up node2 2 &", "up node3 2 &"]
    assert not (tmp_path / "el").exists()  # a dry run writes nothing


@pytest.mark.parametrize("flags, message", [
    (["--mode", "horovod", "--min-hosts", "1"], "--min-hosts/--max-hosts: only with --elastic"),
    (["--mode", "ps", "--elastic"], "--elastic: Horovod mode only"),
    (["--mode", "horovod", "--elastic", "--controller", "mpi"], "--elastic: Horovod Elastic runs on Gloo only"),
    (["--mode", "horovod", "--elastic", "--max-hosts", "3"], "expected 1 <= min-hosts <= max-hosts <= 2"),
    (["--mode", "horovod", "--elastic", "--min-hosts", "2", "--max-hosts", "1"], "got 2 and 1"),
    (["--mode", "horovod", "--elastic", "--set", "cluster.elastic_cooldown_s=[0,10]"], "cluster.elastic_cooldown_s"),
])
def test_bad_elastic_flags_are_refused_in_one_line(tmp_path, flags, message):
    result = run_bounded(unet_train_cmd("distributed", "--hosts", "node1,node2", *flags, "--dry-run",
                                        "--set", f"train.run_dir={tmp_path}"), 120, cwd=tmp_path)
    assert result.returncode != 0 and message in result.stdout, result.stdout[-2000:]
    assert "Traceback" not in result.stdout


def test_elastic_on_one_host_needs_a_named_interface(tmp_path):
    """horovodrun resolves the common NICs of two hosts before an elastic job starts: on one host it
    waited 600 s and failed (seen with `echo localhost:2` discovery). A named interface skips that."""
    common = ("distributed", "--hosts", "node1", "--mode", "horovod", "--elastic", "--dry-run", "--run-name", "one",
              "--set", f"train.run_dir={tmp_path}")
    refused = run_bounded(unet_train_cmd(*common), 120, cwd=tmp_path)
    assert refused.returncode != 0 and "set cluster.network_interface" in refused.stdout, refused.stdout[-2000:]
    assert "Traceback" not in refused.stdout
    named = run_bounded(unet_train_cmd(*common, "--set", "cluster.network_interface=eth0"), 120, cwd=tmp_path)
    assert named.returncode == 0, named.stdout[-3000:]
    horovodrun = next(line for line in named.stdout.splitlines() if "] horovod: " in line)
    assert " --network-interface eth0 -p 22 --gloo " in horovodrun, horovodrun
    bad = run_bounded(unet_train_cmd(*common, "--set", "cluster.network_interface=eth0;reboot"), 120, cwd=tmp_path)
    assert bad.returncode != 0 and "cluster.network_interface" in bad.stdout and "Traceback" not in bad.stdout


def _discover(script: Path) -> list[str]:
    result = subprocess.run([str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr  # never an error: horovodrun would end the job
    return sorted(result.stdout.split())


@needs_sshd
def test_discovery_script_lists_the_hosts_that_answer_ssh(tmp_path):
    """The rendered script, run as horovodrun runs it, against real sshd hosts: both listed; one
    sshd stopped: only the other; that sshd back: both again (a host that returns can rejoin)."""
    from launcher.ssh.discovery import render_discovery_script, write_discovery_script
    from trainer.config.settings import ClusterSettings

    hosts = ("127.0.0.5", "127.0.0.6")  # their own sshd: the stop must not hit other tests' hosts
    sshd = start_sshd_hosts(tmp_path / "sshd", hosts)
    try:
        cluster = ClusterSettings(ssh_port=sshd.port, ssh_key=sshd.key, known_hosts_file=str(sshd.known_hosts),
                                  connect_timeout_s=5)
        script = write_discovery_script(tmp_path / "stage" / "discover-hosts.sh",
                                        render_discovery_script("disc", hosts, 2, cluster))
        assert os.access(script, os.X_OK)
        assert _discover(script) == ["127.0.0.5:2", "127.0.0.6:2"]
        sshd.stop_host("127.0.0.6")
        start = time.monotonic()
        assert _discover(script) == ["127.0.0.5:2"]
        assert time.monotonic() - start < 10  # refused at once; a silent host costs ConnectTimeout at most
        sshd.start_host("127.0.0.6")
        assert _discover(script) == ["127.0.0.5:2", "127.0.0.6:2"]
        sshd.stop_host("127.0.0.5")
        sshd.stop_host("127.0.0.6")
        assert _discover(script) == []  # nobody answers: an empty list, exit 0
    finally:
        sshd.stop()
    # The host keys are checked: a known_hosts file without the hosts' key lists nobody.
    (tmp_path / "empty_known_hosts").write_text("")
    sshd = start_sshd_hosts(tmp_path / "sshd2", hosts[:1])
    try:
        strict = ClusterSettings(ssh_port=sshd.port, ssh_key=sshd.key, connect_timeout_s=5,
                                 known_hosts_file=str(tmp_path / "empty_known_hosts"))
        script = write_discovery_script(tmp_path / "stage2" / "discover-hosts.sh",
                                        render_discovery_script("disc", hosts[:1], 1, strict))
        assert _discover(script) == []
        assert (tmp_path / "empty_known_hosts").read_text() == ""
    finally:
        sshd.stop()


def test_elastic_rank_lines_name_the_rank_only():
    """Elastic ranks move between hosts as hosts come and go: no host is guessed for them."""
    from launcher.ssh.plan import label_rank_line

    assert label_rank_line("[3]<stdout>:epoch 1", None) == "[rank 3] epoch 1"
    assert label_rank_line("Launching horovod task function", None) is None


@needs_sshd
def test_two_host_elastic_horovod_launch_runs_with_host_discovery(ssh_hosts, prepared_brats, tmp_path):
    """The launch plumbing with a real elastic horovodrun: the discovery script is synced executable to
    the first host, horovodrun runs it over the hosts' sshd and starts one rank on each host, and the
    training command carries train.elastic=true. (No host is lost here: what training does then is
    the elastic runtime's, train.elastic.)"""
    workdir = tmp_path / "remote"
    flags = cluster_flags(ssh_hosts, workdir, tmp_path) + ["--set", "cluster.tensorboard=false"]
    try:
        result = run_bounded(unet_train_cmd("distributed", "--hosts", ",".join(HOSTS), "--mode", "horovod",
                                            "--elastic", "--min-hosts", "1", "--run-name", "elastic", "--epochs", "1",
                                            *flags, *tiny_training(prepared_brats)), 420, cwd=tmp_path)
        assert result.returncode == 0, result.stdout[-5000:]
        script = workdir / ".launch" / "elastic" / "discover-hosts.sh"
        assert os.access(script, os.X_OK) and "up 127.0.0.2 1 &" in script.read_text()
        assert "--host-discovery-script" in result.stdout and "--set train.elastic=true" in result.stdout
        assert "[rank 0] " in result.stdout and "rank 0/2," in result.stdout  # both discovered hosts joined
        assert "2 worker(s) x batch 2 = global batch 4" in result.stdout
        assert (tmp_path / "local-runs" / "elastic" / "checkpoints" / "last" / "epoch-1.index").exists()
        assert wait_gone(workdir) == []
    finally:
        if leftover_processes(workdir):
            stop_run("elastic", flags, tmp_path)


@needs_sshd
def test_elastic_launch_survives_losing_every_process_on_one_host(prepared_brats, tmp_path):
    """Everything on the second host dies mid-run (its rank and its sshd): Horovod re-forms the
    world on the first host, training rolls back to its last commit and finishes there, and the
    merged training.log names the lost host."""
    hosts = ("127.0.0.9", "127.0.0.10")
    sshd = start_sshd_hosts(tmp_path / "sshd", hosts)
    workdir = tmp_path / "remote"
    ssh = {"port": sshd.port, "key": sshd.key, "known_hosts": sshd.known_hosts}
    flags = cluster_flags(ssh, workdir, tmp_path) + ["--set", "cluster.tensorboard=false"]
    training = tiny_training(prepared_brats) + ["--set", "train.steps_per_epoch=8", "--set",
                                                "train.elastic_commit_steps=1", "--set",
                                                "train.checkpoint_every_steps=1"]
    out = tmp_path / "launcher.out"
    proc = subprocess.Popen([str(a) for a in unet_train_cmd(
        "distributed", "--hosts", ",".join(hosts), "--mode", "horovod", "--elastic", "--min-hosts", "1",
        "--run-name", "lose", "--epochs", "2", *flags, *training)], cwd=tmp_path, env=child_env(),
        stdout=open(out, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        run = tmp_path / "local-runs" / "lose"
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "steps" / "checkpoint").exists() or "rank 0/2," not in out.read_text():
            assert proc.poll() is None, out.read_text()[-4000:]
            assert time.monotonic() < deadline, "training never started on both hosts"
            time.sleep(0.2)
        victims = [p for p in psutil.process_iter(["cmdline"]) if "trainer.cli" in " ".join(p.info["cmdline"] or [])
                   and _environ(p).get("HOROVOD_HOSTNAME") == hosts[1]]
        assert victims, "no rank runs on the second host"
        sshd.stop_host(hosts[1])
        for victim in victims:
            victim.kill()
        assert proc.wait(timeout=300) == 0, out.read_text()[-5000:]
        merged = (run / "training.log").read_text()
        assert "world size 2 -> 1 at step" in merged and f"lost {hosts[1]}[0]" in merged, merged[-4000:]
        assert (run / "checkpoints" / "last" / "epoch-2.index").exists()
    finally:
        if proc.poll() is None:
            kill_group(proc)
        if leftover_processes(workdir):
            stop_run("lose", flags, tmp_path)
        sshd.stop()
    assert wait_gone(workdir) == []


def _environ(proc: psutil.Process) -> dict:
    try:
        return proc.environ()
    except psutil.Error:
        return {}
