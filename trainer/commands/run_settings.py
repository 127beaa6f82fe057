"""A run describes itself: what defines its model and inputs comes from ``runs/R/settings.yaml``.

``evaluate``, ``predict``, ``export``, ``benchmark`` and a resumed ``train`` read the run's own
settings for every key below, so a 3D or region run needs no ``--model 3d`` or
``--set model.regions=...`` again. An explicit flag or ``--set`` may still change what is free
at inference time (mirroring, where the data now lives); one that contradicts the model the run
trained is refused, naming both values. Everything else (CPU threads, cluster, logging, the
training recipe of a resumed run) stays the current invocation's.

The run records the prepared dataset folder it trained on (``data.dataset``, absolute), and that
folder records its raw source: ``prepare --src DIR`` is the only place DIR is typed.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from trainer.config.loader import load_settings
from trainer.config.settings import Settings
from trainer.config.values import get_value, set_value, validated
from trainer.errors import ConfigError

# What the trained weights mean: an override must agree with the run.
MODEL_KEYS = ("train.model", "model.regions", "model.base_filters_2d", "model.base_filters_3d", "model.upsampling",
              "model.dropout", "model.norm_2d", "model.norm_3d", "model.batch_norm_momentum", "model.threshold",
              "model.context_slices_2d", "model.context_stride_2d",
              "data.channels", "data.image_size", "data.crop_size")
# The run's by default, free to override: the inference procedure and where the data live now.
DEFAULT_KEYS = ("model.mirror_axes_2d", "model.mirror_axes_3d", "model.tune_thresholds_2d",
                "model.tune_thresholds_3d", "data.dataset", "data.source")
RUN_SETTINGS_FILE = "settings.yaml"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Explicit:
    """The dotted keys this invocation set by ``--set`` or by a flag, and how (for messages)."""

    sources: dict[str, str]

    @classmethod
    def from_cli(cls, overrides: Iterable[str], flags: dict[str, Any]) -> "Explicit":
        sources = {item.partition("=")[0].strip(): f"--set {item}" for item in overrides}
        sources.update({key: f"--{key.split('.')[-1].replace('_', '-')} {value}"
                        for key, value in flags.items() if value is not None})
        return cls(sources)

    def source(self, key: str) -> str | None:
        """How ``key`` was set explicitly (itself, a section above it or a key below it), or None."""
        for given, how in self.sources.items():
            if given == key or key.startswith(given + ".") or given.startswith(key + "."):
                return how
        return None


def run_settings_path(settings: Settings) -> Path:
    return settings.run_path / RUN_SETTINGS_FILE


def settings_for_run(current: Settings, explicit: Explicit) -> Settings:
    """``current`` with the run's own model and input keys, when ``runs/R/settings.yaml`` exists."""
    path = run_settings_path(current)
    if path.is_file():
        run = load_settings(path)
        current = _adopt(current, run, explicit, path)
    return current


def _adopt(current: Settings, run: Settings, explicit: Explicit, path: Path) -> Settings:
    merged = current.model_dump(mode="json", by_alias=True)
    theirs = run.model_dump(mode="json", by_alias=True)
    adopted = []
    for key in MODEL_KEYS + DEFAULT_KEYS:
        run_value, value = get_value(theirs, key), get_value(merged, key)
        how = explicit.source(key)
        if how is None:
            if value != run_value:
                adopted.append(f"{key}={_show(run_value)}")
            set_value(merged, key, run_value)
        elif key in MODEL_KEYS and value != run_value:
            raise ConfigError(f"{how}: {key} = {_show(value)} contradicts the run, which was trained with "
                              f"{key} = {_show(run_value)} ({path}); drop the override, or train a new run "
                              f"(--run-name)")
    if adopted:
        log.info("the run's own settings (%s) over the current ones: %s", path, ", ".join(adopted))
    return validated(merged)


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)
