"""A throwaway single-node Slurm on 127.0.0.1 for the tests and benchmarks/slurm_overhead.py:
its own munged (key and socket in a temp folder), slurmctld and slurmd with a temp config,
state and spool, proctrack/linuxproc and no cgroups. Every daemon runs in the foreground
as our child and is stopped by PID. Clients find it through SLURM_CONF."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from support.sshd_hosts import free_port_on

SLURMCTLD = shutil.which("slurmctld") or "/usr/sbin/slurmctld"
SLURMD = shutil.which("slurmd") or "/usr/sbin/slurmd"
MUNGED = shutil.which("munged") or "/usr/sbin/munged"
NODE = "localhost"   # resolves everywhere, so the PS-mode gRPC addresses (node:port) work
NODE_CPUS = 4        # declared (config_overrides): 1 PS + 2 workers + chief at 1 CPU each on a 2-core machine
PARTITION = "debug"


def available() -> bool:
    return all(Path(p).exists() for p in (SLURMCTLD, SLURMD, MUNGED)) and os.geteuid() == 0


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    procs: dict = field(default_factory=dict)   # name -> Popen

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def client(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), env={**os.environ, **self.env}, capture_output=True, text=True,
                              timeout=timeout)

    def stop(self) -> None:
        """Cancel whatever is still queued (slurmd then kills its processes), then stop the daemons."""
        if "slurmd" in self.procs and self.procs["slurmd"].poll() is None:
            try:
                self.client("scancel", "--user", "root", "--full")
                deadline = time.monotonic() + 30
                while self.client("squeue", "-h").stdout.strip() and time.monotonic() < deadline:
                    time.sleep(0.5)
            except (OSError, subprocess.SubprocessError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


def _config(root: Path, ctld_port: int, slurmd_port: int) -> str:
    return "\n".join([
        "ClusterName=unettest",
        f"SlurmctldHost={NODE}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root / 'run' / 'munge.socket'}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'run' / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",   # no cgroups here
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/builtin",
        "MpiDefault=none",
        "SlurmdParameters=config_overrides",   # NODE_CPUS may exceed the real cores
        "ReturnToService=2",
        "KillWait=5",                          # scancel: SIGKILL 5 s after SIGTERM (default 30)
        "MinJobAge=300",
        "InactiveLimit=0",
        f"NodeName={NODE} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=30 State=UP",
        ""])


def start_slurm_cluster(timeout: float = 60) -> SlurmCluster:
    # Not under pytest's tmp_path: munged wants every folder above its socket searchable by all.
    root = Path(tempfile.mkdtemp(prefix="unet-slurm-"))
    root.chmod(0o755)
    for name, mode in (("munge", 0o700), ("run", 0o755), ("state", 0o700), ("spool", 0o755), ("log", 0o755)):
        (root / name).mkdir(mode=mode)
    cluster = SlurmCluster(root, root / "slurm.conf")
    try:
        subprocess.run(["mungekey", "--create", f"--keyfile={root / 'munge' / 'munge.key'}"], check=True,
                       capture_output=True, timeout=30)
        socket_path = root / "run" / "munge.socket"
        cluster.procs["munged"] = subprocess.Popen(
            [MUNGED, "--foreground", f"--socket={socket_path}", f"--key-file={root / 'munge' / 'munge.key'}",
             f"--pid-file={root / 'run' / 'munged.pid'}", f"--log-file={root / 'log' / 'munged.log'}",
             f"--seed-file={root / 'munge' / 'munged.seed'}"],
            stdout=subprocess.DEVNULL, stderr=open(root / "log" / "munged.err", "w"), start_new_session=True)
        _wait(lambda: socket_path.exists(), timeout, "munged socket", cluster)
        ctld_port = free_port_on(["127.0.0.1"])
        slurmd_port = free_port_on(["127.0.0.1"])
        while slurmd_port == ctld_port:
            slurmd_port = free_port_on(["127.0.0.1"])
        cluster.conf.write_text(_config(root, ctld_port, slurmd_port))
        env = {**os.environ, **cluster.env}
        cluster.procs["slurmctld"] = subprocess.Popen(
            [SLURMCTLD, "-D", "-i", "-f", str(cluster.conf)], env=env, stdout=subprocess.DEVNULL,
            stderr=open(root / "log" / "slurmctld.err", "w"), start_new_session=True)
        _wait(lambda: cluster.client("scontrol", "ping").returncode == 0 and "UP" in
              cluster.client("scontrol", "ping").stdout, timeout, "slurmctld", cluster)
        cluster.procs["slurmd"] = subprocess.Popen(
            [SLURMD, "-D", "-N", NODE, "-f", str(cluster.conf)], env=env, stdout=subprocess.DEVNULL,
            stderr=open(root / "log" / "slurmd.err", "w"), start_new_session=True)
        _wait(lambda: cluster.client("sinfo", "-h", "-o", "%T").stdout.strip() == "idle", timeout, "slurmd", cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait(ready, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except (OSError, subprocess.SubprocessError):
            pass
        dead = [name for name, proc in cluster.procs.items() if proc.poll() is not None]
        if dead or time.monotonic() > deadline:
            logs = "; ".join(f"{p.name}: {p.read_text()[-400:]}" for p in sorted((cluster.root / "log").glob("*"))
                             if p.is_file() and p.stat().st_size)
            raise RuntimeError(f"{what} did not come up ({'exited: ' + ', '.join(dead) if dead else 'timeout'}); {logs}")
        time.sleep(0.2)
