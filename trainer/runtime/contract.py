"""What the one training loop needs from an execution mode, and nothing more.

The loop (:mod:`trainer.training.loop`) owns epochs, validation, callbacks, checkpoints and
TensorBoard. A *runtime* says who this process is and how a step is computed: Orbit's
controller/trainer split, in Keras terms. A new distribution mode implements these two
protocols; the loop never asks which mode it runs in.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable, Protocol, TypeVar, runtime_checkable

import numpy as np
import tensorflow as tf

from trainer.config.settings import Settings
from trainer.data.pipeline import Shard

T = TypeVar("T")


@runtime_checkable
class Stepper(Protocol):
    """Computes training steps and validation outputs on whatever devices the runtime owns."""

    def reset(self) -> None:
        """Start a new epoch's running training metrics."""

    def train_step(self, images: tf.Tensor, masks: tf.Tensor) -> float:
        """One synchronous (or, where the runtime says so, asynchronous) update; the running loss."""

    def train_logs(self) -> dict[str, float]:
        """The epoch's training metrics so far: ``loss`` and the per-sample metrics."""

    def evaluate(self, images: tf.Tensor, masks: tf.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Per-sample loss (b,) and per-sample, per-region confusion counts (b, R, 4) at the
        current weights, in inference mode."""


@runtime_checkable
class Runtime(Protocol):
    """One process's place in a training job."""

    name: str   # for logs and summaries only
    rank: int
    size: int   # workers whose gradients form one step (global batch = size x train.batch_size)

    @property
    def is_chief(self) -> bool:
        """The one process that restores and writes checkpoints, logs and TensorBoard."""

    @property
    def synchronous(self) -> bool:
        """True when every step averages all workers' gradients (the LR then scales by size)."""

    @property
    def data_shard(self) -> Shard:
        """Which rows of every global batch this process reads."""

    def variable_scope(self) -> AbstractContextManager:
        """Where the model and optimizer variables must be created."""

    def wrap_optimizer(self, optimizer):
        """The optimizer that combines workers' gradients (or the optimizer itself)."""

    def sync_initial_state(self, variables) -> None:
        """Make every worker start from the chief's (possibly restored) variables."""

    def agree(self, what: str, values: tuple[int, ...]) -> None:
        """Fail fast, naming ``what``, when workers disagree (instead of deadlocking later)."""

    def sum_over_workers(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum of ``values`` over every process that evaluated a part of the data."""

    def callbacks(self) -> list:
        """Keras callbacks that must run before all others (e.g. metric averaging)."""

    def make_stepper(self, model: tf.keras.Model, optimizer, settings: Settings) -> Stepper:
        """The step implementation for this mode."""

    def run(self, loop: Callable[[], T], variables: list, step: Callable[[], int]) -> T:
        """Run the training loop. An elastic runtime commits ``variables`` in memory as it goes
        and, when workers are lost or added, rolls back to the last commit and re-enters
        ``loop`` with the new set of workers; ``step`` names the global step in its log."""

    def guard(self) -> AbstractContextManager:
        """Wraps the whole run: this mode's infrastructure failures leave it as InfrastructureError."""

    def shutdown(self, succeeded: bool) -> None:
        """Release the job's resources (stop cluster roles, finalise collectives)."""
