"""Step functions shared by the runtimes: Keras' own train step, and validation outputs."""
from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf

from trainer.config.settings import Settings
from trainer.models.losses import make_loss
from trainer.models.metrics import confusion_counts


def evaluation_fn(model: tf.keras.Model, settings: Settings) -> Callable:
    """(images, masks) -> (per-sample loss (b,), confusion counts (b, R, 4)), inference mode.

    One definition for every runtime: the parameter-server workers run it as a closure, the
    others call it directly, so validation figures cannot drift between modes.
    """
    loss_fn, threshold = make_loss(settings.train.loss), settings.model.threshold

    def evaluate(images, masks):
        predictions = model(images, training=False)
        return loss_fn(masks, predictions), confusion_counts(masks, predictions, threshold)

    return evaluate


class KerasStepper:
    """The compiled model's own ``train_step`` (what ``model.fit`` runs), one batch per call.

    With Horovod the model's optimizer is ``hvd.DistributedOptimizer``, whose gradient
    allreduce inside ``train_step`` makes the step synchronous; nothing else differs from a
    single process.
    """

    def __init__(self, model: tf.keras.Model, settings: Settings):
        self.model = model
        self._train = tf.function(lambda images, masks: model.train_step((images, masks)), reduce_retracing=True)
        self._evaluate = tf.function(evaluation_fn(model, settings), reduce_retracing=True)

    def reset(self) -> None:
        self.model.reset_metrics()

    def train_step(self, images, masks) -> float:
        return float(self._train(images, masks)["loss"])

    def train_logs(self) -> dict[str, float]:
        return {name: float(value) for name, value in self.model.get_metrics_result().items()}

    def evaluate(self, images, masks) -> tuple[np.ndarray, np.ndarray]:
        loss, counts = self._evaluate(images, masks)
        return loss.numpy(), counts.numpy()
