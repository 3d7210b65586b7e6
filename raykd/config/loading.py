"""Loading a config: the YAML file, then dotted `key=value` overrides, then validation.

Override values are parsed as YAML (`teacher.train.lr=3e-4`, `data.time_col=null`). Unknown keys are
errors that name the key and the valid keys, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from raykd.config.explain import explain
from raykd.config.sections import Config
from raykd.core.errors import RaykdError


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply dotted overrides, validate. Relative data paths stay as written."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RaykdError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise RaykdError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise RaykdError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise RaykdError(f"invalid config {path or '(defaults)'}:\n" + explain(err, Config)) from None


def _apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise RaykdError(f"override {item!r} is not of the form key=value (e.g. teacher.train.lr=3e-4)")
    node = raw
    parts = key.strip().split(".")
    if not all(parts):
        raise RaykdError(f"override {item!r}: {key!r} is not a dotted key like teacher.train.lr")
    for part in parts[:-1]:
        if node.get(part) is None:  # a missing section, or `data:` left empty in the YAML
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise RaykdError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = _yaml_value(value)


def _yaml_value(value: str) -> Any:
    """An override's value typed as YAML: `3e-4` a float, `null` None, `false` a bool."""
    if value == "":
        return None
    if not value.strip() or (len(value) == 1 and not value.isalnum() and value != "~"):
        return value  # one symbol such as a delimiter (| - # tab), which YAML reads as syntax
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value  # not YAML, so plain text, e.g. a path with brackets or colons
    return value if parsed is None and value.strip() not in ("null", "Null", "NULL", "~") else parsed


def section_hash(*sections: BaseModel) -> str:
    """Short stable hash of config sections: a stage's outputs are reused only if it matches."""
    blob = json.dumps([s.model_dump(mode="json") for s in sections], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
