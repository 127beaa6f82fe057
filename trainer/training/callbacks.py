"""Keras callbacks: each cross-cutting concern of a run is one pluggable handler."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from trainer.config.settings import ScheduleSettings
from trainer.fsutil import read_regular_json, write_csv, write_json
from trainer.runtime.checkpoints import CheckpointStore
from trainer.data.panels import enlarge, panel, volume_panel
from trainer.training.state import TrainingState

log = logging.getLogger(__name__)
MONITOR = "val_dice"


class Throughput(tf.keras.callbacks.Callback):
    """images/s over the epoch's training steps (all workers), wall clock from the epoch's start,
    added to the epoch logs; ``startup_seconds`` (epoch start to the first batch in hand) shows
    how much of it went to starting the input stream rather than to steps."""

    def __init__(self, global_batch: int, clock=time.perf_counter):
        super().__init__()
        self.global_batch, self.clock = global_batch, clock
        self._start = self._train_end = 0.0
        self._first_batch: float | None = None
        self._steps = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = self._train_end = self.clock()
        self._first_batch = None
        self._steps = 0

    def on_train_batch_begin(self, batch, logs=None):
        if self._first_batch is None:
            self._first_batch = self.clock()

    def on_train_batch_end(self, batch, logs=None):
        self._train_end = self.clock()
        self._steps += 1  # a resumed epoch runs only its remaining steps

    def on_epoch_end(self, epoch, logs=None):
        logs["images_per_sec"] = self.global_batch * self._steps / max(self._train_end - self._start, 1e-9)
        logs["startup_seconds"] = (self._start if self._first_batch is None else self._first_batch) - self._start
        logs["epoch_seconds"] = self.clock() - self._start


class StepCheckpoint(tf.keras.callbacks.Callback):
    """Mid-epoch checkpoints every N steps and/or M minutes (chief only), so a crash in a long
    epoch loses at most one interval. The checkpoint records the step reached within the epoch;
    the data streams are a function of (epoch, step), so a resumed run reads the same batches next.
    """

    def __init__(self, store: CheckpointStore, state: TrainingState, optimizer, every_steps: int,
                 every_minutes: float, clock=time.monotonic):
        super().__init__()
        self.store, self.state, self.optimizer = store, state, optimizer
        self.every_steps, self.every_seconds, self.clock = every_steps, every_minutes * 60.0, clock
        self._last = clock()

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.optimizer.iterations.numpy())
        due = (self.every_steps and step % self.every_steps == 0) or (
            self.every_seconds and self.clock() - self._last >= self.every_seconds)
        if due:
            self.state.step_in_epoch.assign(batch + 1)
            self.store.save_step(step)
            self._last = self.clock()


class LearningRateController(tf.keras.callbacks.Callback):
    """One owner of the LR: schedule x plateau factor x worker scaling, with linear warm-up.

    ``cosine`` and ``poly`` (nnU-Net's (1 - t)^0.9) decay smoothly, step by step, over the
    whole run, so the last epochs take small steps and the final weights settle instead of
    swinging. Warm-up follows Goyal et al. (and Horovod's recipe): the LR ramps from the
    single-worker value to the scaled value over ``warmup_epochs``.
    """

    def __init__(self, base_lr: float, scale: float, warmup_epochs: float, steps_per_epoch: int,
                 epochs: int, schedule: ScheduleSettings, state: TrainingState):
        super().__init__()
        self.base_lr, self.scale, self.warmup = base_lr, scale, warmup_epochs
        self.steps, self.epochs, self.schedule, self.state = steps_per_epoch, epochs, schedule, state
        self._epoch = 0

    def lr_at(self, epoch: int, batch: int = 0) -> float:
        sched = self.schedule
        progress = min((epoch + batch / self.steps) / self.epochs, 1.0)
        if sched.name == "step":
            factor = sched.gamma ** (epoch // sched.step_epochs)
        elif sched.name == "cosine":
            factor = 0.5 * (1 + math.cos(math.pi * progress))
        elif sched.name == "poly":
            factor = (1.0 - progress) ** 0.9
        else:
            factor = 1.0
        lr = self.base_lr * factor * float(self.state.lr_factor.numpy())
        target = max(lr * self.scale, sched.min_lr if sched.name != "constant" else 0.0)
        progress = (epoch + batch / self.steps) / self.warmup if self.warmup > 0 else 1.0
        if progress < 1.0 and self.scale > 1:
            return target * (1.0 / self.scale + (1.0 - 1.0 / self.scale) * progress)
        return target

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._set(self.lr_at(epoch))

    def on_train_batch_begin(self, batch, logs=None):
        if self.schedule.name in ("cosine", "poly") or (self.warmup > 0 and self._epoch < self.warmup):
            self._set(self.lr_at(self._epoch, batch))

    def on_epoch_end(self, epoch, logs=None):
        logs["lr"] = float(tf.keras.backend.get_value(self.model.optimizer.learning_rate))
        if self.schedule.name != "plateau" or MONITOR not in logs:
            return
        if logs[MONITOR] > float(self.state.best_dice.numpy()):
            self.state.plateau_wait.assign(0)
        else:
            self.state.plateau_wait.assign_add(1)
            if int(self.state.plateau_wait.numpy()) >= self.schedule.plateau_patience:
                self.state.lr_factor.assign(self.state.lr_factor * self.schedule.gamma)
                self.state.plateau_wait.assign(0)
                log.info("validation Dice plateaued: LR factor now %.4g", float(self.state.lr_factor.numpy()))

    def _set(self, value: float) -> None:
        self.model.optimizer.learning_rate.assign(value)


class EpochCheckpoint(tf.keras.callbacks.Callback):
    """Advance the epoch counter, track the best val Dice, early-stop, save (chief only).

    Runs on every worker so that all of them take the same early-stop decision from the
    (already averaged) validation metrics; only the chief writes files.
    """

    def __init__(self, store: CheckpointStore | None, state: TrainingState, patience: int):
        super().__init__()
        self.store, self.state, self.patience = store, state, patience

    def on_epoch_end(self, epoch, logs=None):
        self.state.epoch.assign(epoch + 1)
        self.state.step_in_epoch.assign(0)
        score = logs.get(MONITOR)
        is_best = score is not None and score > float(self.state.best_dice.numpy())
        if is_best:
            self.state.best_dice.assign(score)
            self.state.best_epoch.assign(epoch + 1)
            self.state.early_wait.assign(0)
        else:
            self.state.early_wait.assign_add(1)
        logs["best_val_dice"] = float(self.state.best_dice.numpy())
        if self.store is not None:
            self.store.save(epoch + 1, is_best)
        if self.patience and int(self.state.early_wait.numpy()) >= self.patience:
            log.info("early stopping: no val Dice gain for %d epoch(s)", self.patience)
            self.model.stop_training = True


HISTORY_LIMIT = 64 << 20  # history.json: one entry of a few figures per epoch


class JsonHistory(tf.keras.callbacks.Callback):
    """history.json (and history.csv from the same entries): one entry per epoch, appended across
    resumes, written atomically. The CSV is rewritten whole with the union of the columns, so a run
    resumed by a version that logs a new figure gets an empty cell in its older rows rather than
    values under the wrong header (what appending under the first header did)."""

    def __init__(self, path: Path, extra: dict | None = None, csv_path: Path | None = None):
        super().__init__()
        self.path, self.extra, self.csv_path = Path(path), extra or {}, csv_path
        try:  # a FIFO or /dev/zero is refused (UserError), never read: it would hang or fill memory
            self.entries = read_regular_json(self.path, str(self.path), HISTORY_LIMIT)["epochs"]
        except (OSError, ValueError, KeyError, TypeError):
            self.entries = []

    def on_epoch_end(self, epoch, logs=None):
        entry = {"epoch": epoch + 1, "step": int(self.model.optimizer.iterations.numpy())}
        entry.update({k: _jsonable(v) for k, v in (logs or {}).items()})
        self.entries = [e for e in self.entries if e["epoch"] < epoch + 1] + [entry]
        write_json(self.path, {**self.extra, "epochs": self.entries})
        if self.csv_path is not None:  # every column any epoch logged: epoch and step first, then sorted
            first = ["epoch", "step"]
            columns = first + sorted({key for entry in self.entries for key in entry} - set(first))
            write_csv(self.csv_path, columns, self.entries)


class TensorBoard(tf.keras.callbacks.Callback):
    """Every epoch scalar (``train/`` and ``validation/`` folders, Keras' tag names) and the
    MRI/truth/prediction panels every N epochs. One writer owns each tag: one point per epoch.

    The panel samples come from distinct validation cases, each at its largest tumour (2D),
    or a crop centred on the tumour (3D, planes through its centre), so a user watching
    training sees the tumour and what the model makes of it.
    """

    def __init__(self, log_dir: Path, sample: tuple[np.ndarray, np.ndarray] | None, every: int,
                 threshold: float, regions: tuple[str, ...]):
        super().__init__()
        self.writer = tf.summary.create_file_writer(str(Path(log_dir) / "train"))
        self.val_writer = tf.summary.create_file_writer(str(Path(log_dir) / "validation"))
        self.sample, self.every, self.threshold, self.regions = sample, every, threshold, regions

    def on_epoch_end(self, epoch, logs=None):
        with self.val_writer.as_default(step=epoch):
            for key, value in logs.items():
                if key.startswith("val_"):
                    tf.summary.scalar(f"epoch_{key[4:]}", value)
        self.val_writer.flush()
        with self.writer.as_default(step=epoch):
            for key, value in logs.items():
                if not key.startswith("val_"):
                    tf.summary.scalar(f"epoch_{key}", value)
            if self.sample is not None and self.every and (epoch + 1) % self.every == 0:
                tf.summary.image("validation_overlay", self.panels(), max_outputs=len(self.sample[0]))
        self.writer.flush()

    def panels(self) -> np.ndarray:
        images, masks = self.sample
        predictions = (self.model.predict(images, verbose=0) > self.threshold).astype(np.float32)
        make = panel if images.ndim == 4 else volume_panel
        edge = images.shape[1]
        panels = [enlarge(make(images[i, ..., 0], masks[i], predictions[i], self.regions), edge)
                  for i in range(len(images))]
        return np.stack(panels).astype(np.uint8)


class EpochLine(tf.keras.callbacks.Callback):
    """One line per epoch on stdout with every figure the other callbacks added (chief only)."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        print(f"epoch {epoch + 1}/{self.epochs}: " + " - ".join(
            f"{k}: {float(v):.4g}" for k, v in (logs or {}).items() if _is_number(v)), flush=True)


def _is_number(value) -> bool:
    """Python/numpy numbers and scalar tensors: Horovod's metric averaging leaves numpy scalars."""
    if isinstance(value, tf.Tensor):
        return value.shape.rank == 0 and (value.dtype.is_floating or value.dtype.is_integer)
    return isinstance(value, (int, float, np.number)) or (isinstance(value, np.ndarray) and value.ndim == 0)


def _jsonable(value):
    value = float(value) if isinstance(value, (np.floating, np.integer, float, int)) else value
    return None if isinstance(value, float) and not math.isfinite(value) else value
