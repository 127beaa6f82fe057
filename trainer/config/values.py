"""Settings by dotted key (``train.model``, ``data.crop_size``): read, set, validated again.

Pure helpers on the settings' JSON form, for whoever changes settings after loading (a plan's
values, a run's own keys); the loader itself takes ``--set`` overrides the same way.
"""
from __future__ import annotations

import json
from typing import Any

from trainer.config.settings import Settings


def with_values(settings: Settings, values: dict[str, Any]) -> Settings:
    """``settings`` with dotted keys set to ``values``, validated again like any settings."""
    merged = settings.model_dump(mode="json", by_alias=True)
    for key, value in values.items():
        set_value(merged, key, value)
    return validated(merged)


def validated(merged: dict) -> Settings:
    return Settings.model_validate_json(json.dumps(merged), strict=True)


def get_value(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def set_value(tree: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree[part]
    tree[last] = value
