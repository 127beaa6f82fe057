"""The runtime contract the training loop talks to, and the single-process runtime."""
from __future__ import annotations

from dataclasses import dataclass, field

from trainer.data.pipeline import Shard


@dataclass
class SingleRuntime:
    """One process, all data: the reference every distributed mode must reproduce."""

    name: str = "single"
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    extra_callbacks: list = field(default_factory=list)

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.size)

    def wrap_optimizer(self, optimizer):
        return optimizer

    def sync_initial_state(self, variables) -> None:
        """Make every worker start from the chief's variables (nothing to do alone)."""

    def agree(self, what: str, value) -> None:
        """Fail fast (instead of deadlocking) when workers disagree on ``value``."""

    def callbacks(self) -> list:
        """Callbacks that must run before all others (e.g. metric averaging)."""
        return list(self.extra_callbacks)

    def shutdown(self) -> None:
        pass
