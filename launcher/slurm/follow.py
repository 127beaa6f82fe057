"""The job's output file (srun --label) as labelled lines, as the SSH launcher prints them.

srun prefixes every line of task N with ``N: ``; each task first announces its node and role
(task.py), so later lines read ``[node role] text``. Lines of the batch script itself, before
srun, read ``[slurm] text``.
"""
from __future__ import annotations

import re
from pathlib import Path

from launcher.slurm.task import ANNOUNCED, EXITED

_TASK_LABEL = re.compile(r"\s*(\d+): ")  # srun --label pads the number to the widest task id


class JobOutput:
    """Reads a growing file in whole lines; ``final`` also takes a last line without a newline."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def read(self, final: bool = False) -> list[str]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                chunk = handle.read()
        except FileNotFoundError:  # not created until the job starts
            return []
        end = len(chunk) if final else chunk.rfind(b"\n") + 1
        self.offset += end
        return chunk[:end].decode("utf-8", "replace").splitlines()


class TaskLabels:
    def __init__(self):
        self.where: dict[int, tuple[str, str]] = {}   # task -> (node, role)
        self.exit_codes: dict[int, int] = {}

    def label(self, line: str) -> str:
        match = _TASK_LABEL.match(line)
        if not match:
            return f"[slurm] {line}"
        task, text = int(match.group(1)), line[match.end():]
        if announced := ANNOUNCED.match(text):
            self.where[task] = (announced.group(2), announced.group(3))
        elif exited := EXITED.match(text):
            self.exit_codes[task] = int(exited.group(3))
        node, role = self.where.get(task, ("?", f"task {task}"))
        return f"[{node} {role}] {text}"

    def role(self, task: int) -> str:
        node, role = self.where.get(task, ("?", f"task {task}"))
        return f"{role} on {node}"

    def failed(self) -> dict[int, int]:
        return {task: rc for task, rc in self.exit_codes.items() if rc != 0}
