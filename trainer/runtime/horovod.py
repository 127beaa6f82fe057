"""Horovod allreduce runtime: the Horovod Keras recipe, every step of it.

init -> pin one GPU per local rank -> wrap the optimizer in DistributedOptimizer
(gradients averaged by allreduce each step = synchronous SGD) -> broadcast the chief's
initial (or resumed) state -> average metrics across ranks -> only rank 0 writes.
LR scaling and warm-up live in the training loop's LR controller (they apply to the PS
mode too). Nothing crosses the wire but tensors: no pickled Python objects.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from trainer.data.pipeline import Shard
from trainer.errors import InfrastructureError, TrainingError
from trainer.runtime.steps import KerasStepper


@dataclass
class HorovodRuntime:
    rank: int
    size: int
    local_rank: int
    local_size: int
    name: str = "horovod"

    @classmethod
    def start(cls) -> "HorovodRuntime":
        import horovod.tensorflow.keras as hvd
        import tensorflow as tf

        hvd.init()
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            gpu = gpus[hvd.local_rank() % len(gpus)]
            tf.config.experimental.set_memory_growth(gpu, True)
            tf.config.set_visible_devices(gpu, "GPU")
        return cls(rank=hvd.rank(), size=hvd.size(), local_rank=hvd.local_rank(), local_size=hvd.local_size())

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
        import horovod.tensorflow.keras as hvd

        return hvd.DistributedOptimizer(optimizer)

    def sync_initial_state(self, variables) -> None:
        import horovod.tensorflow as hvd_tf

        hvd_tf.broadcast_variables(variables, root_rank=0)

    def agree(self, what: str, values: tuple[int, ...]) -> None:
        import horovod.tensorflow as hvd_tf
        import tensorflow as tf

        gathered = hvd_tf.allgather(tf.constant([list(values)], tf.int64)).numpy()
        if any((row != gathered[0]).any() for row in gathered):
            raise TrainingError(f"ranks disagree on {what}: " + ", ".join(
                f"rank {rank}={tuple(int(v) for v in row)}" for rank, row in enumerate(gathered))
                + " (is the same data present on every host?)")

    def sum_over_workers(self, values: np.ndarray) -> np.ndarray:
        import horovod.tensorflow as hvd_tf
        import tensorflow as tf

        return hvd_tf.allreduce(tf.constant(values, tf.float64), op=hvd_tf.Sum).numpy()

    def callbacks(self) -> list:
        import horovod.tensorflow.keras as hvd

        return [hvd.callbacks.MetricAverageCallback()]

    def make_stepper(self, model, optimizer, settings):
        return KerasStepper(model, settings)

    @contextlib.contextmanager
    def guard(self):
        """A rank that died mid-collective surfaces as HorovodInternalError on the others."""
        from horovod.common.exceptions import HorovodInternalError

        try:
            yield
        except HorovodInternalError as exc:
            raise InfrastructureError(f"horovod: a rank failed during a collective operation "
                                      f"({str(exc).splitlines()[0][:200]}); rerun to resume from the last "
                                      f"checkpoint") from None

    def shutdown(self, succeeded: bool) -> None:
        import horovod.tensorflow.keras as hvd

        hvd.shutdown()
