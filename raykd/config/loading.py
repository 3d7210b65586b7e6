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


# settings that are secrets: never accepted on a command line, which every user of the machine
# sees (ps, shell history) and Ray stores with a job's entrypoint
SECRETS = (("serve", "api_key"),)


def refuse_secrets(overrides: list[str]) -> None:
    """Refuse command-line overrides that set a secret, however spelled (`serve.api_key =x`,
    `serve={api_key: x}`, a YAML merge key ...): each is parsed as `load_config` parses it.

    The error never repeats the override, whose value is the secret.
    """
    for item in overrides:
        raw: dict = {}
        try:
            _apply_override(raw, item)
        except RaykdError:
            continue  # not an override at all: load_config says so (without its value)
        path, _, value = item.partition("=")
        for section, key in SECRETS:
            # also `serve={<tab>api_key: x}`, which YAML cannot read: an error would repeat it as given
            unread = path.strip() == section and key in value.lower()
            if unread or isinstance(raw.get(section), dict) and key in raw[section]:
                raise RaykdError(f"{section}.{key} on the command line is visible to every user of this machine "
                                 "(ps, shell history) and stored with a Ray job's entrypoint: export RAYKD_API_KEY, "
                                 "or put the key in a file and pass serve.api_key_file=PATH (or RAYKD_API_KEY_FILE)")


def _apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep:
        raise RaykdError(f"override {item!r} is not of the form key=value (e.g. teacher.train.lr=3e-4)")
    if not key.strip():  # the value is left out of the error: it may be a secret
        raise RaykdError("an override has no key before its '=': it is not of the form key=value "
                         "(e.g. teacher.train.lr=3e-4)")
    node = raw
    parts = key.strip().split(".")
    if not all(parts):
        raise RaykdError(f"override key {key!r} is not a dotted key like teacher.train.lr")
    for part in parts[:-1]:
        if node.get(part) is None:  # a missing section, or `data:` left empty in the YAML
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise RaykdError(f"override key {key!r}: {part!r} is not a section")
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
