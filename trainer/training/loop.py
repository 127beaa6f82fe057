"""``train(settings, runtime)``: the one training loop of every execution mode.

The loop owns what a run *is*: epochs and steps, case-level validation, callbacks (LR
schedule, checkpoints, early stopping, history, TensorBoard), the progress display and
the run's summary. The runtime (:mod:`trainer.runtime.contract`) owns who this process is
and how a step is computed: Keras' own train step alone or under Horovod's allreduce,
closures scheduled on parameter-server workers. Single, Horovod and PS runs therefore
share every number the loop computes.
"""
from __future__ import annotations

import json
import logging
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from trainer.runtime.checkpoints import weights_checksum
from trainer.config import Settings, settings_to_yaml
from trainer.data.streams import Streams, build_streams
from trainer.errors import TrainingError, UserError
from trainer.fsutil import read_regular_text, write_json, write_text
from trainer.runtime.contract import Runtime, Stepper
from trainer.runtime import preemption
from trainer.training.callbacks import (EpochCheckpoint, EpochLine, JsonHistory, LearningRateController,
                                        StepCheckpoint, TensorBoard, Throughput)
from trainer.training.session import Session, open_session
from trainer.training.validation import CaseValidator

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


def train(settings: Settings, runtime: Runtime, progress: bool = True) -> TrainResult:
    """Train (or resume) the run in ``settings.run_path`` with ``runtime``; the chief writes.
    ``progress``: a per-step progress bar on the chief (one line per epoch is printed anyway)."""
    with runtime.guard():
        session = open_session(settings, runtime)
        if _finished(settings, session):
            return _result(settings, session, 0)
        stepper = runtime.make_stepper(session.model, session.optimizer, settings)
        variables = session.model.variables + list(session.optimizer.variables) + session.state.all_variables()
        with preemption.watching():  # SIGUSR1 (SIGTERM under Slurm): checkpoint at a step boundary, exit 75
            epochs_run = runtime.run(lambda: _run_epochs(settings, runtime, session, stepper, progress),
                                     variables, lambda: session.step)
        return _finish(settings, runtime, session, epochs_run)


def lr_scale(settings: Settings, runtime: Runtime) -> int:
    """Synchronous modes average N workers' gradients into one step at global batch N x b, so
    the LR scales by N. Asynchronous PS applies each worker's batch-b gradient as its own
    step: no scaling there."""
    return runtime.size if settings.train.scale_lr and runtime.synchronous else 1


def _finished(settings: Settings, session: Session) -> bool:
    max_steps = settings.train.max_steps
    if session.initial_epoch >= settings.train.epochs or (max_steps and session.step >= max_steps):
        log.info("run %s already finished (epoch %d/%d, step %d%s); nothing to do", settings.run_path,
                 session.initial_epoch, settings.train.epochs, session.step,
                 f"/{max_steps}" if max_steps else "")
        return True
    return False


