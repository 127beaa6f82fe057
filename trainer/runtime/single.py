"""One process, all data: the reference every distributed mode must reproduce."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from trainer.data.pipeline import Shard
from trainer.runtime.steps import KerasStepper


@dataclass
class SingleRuntime:
    name: str = "single"
    rank: int = 0
    size: int = 1

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    @property
    def synchronous(self) -> bool:
        return True

    @property
    def data_shard(self) -> Shard:
        return Shard(self.rank, self.size)

    def variable_scope(self):
        return contextlib.nullcontext()

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

    def make_stepper(self, model, optimizer, settings):
        return KerasStepper(model, settings)

    def run(self, loop, variables, step):
        return loop()

    def guard(self):
        return contextlib.nullcontext()

    def shutdown(self, succeeded: bool) -> None:
        pass
