"""The launchers' one output channel: every line goes to the console and runs/<run>/training.log.

Shared by the SSH (Ansible) and Slurm launchers so both stream the same way: lines from
several threads never interleave, and a vanished terminal (SIGHUP) never stops the logging
or the clean-up that follows.
"""
from __future__ import annotations

import sys
import threading
from pathlib import Path


class Console:
    def __init__(self, out=sys.stdout):
        self.out = out
        self._lock = threading.Lock()
        self._log_file = None

    def open_log(self, path: Path) -> None:
        """Append to ``path`` from now on (line-buffered: a crash loses nothing already said)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(path, "a", buffering=1)

    def close_log(self) -> None:
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    def say(self, text: str) -> None:
        with self._lock:
            try:
                print(text, file=self.out, flush=True)
            except OSError:
                pass  # the terminal went away (SIGHUP): keep logging, keep stopping
            if self._log_file:
                self._log_file.write(text + "\n")
