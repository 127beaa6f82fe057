"""Throwaway sshd instances on loopback aliases: one process per 'host', a fresh host key and
client key, keys only. Used by the launcher tests and benchmarks/launch_overhead.py."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
HOSTS = ("127.0.0.2", "127.0.0.3")


@dataclass
class SshHosts:
    hosts: tuple[str, ...]
    port: int
    key: Path
    known_hosts: Path
    procs: list
    root: Path | None = None

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)

    def stop_host(self, host: str) -> None:
        """Stop one host's sshd (by PID): the host is gone for SSH."""
        proc = self.procs[self.hosts.index(host)]
        proc.kill()
        proc.wait(timeout=30)

    def start_host(self, host: str, timeout: float = 30) -> None:
        """Start a stopped host's sshd again, same address, port and host key: the host is back."""
        assert self.root is not None and self.procs[self.hosts.index(host)].poll() is not None
        self.procs[self.hosts.index(host)] = _sshd(self.root, host, self.port)
        _wait_listening(host, self.port, time.monotonic() + timeout, self)


def free_port_on(addresses) -> int:
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((addresses[0], 0))
            port = probe.getsockname()[1]
        try:
            for address in addresses[1:]:
                with socket.socket() as other:
                    other.bind((address, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no common free port")


def start_sshd_hosts(root: Path, hosts: tuple[str, ...] = HOSTS, timeout: float = 30) -> SshHosts:
    root.mkdir(parents=True, exist_ok=True)
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True)
    (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
    Path("/run/sshd").mkdir(exist_ok=True)
    port = free_port_on(hosts)
    procs = [_sshd(root, host, port) for host in hosts]
    # The hosts' key, pinned: the launcher checks host keys strictly against cluster.known_hosts_file.
    host_key = (root / "host_key.pub").read_text().split()
    (root / "known_hosts").write_text("".join(f"[{host}]:{port} {host_key[0]} {host_key[1]}\n" for host in hosts))
    started = SshHosts(hosts, port, root / "client_key", root / "known_hosts", procs, root)
    deadline = time.monotonic() + timeout
    for host in hosts:
        _wait_listening(host, port, deadline, started)
    return started


def _sshd(root: Path, host: str, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [SSHD, "-D", "-e", "-p", str(port), "-o", f"ListenAddress={host}", "-h", str(root / "host_key"),
         "-o", f"AuthorizedKeysFile={root / 'authorized_keys'}", "-o", "StrictModes=no",
         "-o", "PermitRootLogin=prohibit-password", "-o", "PasswordAuthentication=no",
         "-o", "KbdInteractiveAuthentication=no", "-o", "PidFile=none", "-o", "MaxStartups=100",
         "-o", "MaxSessions=100"],
        stdout=subprocess.DEVNULL, stderr=open(root / f"sshd-{host}.log", "a"), start_new_session=True)


def _wait_listening(host: str, port: int, deadline: float, started: SshHosts) -> None:
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                started.stop()
                raise RuntimeError(f"sshd on {host}:{port} did not start (see {started.root})") from None
            time.sleep(0.1)
