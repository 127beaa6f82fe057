"""Export a trained model as a SavedModel and prove the export computes the same function."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from trainer.config.settings import Settings
from trainer.errors import TrainingError
from trainer.fsutil import atomic_dir, refuse_existing, write_json
from trainer.inference.predictor import Predictor

PARITY_TOLERANCE = 1e-5


def export(settings: Settings, out: Path | None = None, overwrite: bool = False, seed: int = 0) -> dict:
    """An existing ``out`` is refused unless ``overwrite`` (checked before the model is loaded)."""
    out = Path(out or settings.run_path / "export" / "saved_model")
    refuse_existing(out, overwrite)
    predictor, checkpoint = Predictor.from_run(settings)
    model = predictor.model
    sample = np.random.default_rng(seed).normal(size=(2, *model.input_shape[1:])).astype(np.float32)
    expected = model(sample, training=False).numpy()
    with atomic_dir(out, overwrite) as tmp:
        model.save(str(tmp), save_format="tf", include_optimizer=False)
        served = tf.saved_model.load(str(tmp)).signatures["serving_default"]
        actual = list(served(tf.constant(sample)).values())[0].numpy()
        max_diff = float(np.max(np.abs(actual - expected)))
        if not max_diff <= PARITY_TOLERANCE:
            raise TrainingError(f"{out}: exported model differs from Keras model by {max_diff:.3g} "
                                f"(> {PARITY_TOLERANCE}); export discarded")
    report = {"saved_model": str(out), "checkpoint": checkpoint, "max_abs_diff": max_diff,
              "tolerance": PARITY_TOLERANCE, "sample_shape": list(sample.shape)}
    write_json(out.parent / "export.json", report)
    return report
