"""A run's model, optimizer and state: built in the runtime's scope, restored, shared."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import tensorflow as tf

from trainer.runtime.checkpoints import CheckpointStore, weights_checksum
from trainer.config import Settings
from trainer.models.losses import make_loss
from trainer.models.metrics import keras_metrics
from trainer.models import build_model
from trainer.runtime.contract import Runtime
from trainer.hardware.precision import apply_precision
from trainer.training.state import TrainingState

log = logging.getLogger(__name__)


def make_optimizer(settings: Settings):
    train = settings.train
    if train.optimizer == "sgd":
        return tf.keras.optimizers.SGD(learning_rate=train.learning_rate, momentum=train.momentum)
    return tf.keras.optimizers.Adam(learning_rate=train.learning_rate)


@dataclass
class Session:
    """What a run trains and checkpoints, restored and synchronised across workers."""

    model: tf.keras.Model
    optimizer: object
    state: TrainingState
    store: CheckpointStore
    resumed: str | None
    policy: str

    @property
    def initial_epoch(self) -> int:
        return int(self.state.epoch.numpy())

    @property
    def step(self) -> int:
        return int(self.optimizer.iterations.numpy())


def open_session(settings: Settings, runtime: Runtime) -> Session:
    """Build model + optimizer + state, restore the latest checkpoint (chief), share it with all."""
    train_cfg = settings.train
    tf.keras.utils.set_random_seed(train_cfg.seed)  # same initial weights on every worker
    policy = apply_precision(train_cfg.precision, settings.cpu.onednn).policy
    with runtime.variable_scope():
        model = build_model(train_cfg.model, settings.model, len(settings.data.channels),
                            settings.data.image_size, settings.data.crop_size)
        optimizer = runtime.wrap_optimizer(make_optimizer(settings))
        model.compile(optimizer=optimizer, loss=make_loss(train_cfg.loss),
                      metrics=keras_metrics(settings.model.threshold, train_cfg.loss.smooth_numerator,
                                            train_cfg.loss.smooth_denominator))
        optimizer.build(model.trainable_variables)  # slots exist before restore and broadcast
        state = TrainingState()
        store = CheckpointStore(settings.run_path, model, optimizer, state, train_cfg.keep_checkpoints)
        resumed = store.restore_latest() if runtime.is_chief else None
    runtime.sync_initial_state(model.variables + list(optimizer.variables) + state.all_variables())
    session = Session(model, optimizer, state, store, resumed, policy)
    if resumed:
        log.info("resuming from %s: epoch %d, step %d, weights checksum %.6f", resumed, session.initial_epoch,
                 session.step, weights_checksum(model.variables))
    return session
