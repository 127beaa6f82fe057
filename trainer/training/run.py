"""``train(settings, runtime)``: the one training path every execution mode reuses.

The runtime decides who the process is (rank/size), how gradients are combined
(optimizer wrapper) and how initial state is shared; this module does everything else
identically, so single, Horovod and PS runs produce the same numbers.
"""
from __future__ import annotations

import logging
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf

from trainer.config import Settings, settings_to_yaml
from trainer.fsutil import write_json, write_text
from trainer.losses import make_loss
from trainer.metrics import keras_metrics
from trainer.models import build_model
from trainer.runtime.base import SingleRuntime
from trainer.runtime.precision import apply_precision
from trainer.training.callbacks import (EpochCheckpoint, JsonHistory, LearningRateController,
                                        TensorBoardExtras, Throughput)
from trainer.training.datasets import build_datasets
from trainer.training.state import CheckpointStore, TrainingState, weights_checksum

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    run_path: Path
    epochs_run: int
    final_epoch: int
    step: int
    best_val_dice: float
    resumed_from: str | None
    weights_checksum: float


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


def open_session(settings: Settings, runtime) -> Session:
    """Build model + optimizer + state, restore the latest checkpoint (chief), share it with all."""
    train_cfg = settings.train
    tf.keras.utils.set_random_seed(train_cfg.seed)  # same initial weights on every worker
    policy = apply_precision(train_cfg.precision, settings.cpu.onednn).policy
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
                 int(optimizer.iterations.numpy()), weights_checksum(model.variables))
    return session


def already_finished(settings: Settings, session: Session) -> bool:
    if session.initial_epoch < settings.train.epochs:
        return False
    log.info("run %s already finished %d/%d epochs; nothing to do", settings.run_path, session.initial_epoch,
             settings.train.epochs)
    return True


def announce(settings: Settings, runtime, session: Session, data) -> None:
    """Chief: write the merged settings into the run and log the run's shape."""
    run_path, train_cfg = settings.run_path, settings.train
    run_path.mkdir(parents=True, exist_ok=True)
    write_text(run_path / "settings.yaml", settings_to_yaml(settings))
    log.info("%s run %s: model %s (%d params, %s), %d worker(s) x batch %d = global batch %d, "
             "%d steps/epoch, %d val steps, train samples/shard %d, LR %.3g x %d", runtime.name, run_path,
             train_cfg.model, session.model.count_params(), session.policy, runtime.size, train_cfg.batch_size,
             train_cfg.batch_size * runtime.size, data.steps_per_epoch, data.validation_steps,
             data.train_samples, train_cfg.learning_rate, lr_scale(settings, runtime))


def lr_scale(settings: Settings, runtime) -> int:
    """Synchronous modes average N workers' gradients into one step at global batch N x b, so
    the LR scales by N. Asynchronous PS applies each worker's batch-b gradient as its own
    step: no scaling there."""
    asynchronous_ps = runtime.name == "ps" and settings.cluster.asynchronous
    return runtime.size if settings.train.scale_lr and not asynchronous_ps else 1


def run_callbacks(settings: Settings, runtime, session: Session, data, fit_tensorboard: bool = True) -> list:
    """Every run's callbacks, in order: runtime first (metric averaging), chief-only writers last."""
    train_cfg = settings.train
    callbacks = runtime.callbacks() + [
        Throughput(train_cfg.batch_size * runtime.size, data.steps_per_epoch),
        LearningRateController(train_cfg.learning_rate, lr_scale(settings, runtime), train_cfg.warmup_epochs,
                               data.steps_per_epoch, train_cfg.epochs, train_cfg.schedule, session.state),
        EpochCheckpoint(session.store if runtime.is_chief else None, session.state,
                        train_cfg.early_stopping_patience),
    ]
    if runtime.is_chief:
        callbacks += _chief_callbacks(settings, settings.run_path, data, runtime, fit_tensorboard)
    return callbacks


def finish(settings: Settings, runtime, session: Session, epochs_run: int) -> TrainResult:
    result = _result(settings.run_path, epochs_run, session.model, session.optimizer, session.state,
                     session.resumed)
    if runtime.is_chief:
        write_json(settings.run_path / "summary.json", {
            **result.__dict__, "run_path": str(settings.run_path), "dist": runtime.name, "workers": runtime.size,
            "global_batch": settings.train.batch_size * runtime.size, "precision": session.policy,
            "host": platform.node()})
        log.info("finished: epoch %d, step %d, best val Dice %.4f; TensorBoard logs in %s",
                 result.final_epoch, result.step, result.best_val_dice, settings.run_path / "tensorboard")
    return result


def train(settings: Settings, runtime: SingleRuntime | None = None) -> TrainResult:
    """Keras ``fit`` training for the single-process and Horovod runtimes."""
    runtime = runtime or SingleRuntime()
    session = open_session(settings, runtime)
    if already_finished(settings, session):
        return _result(settings.run_path, 0, session.model, session.optimizer, session.state, session.resumed)
    data = build_datasets(settings, runtime.shard, seed_offset=session.initial_epoch)
    runtime.agree("steps per epoch / validation steps", (data.steps_per_epoch, data.validation_steps))
    if runtime.is_chief:
        announce(settings, runtime, session, data)
    history = session.model.fit(data.train, epochs=settings.train.epochs, initial_epoch=session.initial_epoch,
                                steps_per_epoch=data.steps_per_epoch, validation_data=data.val,
                                validation_steps=data.validation_steps,
                                callbacks=run_callbacks(settings, runtime, session, data),
                                verbose=_verbosity(runtime))
    return finish(settings, runtime, session, len(history.epoch))


def _chief_callbacks(settings: Settings, run_path: Path, data, runtime, fit_tensorboard: bool) -> list:
    tensorboard_dir = run_path / "tensorboard"
    sample = None
    if settings.train.image_every_epochs:
        images, masks = next(iter(data.val.take(1)))
        sample = (images.numpy()[:4], masks.numpy()[:4])
    callbacks = [
        tf.keras.callbacks.CSVLogger(str(run_path / "history.csv"), append=True),
        JsonHistory(run_path / "history.json", {"dist": runtime.name, "workers": runtime.size}),
        TensorBoardExtras(tensorboard_dir, sample, settings.train.image_every_epochs, settings.model.threshold,
                          all_scalars=not fit_tensorboard),
    ]
    if fit_tensorboard:  # Keras' own writer needs model.fit; custom loops log every scalar themselves
        callbacks.insert(2, tf.keras.callbacks.TensorBoard(log_dir=str(tensorboard_dir), update_freq="epoch",
                                                           write_graph=False, profile_batch=0))
    return callbacks


def _verbosity(runtime) -> int:
    if not runtime.is_chief:
        return 0
    return 1 if sys.stdout.isatty() else 2


def _result(run_path, epochs_run, model, optimizer, state, resumed) -> TrainResult:
    return TrainResult(run_path=run_path, epochs_run=epochs_run, final_epoch=int(state.epoch.numpy()),
                       step=int(optimizer.iterations.numpy()), best_val_dice=float(state.best_dice.numpy()),
                       resumed_from=resumed, weights_checksum=weights_checksum(model.variables))


__all__ = ["train", "TrainResult", "Session", "open_session", "run_callbacks", "finish", "make_optimizer"]
