"""The parameter-server runtime: synchronous SGD on TensorFlow's ParameterServerStrategy.

The chief process (``unet-train chief``) runs the one training loop with this runtime; the
``ps`` and ``worker`` processes only serve (see :mod:`trainer.runtime.ps.roles`).

Why this design, rather than the alternatives:

* ``ParameterServerStrategy`` + ``model.fit`` is asynchronous: each worker applies its own
  gradient to whatever weights it last read (stale gradients). ``tf.compat.v1``
  ``SyncReplicasOptimizer`` needs TF1 graph sessions and the legacy optimizers.
* Instead, each global step the chief reads one global batch (N x b samples) from the
  same tf.data pipeline as every other mode, and schedules one closure per *shard index*
  i (via ``ClusterCoordinator``), passing shard i's b samples with it. Whichever worker
  runs it computes the gradient of shard i at the current weights and **assigns** it into
  slot i of a gradient buffer that lives on the parameter servers. When all N closures
  are done, one coordinator-side function checks that every slot holds this step's
  gradient, averages the N slots, and applies one optimizer update on the PS.
* Workers are stateless (the data comes with the closure), so when a worker dies the
  coordinator re-runs its closure on another worker, and because slot i is *overwritten*
  with the same gradient (same weights, same samples), a re-run can never count a
  gradient twice. The "ready" markers make a missing shard an error, never a silent
  partial update. That is the no-double-update guarantee the tests check: a run with a
  worker killed mid-training ends with exactly the weights of an undisturbed run.
* Variables are placed round-robin across the PS tasks (TensorFlow's default for
  several PS), so parameters and gradient slots spread over all of them.
* ``cluster.async: true`` keeps TensorFlow's plain asynchronous PS training instead.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import tensorflow as tf

from trainer.config.settings import Settings
from trainer.data.pipeline import Shard
from trainer.errors import ClusterError
from trainer.models.losses import make_loss
from trainer.models.metrics import TRAIN_METRIC_NAMES, train_metric_fns
from trainer.runtime.ps.cluster import ClusterLayout, export_tf_config
from trainer.runtime.ps.control import ControlServer
from trainer.runtime.steps import evaluation_fn

log = logging.getLogger(__name__)
# What a lost task looks like from the coordinator's side.
CLUSTER_FAILURES = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
                    tf.errors.NotFoundError, tf.errors.InternalError)


@dataclass
class PsRuntime:
    """The chief's view: N workers compute, the chief alone reads data and writes files.

    ``on_fatal`` is the entry point's decision of what to do when a parameter server is lost
    (its variables are gone; TensorFlow's coordinator may abort the process on its own):
    the runtime stops the roles and hands the error over, from whichever thread saw it.
    """

    settings: Settings
    layout: ClusterLayout
    control: ControlServer
    strategy: object
    coordinator: object
    name: str = "ps"
    rank: int = 0
    size: int = 1
    on_fatal: Callable[[ClusterError], None] | None = None

    @classmethod
    def start(cls, settings: Settings, on_fatal: Callable[[ClusterError], None] | None = None) -> "PsRuntime":
        """Wait for every PS and worker to register, then connect the coordinator to them."""
        layout = ClusterLayout.from_settings(settings.cluster)
        export_tf_config(layout, "chief", 0)
        control = ControlServer.for_cluster(settings.cluster)
        try:
            control.wait_for(layout.server_tasks(), settings.cluster.startup_timeout_s,
                             lambda task: layout.address(*task))
            resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
            strategy = tf.distribute.ParameterServerStrategy(resolver)
            coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
        except BaseException:
            control.stop_all(1)
            raise
        runtime = cls(settings, layout, control, strategy, coordinator, size=len(layout.workers), on_fatal=on_fatal)
        control.on_lost = runtime._task_lost
        log.info("parameter servers: %s; workers: %s; %s", ", ".join(layout.ps), ", ".join(layout.workers),
                 "synchronous SGD" if runtime.synchronous else "ASYNCHRONOUS (cluster.async)")
        return runtime

    @property
    def is_chief(self) -> bool:
        return True

    @property
    def synchronous(self) -> bool:
        return not self.settings.cluster.asynchronous

    @property
    def data_shard(self) -> Shard:
        return Shard()  # the chief reads every global batch and hands each worker its rows

    def variable_scope(self):
        return self.strategy.scope()

    def wrap_optimizer(self, optimizer):
        return optimizer

    def sync_initial_state(self, variables) -> None:
        """Variables live on the parameter servers: there is one copy, nothing to broadcast."""

    def agree(self, what: str, values: tuple[int, ...]) -> None:
        """Only the chief reads data: nobody to disagree with."""

    def sum_over_workers(self, values: np.ndarray) -> np.ndarray:
        return values  # the chief gathered every shard's outputs itself

    def callbacks(self) -> list:
        return []

    def make_stepper(self, model, optimizer, settings):
        devices = sorted({v.device for v in model.trainable_variables})
        log.info("model variables on %s", ", ".join(devices))
        return PsStepper(settings, self.strategy, self.coordinator, model, optimizer, self.size, self.lost_tasks)

    def run(self, loop, variables, step):
        return loop()

    def guard(self):
        return _ClusterFailures(self.lost_tasks, self.settings.run_path)

    def shutdown(self, succeeded: bool) -> None:
        self.control.stop_all(0 if succeeded else 1)

    def lost_tasks(self) -> list[str]:
        return [f"{job} {index} ({self.layout.address(job, index)})" for job, index in self.control.lost]

    def _task_lost(self, task) -> None:
        """A lost worker is survivable (its closures are re-run elsewhere); a lost PS is not."""
        job, index = task
        if job != "ps":
            return
        error = ClusterError(f"parameter-server training stopped: lost ps {index} ({self.layout.address(job, index)}). "
                             f"Restart the ps/worker roles and rerun to resume from the last checkpoint in "
                             f"{self.settings.run_path / 'checkpoints' / 'last'}")
        log.error("%s", error)
        self.control.stop_all(1)
        if self.on_fatal is not None:
            self.on_fatal(error)


class GradientSlots:
    """Per-shard gradient buffers on the PS, with a per-shard 'holds step s' marker.

    Each slot lives on the same PS as its variable, and the average is computed there, so a
    step moves N gradients worker -> PS and nothing through the chief. Explicit control
    dependencies order what ``tf.function`` would otherwise leave free (ops on different
    resources): a shard's marker is set only after its gradients are written, and the
    update runs only after the markers are checked.
    """

    def __init__(self, strategy, variables, shards: int):
        self.shards = shards
        self.variables = list(variables)
        self.slots = [[self._slot_like(strategy, v, f"grad_slot{i}_{n}") for n, v in enumerate(self.variables)]
                      for i in range(shards)]
        self.ready = tf.Variable(tf.zeros([shards], tf.int64), trainable=False, name="grad_ready")

    @staticmethod
    def _slot_like(strategy, variable, name: str) -> tf.Variable:
        with strategy.extended.colocate_vars_with(variable):
            return tf.Variable(tf.zeros_like(variable), trainable=False, name=name)

    def put(self, shard: int, gradients, step) -> None:
        writes = [slot.assign(gradient) for slot, gradient in zip(self.slots[shard], gradients)]
        with tf.control_dependencies(writes):
            self.ready.scatter_nd_update([[shard]], [step])

    def mean(self, step):
        check = tf.debugging.assert_equal(self.ready, tf.fill([self.shards], step),
                                          message="gradient missing for a shard at this step")
        averaged = []
        with tf.control_dependencies([check]):
            for k, variable in enumerate(self.variables):
                with tf.device(variable.device):
                    averaged.append(tf.add_n([self.slots[i][k] for i in range(self.shards)]) / float(self.shards))
        return averaged


class PsStepper:
    """Schedules one closure per shard, waits for all, applies one averaged update per step.

    Training metrics are the same per-sample metrics Keras compiles for the other runtimes,
    averaged over the epoch's samples.
    """

    def __init__(self, settings: Settings, strategy, coordinator, model, optimizer, shards: int,
                 lost_tasks: Callable[[], list[str]] = list):
        self.strategy, self.coordinator, self.optimizer = strategy, coordinator, optimizer
        self.lost_tasks = lost_tasks  # named in a timeout error: the likely reason for it
        self.shards = shards
        self.asynchronous = settings.cluster.asynchronous
        self.step_timeout = settings.cluster.step_timeout_s
        loss_fn = make_loss(settings.train.loss)
        loss_cfg = settings.train.loss
        metric_fns = train_metric_fns(settings.model.threshold, loss_cfg.smooth_numerator, loss_cfg.smooth_denominator)
        with strategy.scope():
            self.exchange = (None if self.asynchronous
                             else GradientSlots(strategy, model.trainable_variables, shards))

        def make_train_fn(shard: int):
            @tf.function
            def train_shard(images, masks, step):
                def replica(images, masks):
                    with tf.GradientTape() as tape:
                        predictions = model(images, training=True)
                        per_sample = loss_fn(masks, predictions)
                        loss = tf.reduce_mean(per_sample)
                    gradients = tape.gradient(loss, model.trainable_variables)
                    if self.asynchronous:
                        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
                    else:
                        self.exchange.put(shard, gradients, step)
                    return per_sample, tf.stack([metric_fns[name](masks, predictions) for name in TRAIN_METRIC_NAMES])
                return strategy.run(replica, args=(images, masks))
            return train_shard

        evaluate = evaluation_fn(model, settings)

        @tf.function
        def evaluate_shard(images, masks):
            return strategy.run(evaluate, args=(images, masks))

        @tf.function
        def apply_update(step):
            optimizer.apply_gradients(zip(self.exchange.mean(step), model.trainable_variables))

        self.train_fns = [make_train_fn(i) for i in range(shards)]
        self.evaluate_fn = evaluate_shard
        self.apply_update = apply_update
        self.reset()

    def reset(self) -> None:
        self._losses: list[np.ndarray] = []
        self._metrics: list[np.ndarray] = []

    def train_step(self, images, masks) -> float:
        step = tf.constant(int(self.optimizer.iterations.numpy()) + 1, tf.int64)
        results = [self.coordinator.schedule(self.train_fns[i], args=(x, y, step))
                   for i, (x, y) in enumerate(self._shards(images, masks))]
        self._wait(f"step {int(step)}")
        if not self.asynchronous:
            self.apply_update(step)
        fetched = [r.fetch() for r in results]
        self._losses.append(np.concatenate([np.asarray(loss) for loss, _ in fetched]))
        self._metrics.append(np.concatenate([np.asarray(values) for _, values in fetched], axis=1))
        return float(np.concatenate(self._losses).mean())

    def train_logs(self) -> dict[str, float]:
        if not self._losses:
            return {}
        values = np.concatenate(self._metrics, axis=1)
        logs = {"loss": float(np.concatenate(self._losses).mean())}
        logs.update({name: float(values[k].mean()) for k, name in enumerate(TRAIN_METRIC_NAMES)})
        return logs

    def evaluate(self, images, masks) -> tuple[np.ndarray, np.ndarray]:
        results = [self.coordinator.schedule(self.evaluate_fn, args=(x, y))
                   for x, y in self._shards(images, masks)]
        self._wait("validation")
        fetched = [r.fetch() for r in results]
        return (np.concatenate([np.asarray(loss) for loss, _ in fetched]),
                np.concatenate([np.asarray(counts) for _, counts in fetched]))

    def _shards(self, images, masks):
        b = images.shape[0] // self.shards
        return [(images[i * b:(i + 1) * b], masks[i * b:(i + 1) * b]) for i in range(self.shards)]

    def _wait(self, what: str) -> None:
        deadline = time.monotonic() + self.step_timeout
        while not self.coordinator.done():  # raises if a closure failed for good (e.g. a PS is gone)
            if time.monotonic() > deadline:
                lost = self.lost_tasks()
                raise ClusterError(f"{what}: workers returned no result within {self.step_timeout:g} s "
                                   f"(cluster.step_timeout_s)" + (f"; lost {', '.join(lost)}" if lost else ""))
            time.sleep(0.002)


class _ClusterFailures:
    """Turns TensorFlow's errors for a vanished task into a ClusterError naming the task."""

    def __init__(self, lost_tasks: Callable[[], list[str]], run_path):
        self.lost_tasks, self.run_path = lost_tasks, run_path

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, traceback):
        if kind is None or not issubclass(kind, CLUSTER_FAILURES):
            return False
        lost = self.lost_tasks()
        where = f"lost {', '.join(lost)}" if lost else "a cluster task failed"
        raise ClusterError(f"parameter-server training stopped: {where}: {str(exc).splitlines()[0][:200]}. "
                           f"Restart the roles and rerun to resume from the last checkpoint in "
                           f"{self.run_path / 'checkpoints' / 'last'}") from None


__all__ = ["PsRuntime", "PsStepper", "GradientSlots"]
