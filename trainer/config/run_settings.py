"""A run describes itself: what defines its model and inputs comes from ``runs/R/settings.yaml``.

``evaluate``, ``predict``, ``export``, ``benchmark`` and a resumed ``train`` read the run's own
settings for every key below, so a 3D or region run needs no ``--model 3d`` or
``--set model.regions=...`` again. An explicit flag or ``--set`` may still change what is free
at inference time (mirroring, where the data now lives); one that contradicts the model the run
trained is refused, naming both values. Everything else (CPU threads, cluster, logging, the
training recipe of a resumed run) stays the current invocation's.

The raw data follow the prepared data: unless ``--set`` names it, the raw dataset is the folder
``prepare`` recorded in the split file, so ``prepare --src DIR`` is the only place DIR is typed.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from trainer.config.settings import Settings
from trainer.data.split import recorded_source, split_path_for
from trainer.errors import ConfigError

# What the trained weights mean: an override must agree with the run.
MODEL_KEYS = ("train.model", "model.regions", "model.base_filters_2d", "model.base_filters_3d", "model.upsampling",
              "model.dropout", "model.norm_2d", "model.norm_3d", "model.batch_norm_momentum", "model.threshold",
              "model.context_slices_2d", "model.context_stride_2d",
              "data.channels", "data.image_size", "data.crop_size")
# The run's by default, free to override: the inference procedure and where the data live now.
DEFAULT_KEYS = ("model.mirror_axes_2d", "model.mirror_axes_3d", "model.tune_thresholds_2d",
                "model.tune_thresholds_3d", "data.brats_dir", "data.slices_h5",
                "data.decathlon_dir", "data.cache_dir", "data.decathlon_split", "data.split")
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
    """``current`` with the run's own model and input keys, when ``runs/R/settings.yaml`` exists;
    then the raw data sources that ``prepare`` recorded (see :func:`follow_prepared_sources`)."""
    path = run_settings_path(current)
    if path.is_file():
        from trainer.config.loader import load_settings

        run = load_settings(path)
        current = _adopt(current, run, explicit, path)
    return follow_prepared_sources(current, explicit)


def _adopt(current: Settings, run: Settings, explicit: Explicit, path: Path) -> Settings:
    merged = current.model_dump(mode="json", by_alias=True)
    theirs = run.model_dump(mode="json", by_alias=True)
    adopted = []
    for key in MODEL_KEYS + DEFAULT_KEYS:
        run_value, value = _get(theirs, key), _get(merged, key)
        how = explicit.source(key)
        if how is None:
            if value != run_value:
                adopted.append(f"{key}={_show(run_value)}")
            _set(merged, key, run_value)
        elif key in MODEL_KEYS and value != run_value:
            raise ConfigError(f"{how}: {key} = {_show(value)} contradicts the run, which was trained with "
                              f"{key} = {_show(run_value)} ({path}); drop the override, or train a new run "
                              f"(--run-name)")
    if adopted:
        log.info("the run's own settings (%s) over the current ones: %s", path, ", ".join(adopted))
    return _validated(merged)


def follow_prepared_sources(settings: Settings, explicit: Explicit) -> Settings:
    """The raw BraTS / Decathlon folders that ``prepare`` recorded beside the prepared data, unless
    ``--set`` names one or the recorded folder is gone."""
    data = settings.data
    changes = {}
    for key, split_file in (("data.brats_dir", split_path_for(data.slices_h5)),
                            ("data.decathlon_dir", data.decathlon_split)):
        if explicit.source(key) is not None:
            continue
        source = recorded_source(split_file)
        if source is not None and source.is_dir() and source != _get_path(settings, key):
            changes[key] = str(source)
    return with_values(settings, changes) if changes else settings


def with_values(settings: Settings, values: dict[str, Any]) -> Settings:
    """``settings`` with dotted keys set to ``values``, validated again like any settings."""
    merged = settings.model_dump(mode="json", by_alias=True)
    for key, value in values.items():
        _set(merged, key, value)
    return _validated(merged)


def _validated(merged: dict) -> Settings:
    return Settings.model_validate_json(json.dumps(merged), strict=True)


def _get(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _get_path(settings: Settings, dotted: str) -> Path:
    section, key = dotted.split(".")
    return Path(getattr(getattr(settings, section), key))


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree[part]
    tree[last] = value


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)
