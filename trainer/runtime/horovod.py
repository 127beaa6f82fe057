"""Horovod allreduce runtime: the Horovod Keras recipe, every step of it.

init -> pin one GPU per local rank -> wrap the optimizer in DistributedOptimizer
(gradients averaged by allreduce each step = synchronous SGD) -> broadcast the chief's
initial (or resumed) state -> average metrics across ranks -> only rank 0 writes.
LR scaling and warm-up live in the training loop's LR controller (they apply to the PS
mode too).
"""
from __future__ import annotations

from dataclasses import dataclass

from trainer.errors import TrainingError
from trainer.runtime.base import SingleRuntime


@dataclass
class HorovodRuntime(SingleRuntime):
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

    def wrap_optimizer(self, optimizer):
        import horovod.tensorflow.keras as hvd

        return hvd.DistributedOptimizer(optimizer)

    def sync_initial_state(self, variables) -> None:
        import horovod.tensorflow as hvd_tf

        hvd_tf.broadcast_variables(variables, root_rank=0)

    def agree(self, what: str, value) -> None:
        import horovod.tensorflow as hvd_tf

        values = hvd_tf.allgather_object(value)
        if any(v != values[0] for v in values):
            raise TrainingError(f"ranks disagree on {what}: " + ", ".join(
                f"rank {rank}={v}" for rank, v in enumerate(values))
                + " (is the same data present on every host?)")

    def callbacks(self) -> list:
        import horovod.tensorflow.keras as hvd

        return [hvd.callbacks.MetricAverageCallback(), *self.extra_callbacks]

    def shutdown(self) -> None:
        import horovod.tensorflow.keras as hvd

        hvd.shutdown()