def _run_epochs(settings: Settings, runtime: Runtime, session: Session, stepper: Stepper, progress: bool) -> int:
    """From the state's (epoch, step in epoch) to the end. Re-entered after an elastic membership
    change: the streams, LR scaling and callbacks are rebuilt for the new set of workers."""
    streams = build_streams(settings, runtime.data_shard, settings.train.batch_size * runtime.size)
    runtime.agree("steps per epoch / validation batches", (streams.steps_per_epoch, streams.validation_steps))
    if runtime.is_chief:
        _announce(settings, runtime, session, streams)
    callbacks = tf.keras.callbacks.CallbackList(_callbacks(settings, runtime, session, streams), model=session.model)
    callbacks.set_params({"epochs": settings.train.epochs, "steps": streams.steps_per_epoch, "verbose": 0})
    validator = CaseValidator(streams, stepper, runtime)
    weights_finite = _finite_check(session.model)
    data_source = settings.data.dataset
    show = progress and runtime.is_chief
    max_steps, state = settings.train.max_steps, session.state
    first_epoch, first_step = session.initial_epoch, int(state.step_in_epoch.numpy())
    if first_step:
        log.info("resuming epoch %d at step %d/%d", first_epoch + 1, first_step, streams.steps_per_epoch)
    epochs_run = 0
    callbacks.on_train_begin()
    for epoch in range(first_epoch, settings.train.epochs):
        start = first_step if epoch == first_epoch else 0
        logs: dict = {}
        callbacks.on_epoch_begin(epoch, logs)
        stepper.reset()
        bar = tf.keras.utils.Progbar(streams.steps_per_epoch, verbose=1 if sys.stdout.isatty() else 2,
                                     unit_name="step") if show else None
        waited = computed = 0.0
        # Released at the epoch's end (del below), so its input threads are gone before the
        # next epoch's iterator starts its own.
        batches = iter(streams.train(epoch, start))
        for step in range(start, streams.steps_per_epoch):
            started = time.perf_counter()
            images, masks = next(batches)
            fetched = time.perf_counter()
            callbacks.on_train_batch_begin(step)
            loss = stepper.train_step(images, masks)
            _refuse_diverged(runtime, loss, weights_finite, epoch, step, session, data_source)
            state.step_in_epoch.assign(step + 1)
            callbacks.on_train_batch_end(step, {"loss": loss})
            waited, computed = waited + fetched - started, computed + time.perf_counter() - fetched
            if bar is not None:
                bar.update(step + 1, [("loss", loss)])
            if max_steps and session.step >= max_steps:
                if runtime.is_chief:
                    log.info("train.max_steps=%d reached in epoch %d: checkpoint %s", max_steps, epoch + 1,
                             session.store.save_step(session.step))
                callbacks.on_train_end()
                return epochs_run
            if preemption.agreed(runtime):  # every worker stops at this same step (raises Preempted)
                preemption.stop_here(settings, runtime, session, epoch, step + 1, streams.steps_per_epoch)
        del batches
        logs.update(stepper.train_logs())
        logs["input_wait_share"] = waited / max(waited + computed, 1e-9)
        logs.update(validator.run())
        callbacks.on_epoch_end(epoch, logs)
        epochs_run += 1
        if session.model.stop_training:
            break
    callbacks.on_train_end()
    return epochs_run


def _finite_check(model: tf.keras.Model):
    """A function: are all trainable weights finite? Each variable is checked where it lives (on
    a parameter server too), so only one boolean per variable travels."""
    @tf.function
    def weights_finite():
        flags = []
        for variable in model.trainable_variables:
            with tf.device(variable.device):
                flags.append(tf.reduce_all(tf.math.is_finite(variable)))
        return tf.reduce_all(tf.stack(flags))
    return weights_finite


def _refuse_diverged(runtime: Runtime, loss: float, weights_finite, epoch: int, step: int, session: Session,
                     data_source: Path) -> None:
    """Stop at the first non-finite loss or weight, before the step is counted, logged or
    checkpointed: NaN weights would become the run's last checkpoint (and its summary.json
    unwritable), and every later step is lost anyway. The loss alone is not enough: a NaN input
    gives NaN gradients while ReLU can hide it from the loss. Every worker takes the decision
    together (a one-number sum per step), so a NaN that shows first on one Horovod rank stops all
    of them here, with this message, not in a later collective's timeout."""
    finite_loss, finite_weights = math.isfinite(loss), bool(weights_finite())
    workers = int(runtime.sum_over_workers(np.array([0.0 if finite_loss and finite_weights else 1.0]))[0])
    if workers:
        if not finite_loss:
            what = f"the training loss is {loss}"
        elif not finite_weights:
            what = f"the weights are not finite (loss {loss:.4g})"
        else:
            what = f"the loss or weights are not finite on {workers} of {runtime.size} workers"
        raise TrainingError(
            f"epoch {epoch + 1}, step {step + 1}: {what}: the run diverged at precision {session.policy}; "
            f"nothing from this step on was checkpointed. Check the data ({data_source}) for NaN/inf values, or retry in a new "
            "--run-name with a lower train.learning_rate (or --set train.precision=fp32 if bf16/fp16 was in use)")


