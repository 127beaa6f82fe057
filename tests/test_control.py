"""The chief's control channel on 127.0.0.1: authentication, replay, bounds. No TensorFlow,
no processes: a ControlServer and clients (real or hand-made) in this process, over real TCP."""
from __future__ import annotations

import os
import socket
import stat
import threading
import time
import tracemalloc

import pytest

from trainer.errors import TrainingError, UserError
from trainer.runtime.ps import control
from trainer.runtime.ps.control import ControlClient, ControlServer
from trainer.runtime.ps.token import load_or_create_token, new_token, read_token

TOKEN = new_token().encode("ascii")


@pytest.fixture
def server():
    made = []

    def make(**kwargs) -> ControlServer:
        made.append(ControlServer("127.0.0.1", 0, kwargs.pop("token", TOKEN), **kwargs))
        made[-1].lost_calls = []
        made[-1].on_lost = made[-1].lost_calls.append
        return made[-1]
    yield make
    for s in made:
        s.stop_all(1)


def raw(srv: ControlServer, host: str = "127.0.0.1") -> tuple[socket.socket, str]:
    """A hand-made client: connected, challenge read."""
    conn = socket.create_connection((host, srv.address[1]), timeout=5)
    line = conn.makefile("rb").readline(control.MAX_LINE)
    assert line.startswith(b"CHALLENGE "), line
    return conn, line.split()[1].decode()


