"""What single-process and Horovod runtimes share: each process holds a full model replica,
reads rows ``rank, rank + size, ...`` of every global batch and runs Keras' own train step."""
from __future__ import annotations

import contextlib

from trainer.data.pipeline import Shard
from trainer.runtime.steps import KerasStepper


class ReplicaProcess:
    """Mixin for data-parallel runtimes whose processes each hold the model (rank, size set by them)."""

    rank: int
    size: int

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

    def make_stepper(self, model, optimizer, settings):
        return KerasStepper(model, settings)
