"""Bounded subprocesses for multi-process tests: each runs in its own process group,
which is killed (by PID) on timeout or when the test ends."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra)
    return env


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def run_bounded(cmd: list, timeout: float, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion within ``timeout`` s; on timeout kill its whole process group."""
    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=child_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise AssertionError(f"timed out after {timeout} s: {' '.join(map(str, cmd))}") from None
    finally:
        if proc.poll() is None:
            kill_group(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def unet_train_cmd(*args) -> list:
    return [sys.executable, "-m", "trainer.cli", *args]


def processes_mentioning(text, exclude_self: bool = True) -> list[str]:
    """'PID: command line' of every process whose command line contains ``text`` (a path, say)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
        except psutil.Error:
            continue
        if str(text) in cmdline and not (exclude_self and proc.pid == os.getpid()):
            found.append(f"{proc.pid}: {cmdline[:200]}")
    return found


def wait_until_gone(text, timeout: float = 30) -> list[str]:
    """Poll until no process mentions ``text``; what is left after ``timeout`` s."""
    import time

    deadline = time.monotonic() + timeout
    while (left := processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def free_port_block(count: int, addresses: Sequence[str] = ("127.0.0.1",)) -> int:
    """The first of ``count`` consecutive ports free on every address, below the kernel's ephemeral
    range: a document uses them minutes after this check, and a free port inside that range was
    taken meanwhile by some connection's local end (seen: a Slurm PS worker's gRPC port, 7 min on)."""
    import random
    import socket

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]) \
        if Path("/proc/sys/net/ipv4/ip_local_port_range").exists() else 32768
    for _ in range(200):
        base = random.randrange(10000, max(10001, low - count))
        held = []
        try:
            for port in range(base, base + count):
                for address in addresses:
                    sock = socket.socket()
                    held.append(sock)
                    sock.bind((address, port))
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports below {low}")
