"""Checkpoints of a run: last-k and best, full-state restore for training, weights for inference."""
from __future__ import annotations

import glob
import logging
import os
from pathlib import Path

import tensorflow as tf

from trainer.errors import TrainingError
from trainer.fsutil import check_regular

log = logging.getLogger(__name__)

# What a run's checkpoint files may be, checked before TensorFlow opens them: TensorFlow reads the
# state file whole and blocks on a FIFO (seen: checkpoints/best/checkpoint and best-1.index as FIFOs
# hung predict and a resumed train; the state file as /dev/zero ended in a traceback).
STATE_FILE_LIMIT = 1 << 20        # "checkpoint": a few lines per kept checkpoint
INDEX_FILE_LIMIT = 256 << 20      # PREFIX.index: one entry per variable
DATA_FILE_LIMIT = 64 << 30        # PREFIX.data-*: the variables themselves


def check_state_file(folder: Path) -> None:
    """The folder's ``checkpoint`` state file, where there is one, is a small regular file."""
    path = Path(folder) / "checkpoint"
    if os.path.lexists(path):
        check_regular(path, f"{path}: checkpoint state file", STATE_FILE_LIMIT)


def check_checkpoint_files(prefix: str) -> None:
    """A checkpoint's index and data shards are regular files of sane sizes."""
    check_regular(Path(prefix + ".index"), f"{prefix}.index", INDEX_FILE_LIMIT)
    for shard in sorted(Path(prefix).parent.glob(glob.escape(Path(prefix).name) + ".data-*")):
        check_regular(shard, str(shard), DATA_FILE_LIMIT)


# Where a checkpoint stands in the run: the loop's own counters, read without restoring.
PROGRESS_KEYS = ("state/epoch/.ATTRIBUTES/VARIABLE_VALUE", "state/step_in_epoch/.ATTRIBUTES/VARIABLE_VALUE")


class CheckpointStore:
    """Last-k epoch checkpoints, last-k step checkpoints (mid-epoch), and the best by validation Dice.

    TensorFlow writes a checkpoint's files first and then, atomically, the small state file
    that lists the complete ones; a process killed while saving leaves at most orphan files
    that no state file names. Resuming takes the most advanced listed checkpoint whose files
    read back, falling back to an older one (with a warning) when the newest is unreadable.
    """

    def __init__(self, run_path: Path, model: tf.keras.Model, optimizer, state: tf.Module, keep: int):
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, state=state)
        root = Path(run_path) / "checkpoints"
        for kind in ("last", "steps", "best"):
            check_state_file(root / kind)  # each manager reads its state file now
        self.last = tf.train.CheckpointManager(self.checkpoint, str(root / "last"), max_to_keep=keep,
                                               checkpoint_name="epoch")
        self.steps = tf.train.CheckpointManager(self.checkpoint, str(root / "steps"), max_to_keep=keep,
                                                checkpoint_name="step")
        self.best = tf.train.CheckpointManager(self.checkpoint, str(root / "best"), max_to_keep=1,
                                               checkpoint_name="best")

    def restore_latest(self) -> str | None:
        candidates = []
        for path in {*self.last.checkpoints, *self.steps.checkpoints}:
            progress = _progress(path)
            if progress is None:
                log.warning("%s: checkpoint files unreadable (interrupted write or damaged disk); skipped", path)
                continue
            candidates.append((progress, path))
        if not candidates:
            return None
        path = max(candidates)[1]
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

    def save_step(self, global_step: int) -> str:
        return self.steps.save(checkpoint_number=global_step)


def _progress(path: str) -> tuple[int, int] | None:
    """(completed epochs, steps into the next epoch) of a checkpoint, or None if it cannot be read."""
    try:
        check_checkpoint_files(path)
    except FileNotFoundError:
        return None
    try:
        reader = tf.train.load_checkpoint(path)
        return tuple(int(reader.get_tensor(key)) if reader.has_tensor(key) else 0 for key in PROGRESS_KEYS)
    except (tf.errors.OpError, ValueError):
        return None


def restore_weights(model: tf.keras.Model, run_path: Path, which: str = "best") -> str:
    """Load model weights (only) from a run's best or last checkpoint, for inference."""
    folder = Path(run_path) / "checkpoints" / which
    check_state_file(folder)
    path = tf.train.latest_checkpoint(str(folder))
    if path is None and which == "best":
        folder = Path(run_path) / "checkpoints" / "last"
        check_state_file(folder)
        path = tf.train.latest_checkpoint(str(folder))
    if path is None:
        raise TrainingError(f"{Path(run_path) / 'checkpoints'}: no checkpoint found (train first)")
    check_checkpoint_files(path)
    try:
        tf.train.Checkpoint(model=model).restore(path).expect_partial().assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as exc:
        raise TrainingError(f"{path}: checkpoint does not match the model in settings: {str(exc)[:300]}") from None
    return path


def weights_checksum(variables) -> float:
    """Order-independent fingerprint of variable values (for logs and resume checks)."""
    return float(sum(tf.reduce_sum(tf.abs(tf.cast(v, tf.float64))).numpy() for v in variables))
