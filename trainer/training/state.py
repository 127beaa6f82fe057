"""The loop's own state, beside the weights and optimizer slots in every checkpoint.

Everything needed to continue a run exactly lives in tf.Variables tracked by one
tf.train.Checkpoint (see :mod:`trainer.runtime.checkpoints`), so "resume" is one restore call: the
optimizer's iteration counter (global step) and slots, the epoch, the plateau LR factor
and the early-stopping counters.
"""
from __future__ import annotations

import tensorflow as tf


class TrainingState(tf.Module):
    def __init__(self):
        super().__init__(name="training_state")
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")  # completed epochs
        # steps of the next epoch already applied (a mid-epoch checkpoint resumes right after them)
        self.step_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="step_in_epoch")
        self.best_dice = tf.Variable(-1.0, dtype=tf.float64, trainable=False, name="best_dice")
        self.best_epoch = tf.Variable(-1, dtype=tf.int64, trainable=False, name="best_epoch")
        self.lr_factor = tf.Variable(1.0, dtype=tf.float64, trainable=False, name="lr_factor")
        self.plateau_wait = tf.Variable(0, dtype=tf.int64, trainable=False, name="plateau_wait")
        self.early_wait = tf.Variable(0, dtype=tf.int64, trainable=False, name="early_wait")

    def all_variables(self) -> list[tf.Variable]:
        return [self.epoch, self.step_in_epoch, self.best_dice, self.best_epoch, self.lr_factor, self.plateau_wait,
                self.early_wait]