def settle(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_spoofed_hello_and_disconnect_neither_registers_nor_loses_a_task(server):
    """Seen: `printf 'HELLO ps 0\\n' | nc chief 2226` and a disconnect made the chief stop the job."""
    srv = server()
    for line in (b"HELLO ps 0\n", b"HELLO worker 1\n", b"HELLO ps 0 " + b"0" * 32 + b" " + b"f" * 64 + b"\n"):
        conn, _ = raw(srv)
        conn.sendall(line)
        conn.close()
    assert settle(lambda: srv.refused == 3)
    assert srv.registered() == [] and srv.lost == [] and srv.lost_calls == []
    with pytest.raises(TrainingError, match=r"worker 1 .*3 connection\(s\) refused"):
        srv.wait_for([("worker", 1)], 0.3, lambda task: "127.0.0.1:1")  # fake HELLOs satisfy nothing
    real = ControlClient.connect(srv.address, "ps", 0, 5, TOKEN)
    srv.wait_for([("ps", 0)], 5, str)
    conn, _ = raw(srv)  # while the real PS 0 is registered: spoof it, then drop
    conn.sendall(b"HELLO ps 0\n")
    conn.close()
    assert settle(lambda: srv.refused == 4)
    assert srv.registered() == [("ps", 0)] and srv.lost == [] and srv.lost_calls == []
    srv.stop_all(0)
    assert real.wait_for_stop() == 0


def test_recorded_hello_cannot_be_replayed(server):
    srv = server()
    first, challenge = raw(srv)
    nonce = "ab" * 16
    hello = f"HELLO worker 0 {nonce} {control._mac(TOKEN, 'HELLO', 'worker', 0, challenge, nonce)}\n".encode()
    first.sendall(hello)
    assert first.makefile("rb").readline(control.MAX_LINE).startswith(b"WELCOME ")
    first.close()  # the role goes away: lost, as it should be
    assert settle(lambda: srv.lost == [("worker", 0)])
    second, _ = raw(srv)  # a new challenge: the recorded HELLO's MAC no longer fits
    second.sendall(hello)
    assert second.makefile("rb").readline(control.MAX_LINE) == b""  # closed, no WELCOME
    second.close()
    assert settle(lambda: srv.refused == 1) and srv.registered() == []


def test_newcomer_cannot_replace_a_live_registration(server):
    srv = server()
    live = ControlClient.connect(srv.address, "ps", 0, 5, TOKEN)
    with pytest.raises(TrainingError, match="already registered"):
        ControlClient.connect(srv.address, "ps", 0, 0.5, TOKEN)  # same token, same task
    assert srv.registered() == [("ps", 0)] and srv.lost == [] and srv.lost_calls == []
    srv.stop_all(7)
    assert live.wait_for_stop() == 7


def test_wrong_token_is_refused_both_ways(server):
    srv = server()
    with pytest.raises(TrainingError, match="refused the registration"):
        ControlClient.connect(srv.address, "worker", 0, 0.5, new_token().encode())
    assert srv.registered() == [] and srv.refused >= 1


def test_oversized_line_is_cut_off_without_memory_growth(server):
    """Seen: a 64 MiB line without a newline grew the chief by 65 MiB."""
    srv = server()
    conn, _ = raw(srv)
    chunk, sent = b"x" * 65536, 0
    hung_up = False
    tracemalloc.start()
    try:
        while sent < 64 << 20:
            try:
                conn.sendall(chunk)
            except OSError:  # the chief hung up after 4 KiB: connection reset / broken pipe
                hung_up = True
                break
            sent += len(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        conn.close()
    assert hung_up and sent < 64 << 20, f"the chief accepted {sent} bytes of one line"
    assert peak < 4 << 20, peak
    assert settle(lambda: srv.refused == 1)


def eof_within(conn: socket.socket, seconds: float) -> bool:
    """True when the peer closes ``conn`` within ``seconds`` (whatever it sent before)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        conn.settimeout(left)
        try:
            if conn.recv(4096) == b"":
                return True
        except socket.timeout:
            return False
        except OSError:
            return True
    return False


def handshake_threads() -> int:
    return sum(t.name == "control-conn" and t.is_alive() for t in threading.enumerate())


def test_handshakes_are_capped_the_oldest_gives_way_and_each_is_bounded(server):
    """Seen: 400 idle connections made 400 threads. At most max_pending handshakes, each bounded;
    at the cap the oldest is dropped, never the newcomer."""
    srv = server(max_pending=4, handshake_timeout_s=1.5)
    conns = []
    for _ in range(10):
        conns.append(socket.create_connection(srv.address, timeout=3))
        time.sleep(0.05)  # arrivals in order
    assert settle(lambda: handshake_threads() <= 4)
    assert all(eof_within(conn, 1.0) for conn in conns[:6])  # made room for the newer ones
    start = time.monotonic()
    assert all(eof_within(conn, 3.0) for conn in conns[6:])  # then timed out themselves
    assert time.monotonic() - start < 3
    for conn in conns:
        conn.close()
    assert srv.refused == 10
    client = ControlClient.connect(srv.address, "worker", 0, 5, TOKEN)  # slots are free again
    assert srv.registered() == [("worker", 0)]
    srv.stop_all(0)
    assert client.wait_for_stop() == 0


def test_slowloris_neither_holds_a_slot_past_the_deadline_nor_blocks_a_worker(server, caplog):
    """Seen: 32 connections that read the CHALLENGE and then sent one byte every 5 s held every
    handshake slot for ever (the timeout bounded each recv), and a restarted worker could not register."""
    srv = server(handshake_timeout_s=2.0)  # the default cap, 32 slots
    stop = threading.Event()
    slow = [socket.create_connection(srv.address, timeout=3) for _ in range(32)]
    for conn in slow:
        assert conn.recv(64).startswith(b"CHALLENGE")

    def trickle():
        while not stop.wait(0.3):
            for conn in slow:
                try:
                    conn.send(b"H")
                except OSError:
                    pass
    dripper = threading.Thread(target=trickle, daemon=True)
    dripper.start()
    try:
        start = time.monotonic()
        client = ControlClient.connect(srv.address, "worker", 1, 5, TOKEN)  # while all 32 trickle
        assert time.monotonic() - start < 1.0
        assert srv.registered() == [("worker", 1)]
        again = time.monotonic()
        assert eof_within(slow[-1], 4.0)  # bytes keep coming, yet the deadline holds
        assert time.monotonic() - again < 3.0
    finally:
        stop.set()
        dripper.join(2)
        for conn in slow:
            conn.close()
    assert settle(lambda: srv.refused == 32)

    def summarised() -> bool:  # the log line comes just after the count, from the refusing thread
        return any("11 connection(s) refused so far" in r.getMessage() for r in caplog.records)
    assert settle(summarised), [r.getMessage() for r in caplog.records]
    srv.stop_all(0)
    assert client.wait_for_stop() == 0


def test_listens_on_the_chief_address_only(server):
    srv = server()
    socket.create_connection(("127.0.0.1", srv.address[1]), timeout=2).close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", srv.address[1]), timeout=2)


def test_bind_address_is_the_chief_hosts_unless_it_is_loopback_on_a_multi_host_cluster():
    assert control.bind_address("127.0.0.1", ["127.0.0.1", "127.0.0.3"]) == "127.0.0.1"
    assert control.bind_address("127.0.0.2", []) == "127.0.0.2"
    # the chief's own name resolving to loopback (Debian: 127.0.1.1) while workers are elsewhere
    assert control.bind_address("127.0.1.1", ["10.0.0.7"]) == ""
    with pytest.raises(UserError, match="cluster.chief_host"):
        control.bind_address("no-such-host.invalid", [])


def test_forged_stop_is_ignored(tmp_path):
    """A fake chief that knows the token can register the role; a STOP without this connection's
    MAC is still ignored, the genuine one is obeyed."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def fake_chief():
        conn, _ = listener.accept()
        conn.sendall(b"CHALLENGE " + b"c" * 32 + b"\n")
        _, job, index, nonce, _ = conn.makefile("rb").readline(4096).decode().split()
        conn.sendall(f"WELCOME {control._mac(TOKEN, 'WELCOME', job, index, 'c' * 32, nonce)}\n".encode())
        conn.sendall(b"STOP 0 " + b"0" * 64 + b"\n")  # forged
        conn.sendall(f"STOP 3 {control._mac(TOKEN, 'STOP', 3, job, index, 'c' * 32, nonce)}\n".encode())
        conn.close()

    thread = threading.Thread(target=fake_chief, daemon=True)
    thread.start()
    client = ControlClient.connect(listener.getsockname(), "worker", 2, 5, TOKEN)
    assert client.wait_for_stop() == 3
    thread.join(5)
    listener.close()


def test_token_file_is_created_once_0600_and_shared(tmp_path):
    path = tmp_path / "sub" / "cluster.token"
    tokens = []
    threads = [threading.Thread(target=lambda: tokens.append(load_or_create_token(path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(tokens) == 8 and len(set(tokens)) == 1 and len(tokens[0]) == 64
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["cluster.token"]  # no temp files left


def test_token_file_others_can_read_is_refused(tmp_path):
    path = tmp_path / "cluster.token"
    path.write_text(new_token() + "\n")
    path.chmod(0o644)
    with pytest.raises(UserError, match="readable by others .*0644.*chmod 600"):
        read_token(path)
    path.chmod(0o600)
    path.write_text("short\n")
    with pytest.raises(UserError, match="expected 64 hex digits"):
        read_token(path)


def drop(client: ControlClient) -> None:
    """What the kernel does when a role process dies: its end of the connection closes."""
    client._conn.shutdown(socket.SHUT_RDWR)
    client._conn.close()


def test_lost_worker_that_registers_again_is_logged_back(server, caplog):
    """A supervised worker restarted on its host and port registers again: the chief logs it lost,
    then back; it leaves ``lost`` for ``returned``. A live registration is still never replaced."""
    srv = server()
    caplog.set_level("INFO", logger=control.__name__)
    first = ControlClient.connect(srv.address, "worker", 1, 5, TOKEN)
    assert srv.registered() == [("worker", 1)] and srv.returned == []
    drop(first)  # the worker process dies: its connection drops
    assert settle(lambda: srv.lost_calls == [("worker", 1)]) and srv.lost == [("worker", 1)]  # logged by now
    again = ControlClient.connect(srv.address, "worker", 1, 5, TOKEN)  # the restarted process
    assert srv.registered() == [("worker", 1)] and srv.lost == [] and srv.returned == [("worker", 1)]
    with pytest.raises(TrainingError, match="already registered"):  # the live one keeps its place
        ControlClient.connect(srv.address, "worker", 1, 0.5, TOKEN)
    drop(again)  # lost a second time, back a second time
    assert settle(lambda: srv.lost_calls == [("worker", 1)] * 2) and srv.lost == [("worker", 1)]
    third = ControlClient.connect(srv.address, "worker", 1, 5, TOKEN)
    assert srv.returned == [("worker", 1)] * 2 and srv.lost == []
    lost = "lost worker 1 (its process exited or its host is unreachable)"
    back = "worker 1 back (registered again after loss)"

    def logged() -> list[str]:  # the server thread logs "back" just after its WELCOME: settle
        return [m for m in (r.getMessage() for r in caplog.records if r.name == control.__name__)
                if m in (lost, back, "worker 1 registered")]
    assert settle(lambda: len(logged()) == 5), logged()
    assert logged() == ["worker 1 registered", lost, back, lost, back]
    srv.stop_all(0)
    assert third.wait_for_stop() == 0


def test_a_task_that_was_never_lost_is_not_back(server, caplog):
    srv = server()
    caplog.set_level("INFO", logger=control.__name__)
    client = ControlClient.connect(srv.address, "worker", 0, 5, TOKEN)
    assert settle(lambda: any(r.getMessage() == "worker 0 registered" for r in caplog.records))
    assert srv.returned == [] and not any("back" in r.getMessage() for r in caplog.records)
    srv.stop_all(0)
    assert client.wait_for_stop() == 0
