"""Full training state and its checkpoints: weights, optimizer slots, epoch, LR/early-stop state.

Everything needed to continue a run exactly lives in tf.Variables tracked by one
tf.train.Checkpoint, so "resume" is one restore call: the optimizer's iteration counter
(global step) and slots, the epoch, the plateau LR factor and the early-stopping counters.
"""
from __future__ import annotations

import logging
from pathlib import Path

import tensorflow as tf

from trainer.errors import TrainingError

log = logging.getLogger(__name__)


class TrainingState(tf.Module):
    def __init__(self):
        super().__init__(name="training_state")
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.best_dice = tf.Variable(-1.0, dtype=tf.float64, trainable=False, name="best_dice")
        self.best_epoch = tf.Variable(-1, dtype=tf.int64, trainable=False, name="best_epoch")
        self.lr_factor = tf.Variable(1.0, dtype=tf.float64, trainable=False, name="lr_factor")
        self.plateau_wait = tf.Variable(0, dtype=tf.int64, trainable=False, name="plateau_wait")
        self.early_wait = tf.Variable(0, dtype=tf.int64, trainable=False, name="early_wait")

    def all_variables(self) -> list[tf.Variable]:
        return [self.epoch, self.best_dice, self.best_epoch, self.lr_factor, self.plateau_wait, self.early_wait]


class CheckpointStore:
    """Last-k checkpoints (one per epoch) plus the best by validation Dice."""

    def __init__(self, run_path: Path, model: tf.keras.Model, optimizer, state: TrainingState, keep: int):
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, state=state)
        root = Path(run_path) / "checkpoints"
        self.last = tf.train.CheckpointManager(self.checkpoint, str(root / "last"), max_to_keep=keep,
                                               checkpoint_name="epoch")
        self.best = tf.train.CheckpointManager(self.checkpoint, str(root / "best"), max_to_keep=1,
                                               checkpoint_name="best")

    def restore_latest(self) -> str | None:
        path = self.last.latest_checkpoint
        if path is None:
            return None
        try:
            self.checkpoint.restore(path).assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as exc:
            raise TrainingError(f"{path}: checkpoint does not match this model/optimizer "
                                f"(different settings? use a new train.run_name): {str(exc)[:300]}") from None
        return path

    def save(self, epoch: int, is_best: bool) -> None:
        self.last.save(checkpoint_number=epoch)
        if is_best:
            self.best.save(checkpoint_number=epoch)


def restore_weights(model: tf.keras.Model, run_path: Path, which: str = "best") -> str:
    """Load model weights (only) from a run's best or last checkpoint, for inference."""
    folder = Path(run_path) / "checkpoints" / which
    path = tf.train.latest_checkpoint(str(folder))
    if path is None and which == "best":
        folder = Path(run_path) / "checkpoints" / "last"
        path = tf.train.latest_checkpoint(str(folder))
    if path is None:
        raise TrainingError(f"{Path(run_path) / 'checkpoints'}: no checkpoint found (train first)")
    try:
        tf.train.Checkpoint(model=model).restore(path).expect_partial().assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as exc:
        raise TrainingError(f"{path}: checkpoint does not match the model in settings: {str(exc)[:300]}") from None
    return path


def weights_checksum(variables) -> float:
    """Order-independent fingerprint of variable values (for logs and resume checks)."""
    return float(sum(tf.reduce_sum(tf.abs(tf.cast(v, tf.float64))).numpy() for v in variables))
