"""Horovod allreduce runtime: the Horovod Keras recipe, every step of it.

init -> pin one GPU per local rank -> wrap the optimizer in DistributedOptimizer
(gradients averaged by allreduce each step = synchronous SGD) -> broadcast the chief's
initial (or resumed) state -> average metrics across ranks -> only rank 0 writes.
LR scaling and warm-up live in the training loop's LR controller (they apply to the PS
mode too). Nothing crosses the wire but tensors: no pickled Python objects.

Elastic (``train.elastic``, under ``horovodrun --min-np/--max-np``): the loop's variables
(weights, optimizer slots, epoch, step in epoch, schedule and early-stopping counters) are
committed to host memory every ``train.elastic_commit_steps`` steps. When a rank is lost
(or hosts are added), Horovod re-forms the world, every survivor rolls back to the last
commit, rank 0's state is broadcast, and the loop re-enters: it rebuilds its data shards
and LR scaling for the new world size and carries on from the committed step, so no step
is applied twice.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field

import horovod.tensorflow as hvd_tf
import horovod.tensorflow.keras as hvd
import numpy as np
import tensorflow as tf
from horovod.common.elastic import State
from horovod.common.exceptions import HorovodInternalError
from horovod.runner.elastic.worker import HostUpdateResult

from trainer.errors import ConfigError, InfrastructureError, TrainingError
from trainer.runtime.replica import ReplicaProcess

log = logging.getLogger(__name__)
MEMBER_BYTES = 96


@dataclass
class HorovodRuntime(ReplicaProcess):
    rank: int = 0
    size: int = 1
    elastic: bool = False
    commit_steps: int = 10
    name: str = "horovod"
    _state: object = field(default=None, repr=False)

    @classmethod
    def start(cls, elastic: bool = False, commit_steps: int = 10) -> "HorovodRuntime":
        hvd.init()
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            gpu = gpus[hvd.local_rank() % len(gpus)]
            tf.config.experimental.set_memory_growth(gpu, True)
            tf.config.set_visible_devices(gpu, "GPU")
        if elastic and os.environ.get("HOROVOD_ELASTIC") != "1":
            raise ConfigError("train.elastic: start the job with horovodrun's elastic options "
                              "(--min-np/--max-np and --host-discovery-script, or "
                              "'unet-train distributed --mode horovod --elastic')")
        return cls(rank=hvd.rank(), size=hvd.size(), elastic=elastic, commit_steps=commit_steps,
                   name="horovod-elastic" if elastic else "horovod")

    def wrap_optimizer(self, optimizer):
        return hvd.DistributedOptimizer(optimizer)

    def sync_initial_state(self, variables) -> None:
        hvd_tf.broadcast_variables(variables, root_rank=0)

    def agree(self, what: str, values: tuple[int, ...]) -> None:
        gathered = hvd_tf.allgather(tf.constant([list(values)], tf.int64)).numpy()
        if any((row != gathered[0]).any() for row in gathered):
            raise TrainingError(f"ranks disagree on {what}: " + ", ".join(
                f"rank {rank}={tuple(int(v) for v in row)}" for rank, row in enumerate(gathered))
                + " (is the same data present on every host?)")

    def sum_over_workers(self, values: np.ndarray) -> np.ndarray:
        return hvd_tf.allreduce(tf.constant(values, tf.float64), op=hvd_tf.Sum).numpy()

    def callbacks(self) -> list:
        commits = [_Commit(self._state, self.commit_steps)] if self.elastic and self._state is not None else []
        return [hvd.callbacks.MetricAverageCallback(), *commits]

    def run(self, loop, variables, step):
        if not self.elastic:
            return loop()
        self._state = _VariablesState(variables)
        members: list[str] = []

        def enter(state):
            nonlocal members
            self.rank, self.size = hvd.rank(), hvd.size()  # re-numbered after a membership change
            now = self.members()
            if members and now != members:
                lost, joined = sorted(set(members) - set(now)), sorted(set(now) - set(members))
                log.warning("world size %d -> %d at step %d%s%s", len(members), len(now), step(),
                            f"; lost {', '.join(lost)}" if lost else "", f"; joined {', '.join(joined)}" if joined else "")
            members = now
            try:
                return loop()
            except tf.errors.OpError as exc:  # a collective broken by a lost rank: let Horovod re-form the world
                if "Horovod" in str(exc):
                    raise HorovodInternalError(exc) from None
                raise

        return hvd_tf.elastic.run(enter)(self._state)

    def members(self) -> list[str]:
        """``host[local rank]`` of every rank, in rank order (fixed-width bytes gathered as a tensor)."""
        me = f"{os.environ.get('HOROVOD_HOSTNAME', 'localhost')}[{hvd_tf.local_rank()}]".encode()[:MEMBER_BYTES]
        row = np.frombuffer(me.ljust(MEMBER_BYTES, b"\0"), np.uint8)
        gathered = hvd_tf.allgather(tf.constant(row[None, :])).numpy()
        return [bytes(r).rstrip(b"\0").decode(errors="replace") for r in gathered]

    @contextlib.contextmanager
    def guard(self):
        """A rank that died mid-collective surfaces as HorovodInternalError on the others."""
        try:
            yield
        except HorovodInternalError as exc:
            raise InfrastructureError(f"horovod: a rank failed during a collective operation "
                                      f"({str(exc).splitlines()[0][:200]}); rerun to resume from the last "
                                      f"checkpoint") from None

    def shutdown(self, succeeded: bool) -> None:
        hvd.shutdown()


class _VariablesState(State):
    """Horovod's elastic State over TensorFlow variables, without pickling anything.

    Horovod's own TensorFlowKerasState syncs extra attributes with ``broadcast_object``
    (cloudpickle over the wire). Here everything the loop needs lives in variables, and the
    host-update bookkeeping is broadcast as a float64 tensor.
    """

    def __init__(self, variables):
        super().__init__(bcast_object=_broadcast_update, get_rank=hvd_tf.rank)
        self.variables = list(variables)
        self.save()

    def save(self):
        self._saved = [tf.identity(v) for v in self.variables]

    def restore(self):
        for variable, value in zip(self.variables, self._saved):
            variable.assign(value)

    def sync(self):
        hvd_tf.broadcast_variables(self.variables, root_rank=0)
        self.save()


def _broadcast_update(values):
    previous, last, update = values
    sent = hvd_tf.broadcast(tf.constant([float(previous), float(last), float(int(update))], tf.float64), 0)
    previous, last, update = sent.numpy().tolist()
    return previous, last, HostUpdateResult(int(update))


class _Commit(tf.keras.callbacks.Callback):
    """Commit the elastic state every N global steps (all ranks reach the same step together)."""

    def __init__(self, state: State, every: int):
        super().__init__()
        self.state, self.every = state, every

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) % self.every == 0:
            self.state.commit()
