"""The chief's lifecycle channel: PS and workers register, the chief tells them to stop.

TensorFlow's gRPC servers have no "training is over" signal, which is why a classic PS
blocks forever in ``server.join()``. Here every role process keeps one TCP connection to
the chief: it registers once its server is up, then waits for STOP and exits with the code
the chief sends. If the chief dies, the connection drops and the role exits non-zero; if a
role dies, the chief sees its connection drop and can name it.

Every message is authenticated (HMAC-SHA256 keyed by the per-run token, see ``token.py``)
and bound to both sides' fresh nonces, so a recorded message cannot be replayed:

    chief -> role   CHALLENGE <chief nonce>
    role  -> chief  HELLO <job> <index> <role nonce> <mac>
    chief -> role   WELCOME <mac>            (the chief knows the token too)
    chief -> role   STOP <code> <mac>        (when training ends)

Seen before this: ``printf 'HELLO ps 0\\n' | nc chief 2226`` and a disconnect made the chief
report PS 0 lost (and stop the job); 400 idle connections made 400 threads; a 64 MiB line
without a newline grew the chief by 65 MiB. So: a bounded line (4 KiB), a handshake timeout,
a cap on unauthenticated connections, and a live task's registration is never replaced.

A task whose connection is gone may register again (a supervised worker restarted on its host
and port, see launcher/ssh/remote/supervise.sh). The chief logs it as back: it leaves ``lost``
and joins ``returned``. A newcomer for a task whose connection is still live is refused as before.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from trainer.config.settings import ClusterSettings
from trainer.errors import TrainingError, UserError
from trainer.runtime.network import is_loopback

log = logging.getLogger(__name__)
Task = tuple[str, int]
MAX_LINE = 4096
HANDSHAKE_S = 10.0  # a whole handshake, either side
WAIT_LOG_S = 10.0   # a role waiting for the chief says so this often
NONCE = re.compile(r"[0-9a-f]{32}")
JOBS = ("ps", "worker")


def _mac(token: bytes, *fields) -> str:
    return hmac.new(token, " ".join(str(f) for f in fields).encode("ascii"), hashlib.sha256).hexdigest()


def _valid(token: bytes, mac: str, *fields) -> bool:
    return hmac.compare_digest(_mac(token, *fields).encode("ascii"), mac.encode("ascii", "replace"))


class _LineReader:
    """Lines of at most MAX_LINE bytes from a socket. With a deadline, the time bounds the whole
    exchange, not each ``recv``: a peer that sends one byte every few seconds (slowloris) runs out of
    time as surely as a silent one."""

    def __init__(self, conn: socket.socket):
        self._conn = conn
        self._buffer = b""

    def line(self, deadline: float | None) -> str | None:
        """The next line, or None (EOF, deadline passed, or an over-long line)."""
        while b"\n" not in self._buffer:
            if len(self._buffer) >= MAX_LINE:
                return None
            try:
                if deadline is None:
                    self._conn.settimeout(None)
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    self._conn.settimeout(remaining)
                chunk = self._conn.recv(MAX_LINE)
            except (OSError, ValueError):
                return None
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        if len(line) >= MAX_LINE:
            return None
        return line.decode("ascii", errors="replace") + "\n"


@dataclass
class _Registration:
    conn: socket.socket
    chief_nonce: str
    role_nonce: str


def bind_address(chief_host: str, other_hosts: list[str]) -> str:
    """The address the control channel listens on: the configured chief host's.

    Debian's /etc/hosts maps a machine's own name to 127.0.1.1, so a chief named by host name
    may resolve to loopback on itself while the other hosts reach it over the network. Then
    (and only then) it listens on every interface; every message is authenticated either way."""
    try:
        infos = socket.getaddrinfo(chief_host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UserError(f"cluster.chief_host: {chief_host} does not resolve on the chief ({exc})") from None
    address = infos[0][4][0]
    if is_loopback(address) and not all(is_loopback(host) for host in other_hosts):
        log.warning("chief host %s resolves to %s on itself, but other tasks are on other hosts: the control "
                    "channel listens on every interface (messages are authenticated)", chief_host, address)
        return ""
    return address


class ControlServer:
    def __init__(self, host: str, port: int, token: bytes, *, bind: str | None = None,
                 handshake_timeout_s: float = HANDSHAKE_S, max_pending: int = 32):
        self.address = (host, port)
        self._token = token
        self._handshake_timeout_s = handshake_timeout_s
        bind = host if bind is None else bind
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(bind or None, port, type=socket.SOCK_STREAM,
                                                           flags=socket.AI_PASSIVE)[0]
            self._sock = socket.socket(family, socket.SOCK_STREAM)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind(sockaddr)
        except OSError as exc:
            raise UserError(f"cluster.control_port: cannot listen on {bind or '*'}:{port} "
                            f"({exc.strerror or exc})") from None
        self._sock.listen(64)
        self.address = (host, self._sock.getsockname()[1])  # the real port when asked for port 0
        self._lock = threading.Lock()
        self._registered: dict[Task, _Registration] = {}
        self._max_pending = max_pending
        self._pending: dict[socket.socket, tuple[float, str]] = {}  # in handshake: since when, from whom
        self._evicted: set[socket.socket] = set()  # dropped at the cap, their threads not yet done
        self.refused = 0
        self._refusals: deque[str] = deque(maxlen=5)
        self._last_summary = 0.0
        self.lost: list[Task] = []      # tasks whose connection dropped and that have not registered again
        self.returned: list[Task] = []  # lost tasks that registered again, in order
        self.on_lost: Callable[[Task], None] | None = None
        self._closing = False
        threading.Thread(target=self._accept, name="control-accept", daemon=True).start()

    @classmethod
    def for_cluster(cls, cluster: ClusterSettings) -> "ControlServer":
        """The chief's channel: network checked, token loaded (or created), bound to the chief's address."""
        from trainer.runtime.network import check_host_interfaces, check_private_network
        from trainer.runtime.ps.cluster import ClusterLayout
        from trainer.runtime.ps.peers import roles_by_host, wait_until_resolvable
        from trainer.runtime.ps.token import load_or_create_token

        layout = ClusterLayout.from_settings(cluster)
        hosts = layout.ps + layout.workers + (layout.chief,)
        # its own name too: a TFJob's headless service resolves only once the pod is ready
        wait_until_resolvable(hosts, cluster.startup_timeout_s, "chief", roles_by_host(layout.spec()))
        check_private_network(hosts, cluster.allow_public_network)
        check_host_interfaces("chief", cluster.allow_public_network)
        token = load_or_create_token(Path(cluster.token_file))
        host, port = layout.control_address
        others = [address.rsplit(":", 1)[0] for address in layout.ps + layout.workers]
        return cls(host, port, token, bind=bind_address(host, others))

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, peer = self._sock.accept()
            except OSError:
                return
            evicted = None
            with self._lock:
                if len(self._pending) >= self._max_pending:
                    # At the cap the oldest handshake gives way: a real role finishes in milliseconds,
                    # so only a connection that stalls (or trickles bytes) is ever the oldest.
                    evicted = min(self._pending, key=lambda c: self._pending[c][0])
                    del self._pending[evicted]
                    self._evicted.add(evicted)
                self._pending[conn] = (time.monotonic(), peer[0])
            if evicted is not None:
                _shut(evicted)  # its thread's recv returns at once, and that thread reports it
            threading.Thread(target=self._serve, args=(conn, peer), name="control-conn", daemon=True).start()

    def _refuse(self, peer, reason: str) -> None:
        """Log a refusal: the first ten each, then one summary line a minute at most, so that an
        attacker can neither flood the log nor go unrecorded."""
        with self._lock:
            self.refused += 1
            self._refusals.append(f"{peer[0]}: {reason}")
            count, now = self.refused, time.monotonic()
            summary = count > 10 and now - self._last_summary >= 60.0
            if summary:
                self._last_summary = now
        if count <= 10:
            log.warning("control channel: refused a connection from %s: %s", peer[0], reason)
        elif summary:
            log.warning("control channel: %d connection(s) refused so far (last from %s: %s)", count, peer[0],
                        reason)

    def _handshake(self, conn: socket.socket, peer) -> tuple[Task, _Registration, bool] | None:
        return self._check_hello(conn, _LineReader(conn), peer, time.monotonic() + self._handshake_timeout_s)

    def _check_hello(self, conn: socket.socket, reader: _LineReader, peer,
                     deadline: float) -> tuple[Task, _Registration, bool] | None:
        """(task, registration, back): back is True when the task had been lost before. The whole
        exchange must end by ``deadline``."""
        chief_nonce = secrets.token_hex(16)
        try:
            conn.settimeout(max(0.001, deadline - time.monotonic()))
            conn.sendall(f"CHALLENGE {chief_nonce}\n".encode("ascii"))
        except OSError:
            return None
        line = reader.line(deadline)
        if line is None:
            with self._lock:
                evicted = conn in self._evicted
            self._refuse(peer, f"still in handshake when {self._max_pending} newer connections were: gave its "
                               f"slot to the newest" if evicted else
                         f"no HELLO line within {self._handshake_timeout_s:g} s and {MAX_LINE} bytes")
            return None
        parts = line.split()
        if (len(parts) != 5 or parts[0] != "HELLO" or parts[1] not in JOBS or not parts[2].isdigit()
                or not NONCE.fullmatch(parts[3])):
            self._refuse(peer, "malformed HELLO")
            return None
        _, job, index, role_nonce, mac = parts
        if not _valid(self._token, mac, "HELLO", job, index, chief_nonce, role_nonce):
            self._refuse(peer, f"HELLO {job} {index} with a wrong token (is cluster.token_file the same secret "
                               f"on every host?)")
            return None
        task = (job, int(index))
        registration = _Registration(conn, chief_nonce, role_nonce)
        with self._lock:
            taken = task in self._registered or self._closing
            back = not taken and task in self.lost
            if not taken:
                self._registered[task] = registration
                if back:
                    self.lost.remove(task)
                    self.returned.append(task)
        if taken:  # a live task keeps its registration; the newcomer is turned away
            self._refuse(peer, f"{job} {index} is already registered by a live connection")
            return None
        try:
            conn.settimeout(max(0.001, deadline - time.monotonic()))
            conn.sendall(f"WELCOME {_mac(self._token, 'WELCOME', job, index, chief_nonce, role_nonce)}\n"
                         .encode("ascii"))
        except OSError:
            pass  # gone already: the loop in _serve sees EOF and reports it lost
        return task, registration, back

    def _serve(self, conn: socket.socket, peer) -> None:
        try:
            registered = self._handshake(conn, peer)
        finally:
            with self._lock:
                self._pending.pop(conn, None)
                self._evicted.discard(conn)
        if registered is None:
            conn.close()
            return
        task, registration, back = registered
        if back:
            log.info("%s %d back (registered again after loss)", *task)
        else:
            log.info("%s %d registered", *task)
        try:  # stop_all may close the connection at any moment from here on (EBADF)
            conn.settimeout(None)
            _keepalive(conn)
            while conn.recv(MAX_LINE):  # roles send nothing more; EOF means the role is gone
                pass
        except OSError:
            pass
        if not self._closing:
            with self._lock:
                if self._registered.get(task) is not registration:
                    return
                self._registered.pop(task, None)
                self.lost.append(task)
            log.warning("lost %s %d (its process exited or its host is unreachable)", *task)
            if self.on_lost:
                self.on_lost(task)

    def wait_for(self, tasks: list[Task], timeout_s: float, describe: Callable[[Task], str]) -> None:
        started = time.monotonic()
        deadline, next_log = started + timeout_s, started + WAIT_LOG_S
        while True:
            with self._lock:
                missing = [task for task in tasks if task not in self._registered]
                refused, last = self.refused, list(self._refusals)[-1:]
            if not missing:
                return
            now = time.monotonic()
            if now >= next_log:
                log.warning("chief: waiting for %s to register (%.0f s of %g s, cluster.startup_timeout_s)",
                            ", ".join(f"{job} {index} ({describe((job, index))})" for job, index in missing),
                            now - started, timeout_s)
                next_log = now + WAIT_LOG_S
            if now > deadline:
                names = ", ".join(f"{job} {index} ({describe((job, index))})" for job, index in missing)
                note = f"; {refused} connection(s) refused (last: {last[0]})" if refused else ""
                raise TrainingError(f"cluster start-up: no answer within {timeout_s:g} s from {names}; "
                                    f"start it with 'unet-train {missing[0][0]} --index {missing[0][1]}'{note}")
            time.sleep(0.05)

    def registered(self) -> list[Task]:
        with self._lock:
            return sorted(self._registered)

    def stop_all(self, code: int) -> None:
        """Tell every registered role to exit with ``code``; close the channel."""
        with self._lock:
            self._closing = True
            registrations = list(self._registered.items())
            self._registered.clear()
        for (job, index), reg in registrations:
            mac = _mac(self._token, "STOP", code, job, index, reg.chief_nonce, reg.role_nonce)
            try:
                reg.conn.sendall(f"STOP {code} {mac}\n".encode("ascii"))
                reg.conn.shutdown(socket.SHUT_WR)
            except OSError:
                log.debug("%s %d already gone", job, index)
            finally:
                reg.conn.close()
        self._sock.close()


class _HandshakeFailed(Exception):
    pass


class ControlClient:
    """A role's side: register with the chief, then block until told to stop."""

    def __init__(self, conn: socket.socket, reader: _LineReader, token: bytes, task: Task, chief_nonce: str,
                 role_nonce: str):
        self._conn, self._reader, self._token = conn, reader, token
        self._task, self._nonces = task, (chief_nonce, role_nonce)

    @classmethod
    def connect(cls, address: tuple[str, int], job: str, index: int, timeout_s: float,
                token: bytes) -> "ControlClient":
        started = time.monotonic()
        deadline, next_log = started + timeout_s, started + WAIT_LOG_S
        while True:
            conn = None
            try:
                conn = socket.create_connection(address, timeout=5)
                return cls._handshake(conn, job, index, token)
            except (OSError, _HandshakeFailed) as exc:
                if conn is not None:
                    conn.close()
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                now = time.monotonic()
                if now > deadline:
                    raise TrainingError(f"{job} {index}: chief control channel {address[0]}:{address[1]}: no "
                                        f"registration within {timeout_s:g} s ({reason})") from None
                if now >= next_log:  # the chief may still be starting (or its name not resolve yet)
                    log.warning("%s %d: still waiting for the chief at %s:%d (%s; %.0f s of %g s, "
                                "cluster.startup_timeout_s)", job, index, address[0], address[1], reason,
                                now - started, timeout_s)
                    next_log = now + WAIT_LOG_S
                time.sleep(0.2)

    @classmethod
    def _handshake(cls, conn: socket.socket, job: str, index: int, token: bytes) -> "ControlClient":
        reader, deadline = _LineReader(conn), time.monotonic() + HANDSHAKE_S
        parts = (reader.line(deadline) or "").split()
        if len(parts) != 2 or parts[0] != "CHALLENGE" or not NONCE.fullmatch(parts[1]):
            raise _HandshakeFailed("no challenge from the chief (busy, or not the chief)")
        chief_nonce, role_nonce = parts[1], secrets.token_hex(16)
        mac = _mac(token, "HELLO", job, index, chief_nonce, role_nonce)
        conn.sendall(f"HELLO {job} {index} {role_nonce} {mac}\n".encode("ascii"))
        parts = (reader.line(deadline) or "").split()
        if len(parts) != 2 or parts[0] != "WELCOME" or not _valid(token, parts[1], "WELCOME", job, index,
                                                                    chief_nonce, role_nonce):
            raise _HandshakeFailed("the chief refused the registration (a different cluster.token_file, or "
                                   f"{job} {index} is already registered)")
        conn.settimeout(None)
        _keepalive(conn)  # notice a vanished chief host within about a minute
        return cls(conn, reader, token, (job, index), chief_nonce, role_nonce)

    def wait_for_stop(self) -> int | None:
        """The exit code the chief asked for, or None if the chief went away without asking.
        A STOP without the chief's MAC for this connection is ignored."""
        job, index = self._task
        while (line := self._reader.line(None)) is not None:
            parts = line.split()
            if len(parts) == 3 and parts[0] == "STOP" and re.fullmatch(r"-?[0-9]{1,3}", parts[1]) and _valid(
                    self._token, parts[2], "STOP", parts[1], job, index, *self._nonces):
                return int(parts[1])
            log.warning("%s %d: ignored an unauthenticated message on the control channel", job, index)
        return None


def _shut(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _keepalive(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            conn.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
