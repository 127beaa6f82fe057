"""One process, all data: the reference every distributed mode must reproduce."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from trainer.runtime.replica import ReplicaProcess


@dataclass
class SingleRuntime(ReplicaProcess):
    name: str = "single"
    rank: int = 0
    size: int = 1

    def wrap_optimizer(self, optimizer):
        return optimizer

    def sync_initial_state(self, variables) -> None:
        """Nothing to share alone."""

    def agree(self, what: str, values: tuple[int, ...]) -> None:
        """Alone, nobody disagrees."""

    def sum_over_workers(self, values: np.ndarray) -> np.ndarray:
        return values

    def callbacks(self) -> list:
        return []

    def run(self, loop, variables, step):
        return loop()

    def guard(self):
        return contextlib.nullcontext()

    def shutdown(self, succeeded: bool) -> None:
        pass
