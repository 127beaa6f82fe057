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

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


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
    procs = []
    for host in hosts:
        procs.append(subprocess.Popen(
            [SSHD, "-D", "-e", "-p", str(port), "-o", f"ListenAddress={host}", "-h", str(root / "host_key"),
             "-o", f"AuthorizedKeysFile={root / 'authorized_keys'}", "-o", "StrictModes=no",
             "-o", "PermitRootLogin=prohibit-password", "-o", "PasswordAuthentication=no",
             "-o", "KbdInteractiveAuthentication=no", "-o", "PidFile=none", "-o", "MaxStartups=100",
             "-o", "MaxSessions=100"],
            stdout=subprocess.DEVNULL, stderr=open(root / f"sshd-{host}.log", "w"), start_new_session=True))
    # The hosts' key, pinned: the launcher checks host keys strictly against cluster.known_hosts_file.
    host_key = (root / "host_key.pub").read_text().split()
    (root / "known_hosts").write_text("".join(f"[{host}]:{port} {host_key[0]} {host_key[1]}\n" for host in hosts))
    started = SshHosts(hosts, port, root / "client_key", root / "known_hosts", procs)
    deadline = time.monotonic() + timeout
    for host in hosts:
        while True:
            try:
                socket.create_connection((host, port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    started.stop()
                    raise RuntimeError(f"sshd on {host}:{port} did not start (see {root})") from None
                time.sleep(0.1)
    return started
