"""The chief's lifecycle channel: PS and workers register, the chief tells them to stop.

TensorFlow's gRPC servers have no "training is over" signal, which is why a classic PS
blocks forever in ``server.join()``. Here every role process keeps one TCP connection to
the chief: a line ``HELLO <job> <index>`` when its server is up, then it waits for
``STOP <code>`` and exits with that code. If the chief dies, the connection drops and the
role exits non-zero; if a role dies, the chief sees its connection drop and can name it.
Plain text on a configured address; it carries no data and no secrets.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Callable

from trainer.errors import TrainingError, UserError

log = logging.getLogger(__name__)
Task = tuple[str, int]


class ControlServer:
    def __init__(self, host: str, port: int):
        self.address = (host, port)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            # All interfaces, like TensorFlow's gRPC servers: a host's own name may resolve to 127.0.1.1.
            self._sock.bind(("", port))
        except OSError as exc:
            raise UserError(f"cluster.control_port: cannot listen on {host}:{port} ({exc.strerror})") from None
        self._sock.listen(64)
        self._lock = threading.Lock()
        self._connections: dict[Task, socket.socket] = {}
        self.lost: list[Task] = []
        self.on_lost: Callable[[Task], None] | None = None
        self._closing = False
        threading.Thread(target=self._accept, name="control-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="control-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("r", encoding="ascii", errors="replace")
        try:
            parts = reader.readline().split()
        except OSError:
            conn.close()
            return
        if len(parts) != 3 or parts[0] != "HELLO" or not parts[2].isdigit():
            conn.close()
            return
        task = (parts[1], int(parts[2]))
        with self._lock:
            self._connections[task] = conn
        log.info("%s %d registered", *task)
        try:
            while reader.readline():  # roles send nothing more; EOF means the role is gone
                pass
        except OSError:
            pass
        if not self._closing:
            with self._lock:
                if self._connections.get(task) is not conn:  # a stale connection; a newer one registered
                    return
                self._connections.pop(task, None)
                self.lost.append(task)
            log.warning("lost %s %d (its process exited or its host is unreachable)", *task)
            if self.on_lost:
                self.on_lost(task)

    def wait_for(self, tasks: list[Task], timeout_s: float, describe: Callable[[Task], str]) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                missing = [task for task in tasks if task not in self._connections]
            if not missing:
                return
            if time.monotonic() > deadline:
                names = ", ".join(f"{job} {index} ({describe((job, index))})" for job, index in missing)
                raise TrainingError(f"cluster start-up: no answer within {timeout_s:g} s from {names}; "
                                    f"start it with 'unet-train {missing[0][0]} --index {missing[0][1]}'")
            time.sleep(0.05)

    def stop_all(self, code: int) -> None:
        """Tell every registered role to exit with ``code``; close the channel."""
        self._closing = True
        with self._lock:
            connections = list(self._connections.items())
            self._connections.clear()
        for task, conn in connections:
            try:
                conn.sendall(f"STOP {code}\n".encode("ascii"))
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                log.debug("%s %d already gone", *task)
            finally:
                conn.close()
        self._sock.close()


class ControlClient:
    """A role's side: register with the chief, then block until told to stop."""

    def __init__(self, conn: socket.socket):
        self._conn = conn

    @classmethod
    def connect(cls, address: tuple[str, int], job: str, index: int, timeout_s: float) -> "ControlClient":
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                conn = socket.create_connection(address, timeout=5)
                conn.settimeout(None)
                _keepalive(conn)  # notice a vanished chief host within about a minute
                conn.sendall(f"HELLO {job} {index}\n".encode("ascii"))
                return cls(conn)
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise TrainingError(f"{job} {index}: chief control channel {address[0]}:{address[1]} not "
                                        f"reachable within {timeout_s:g} s ({exc.strerror or exc})") from None
                time.sleep(0.2)

    def wait_for_stop(self) -> int | None:
        """The exit code the chief asked for, or None if the chief went away without asking."""
        reader = self._conn.makefile("r", encoding="ascii", errors="replace")
        try:
            for line in reader:
                parts = line.split()
                if len(parts) == 2 and parts[0] == "STOP" and parts[1].lstrip("-").isdigit():
                    return int(parts[1])
        except OSError:
            pass
        return None


def _keepalive(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            conn.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
