"""Ctrl-C, SIGTERM and SIGHUP during a launch: note the first, let the launcher stop what it
started, and keep a second signal from abandoning that clean-up half-way (both launchers)."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupts:
    """Signal handlers that only record: the launch loop polls ``cancelled`` and then cleans up."""

    def __init__(self):
        self.event = threading.Event()
        self.signum = signal.SIGINT  # the one that interrupted the launch: exit code 128 + it

    def cancelled(self) -> bool:
        return self.event.is_set()

    def handle(self, signum, frame) -> None:
        if not self.event.is_set():
            self.signum = signum
        self.event.set()

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @contextlib.contextmanager
    def installed(self) -> Iterator["Interrupts"]:
        previous = {signum: signal.signal(signum, self.handle) for signum in STOP_SIGNALS}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """For the clean-up itself: it must run to the end (only the main thread may set handlers)."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
