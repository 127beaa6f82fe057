"""Read settings.yaml, apply ``--set key=value`` overrides, validate once."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml
from pydantic import ValidationError

from trainer.config.settings import Settings, settings_to_yaml  # noqa: F401 (re-export)
from trainer.errors import ConfigError, UserError
from trainer.fsutil import read_regular_text


def load_settings(path: Path | None, overrides: Iterable[str] = (),
                  flag_overrides: Mapping[str, Any] | None = None) -> Settings:
    """Return validated settings: file < ``--set`` overrides < explicit CLI flags."""
    raw = _read_yaml(path) if path is not None else {}
    origins: dict[str, str] = {}  # dotted key -> the flag or --set that gave it, for messages
    for item in overrides:
        key, value = _parse_override(item)
        _assign(raw, key, value, source=f"--set {item}")
        origins[key] = f"--set {item}"
    for key, value in (flag_overrides or {}).items():
        if value is not None:
            origins[key] = f"--{key.split('.')[-1].replace('_', '-')}"
            _assign(raw, key, value, source=origins[key])
    try:
        # Strict, as JSON: a wrong type is an error, never coerced (`epochs: true` is not 1,
        # `augment: 1` is not true, `epochs: 3.5` is not 3), while JSON's own forms still map
        # onto the schema (lists -> tuples, strings -> paths).
        # The defaults take the same JSON road (validating Python defaults strictly as JSON would
        # reject their Path objects), so every value is checked the same way.
        merged = _merge(Settings().model_dump(mode="json", by_alias=True), raw)
        return Settings.model_validate_json(json.dumps(merged, default=str), strict=True)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, path, origins)) from None


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, section by section (a non-mapping replaces outright)."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# A settings file is a few KiB of plain mappings. Refused before anything is built from it: an
# alias or anchor (seen: a 395-byte alias bomb as --settings or runs/R/settings.yaml took 3 GiB
# and 94 s, then was killed), an integer of more digits than any setting needs (a 5000-digit one
# ended in a traceback), nesting deeper than the schema's few levels, a file over 1 MiB.
MAX_SETTINGS_BYTES = 1 << 20
MAX_DEPTH = 20
MAX_INT_DIGITS = 20


class _Refused(Exception):
    """What the settings loader will not build, with where it was found."""

    def __init__(self, what: str, mark: Any = None):
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        super().__init__(f"{what}{where}")


class _SettingsLoader(yaml.SafeLoader):
    """yaml.SafeLoader without aliases and anchors, deep nesting or huge integers."""

    _depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise _Refused("YAML anchors and aliases (&name, *name) are not accepted in settings; write the "
                           "value out", event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node):
        text = str(node.value).lstrip("+-")
        text = text[2:] if text[:2].lower() in ("0x", "0o", "0b") else text
        digits = sum(ch.isalnum() for ch in text)
        if digits > MAX_INT_DIGITS:
            raise _Refused(f"an integer of {digits} digits (at most {MAX_INT_DIGITS})", node.start_mark)
        return super().construct_yaml_int(node)


_SettingsLoader.add_constructor("tag:yaml.org,2002:int", _SettingsLoader.construct_yaml_int)


def parse_settings_yaml(text: str) -> Any:
    """``text`` as YAML, by the settings rules (raises _Refused or yaml.YAMLError)."""
    return yaml.load(text, Loader=_SettingsLoader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = read_regular_text(path, f"{path}: settings file", limit=MAX_SETTINGS_BYTES)
    except FileNotFoundError:
        raise ConfigError(f"{path}: settings file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read settings file ({exc.strerror})") from None
    except UserError as exc:
        raise ConfigError(str(exc)) from None
    try:
        data = parse_settings_yaml(text)
    except _Refused as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, model, train, ...), "
                          f"got {type(data).__name__}")
    return data


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=3")
    try:
        value = parse_settings_yaml(text) if text.strip() else ""
    except _Refused as exc:
        raise ConfigError(f"--set {item!r}: {exc}") from None
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def _assign(tree: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{source}: '{'.'.join(parts[:depth + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def _format_validation_error(exc: ValidationError, path: Path | None,
                             origins: Mapping[str, str] | None = None) -> str:
    default = str(path) if path is not None else "settings"
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(root)"
        source = next((how for given, how in (origins or {}).items() if key == given or key.startswith(given + ".")),
                      default)
        message = err["msg"].removeprefix("Value error, ")  # pydantic's wording for a validator's own message
        if err["type"] == "extra_forbidden":
            message = "unknown key (check spelling; `unet-train config show` lists every key)"
        got = err.get("input")
        shown = ("" if err["type"] in ("extra_forbidden", "missing") or isinstance(got, dict)
                 or f"got {got!r}" in message or f"got {list(got) if isinstance(got, tuple) else got}" in message
                 else f" (got {got!r})")
        lines.append(f"{source}: {key}: {message}{shown}")
    return "\n".join(lines)
