"""Checkpoints of a run: last-k and best, full-state restore for training, weights for inference."""
from __future__ import annotations

import logging
from pathlib import Path

import tensorflow as tf

from trainer.errors import TrainingError

log = logging.getLogger(__name__)


class CheckpointStore:
    """Last-k checkpoints (one per epoch) plus the best by validation Dice."""

    def __init__(self, run_path: Path, model: tf.keras.Model, optimizer, state: tf.Module, keep: int):
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