def _callbacks(settings: Settings, runtime: Runtime, session: Session, streams: Streams) -> list:
    """Every run's callbacks, in order: runtime first (metric averaging), chief-only writers last."""
    train_cfg, run_path = settings.train, settings.run_path
    callbacks = runtime.callbacks() + [
        Throughput(streams.global_batch),
        LearningRateController(train_cfg.learning_rate, lr_scale(settings, runtime), train_cfg.warmup_epochs,
                               streams.steps_per_epoch, train_cfg.epochs, train_cfg.schedule, session.state),
        EpochCheckpoint(session.store if runtime.is_chief else None, session.state,
                        train_cfg.early_stopping_patience),
    ]
    if runtime.is_chief:
        panels = streams.panel_samples() if train_cfg.image_every_epochs else None
        if train_cfg.checkpoint_every_steps or train_cfg.checkpoint_every_minutes:
            callbacks.append(StepCheckpoint(session.store, session.state, session.optimizer,
                                            train_cfg.checkpoint_every_steps, train_cfg.checkpoint_every_minutes))
        callbacks += [
            JsonHistory(run_path / "history.json", {"dist": runtime.name, "workers": runtime.size},
                        csv_path=run_path / "history.csv"),
            TensorBoard(run_path / "tensorboard", panels, train_cfg.image_every_epochs, settings.model.threshold,
                        streams.regions.names),
            EpochLine(train_cfg.epochs),
        ]
    return callbacks


def _run_record(settings: Settings, path: Path) -> dict:
    """What the run came from: its prepared dataset folder and the plan it was trained with (a
    resumed run without --plan keeps the plan it started from)."""
    plan = settings.train.plan
    if plan is None and path.is_file():
        try:
            plan = json.loads(read_regular_text(path, limit=1 << 20)).get("plan")
        except (OSError, ValueError, AttributeError, UserError):
            plan = None
    return {"dataset": None if settings.data.dataset is None else str(settings.data.dataset),
            "source": None if settings.data.source is None else str(settings.data.source),
            "plan": None if plan is None else str(plan), "model": settings.train.model,
            "regions": list(settings.model.regions)}


def _announce(settings: Settings, runtime: Runtime, session: Session, streams: Streams) -> None:
    """Chief: write the merged settings into the run and log the run's shape."""
    run_path, train_cfg = settings.run_path, settings.train
    run_path.mkdir(parents=True, exist_ok=True)
    write_text(run_path / "settings.yaml", settings_to_yaml(settings))
    record = _run_record(settings, run_path / "run.json")
    write_json(run_path / "run.json", record)
    log.info("dataset: %s (raw volumes: %s); plan: %s", record["dataset"],
             record["source"] or "as the dataset recorded", record["plan"] or "none")
    log.info("%s run %s: model %s (%d params, %s, regions %s), %d worker(s) x batch %d = global batch %d, "
             "%d steps/epoch, %d validation batches over %d case(s), train samples %d, LR %.3g x %d", runtime.name,
             run_path, train_cfg.model, session.model.count_params(), session.policy,
             "/".join(streams.regions.names), runtime.size, train_cfg.batch_size, streams.global_batch,
             streams.steps_per_epoch, streams.validation_steps, len(streams.validation.case_ids),
             streams.train_samples, train_cfg.learning_rate, lr_scale(settings, runtime))


def _finish(settings: Settings, runtime: Runtime, session: Session, epochs_run: int) -> TrainResult:
    result = _result(settings, session, epochs_run)
    if runtime.is_chief:
        write_json(settings.run_path / "summary.json", {
            **result.__dict__, "run_path": str(settings.run_path), "dist": runtime.name, "workers": runtime.size,
            "global_batch": settings.train.batch_size * runtime.size, "precision": session.policy,
            "best_epoch": int(session.state.best_epoch.numpy()), "regions": list(settings.model.regions),
            "host": platform.node()})
        log.info("finished: epoch %d, step %d, best val Dice %.4f (case-level, epoch %d); TensorBoard logs in %s",
                 result.final_epoch, result.step, result.best_val_dice, int(session.state.best_epoch.numpy()),
                 settings.run_path / "tensorboard")
    return result


def _result(settings: Settings, session: Session, epochs_run: int) -> TrainResult:
    return TrainResult(run_path=settings.run_path, epochs_run=epochs_run, final_epoch=session.initial_epoch,
                       step=session.step, best_val_dice=float(session.state.best_dice.numpy()),
                       resumed_from=session.resumed, weights_checksum=weights_checksum(session.model.variables))


__all__ = ["train", "TrainResult", "lr_scale"]
