"""Config discovery: the resolved config with every key's description, and its JSON schema.

`raykd config show CONFIG [key=value ...]` prints what a stage would run with (defaults spelled
out, each key's description as a comment, secrets masked); `raykd config schema` prints the JSON
schema of the config file, for editor completion and validation.
"""

from __future__ import annotations

import json
import typing

from pydantic import BaseModel

from raykd.config import Config, section_type


def described_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str | None]]:
    """Every leaf key of the config as (dotted key, description); a dict of sections' keys as `<key>`."""
    out = []
    for name, field in model.model_fields.items():
        sub = section_type(field.annotation)
        if sub is None:
            out.append((prefix + name, field.description))
        else:
            keyed = typing.get_origin(field.annotation) is dict
            out += described_keys(sub, f"{prefix}{name}.{'<key>.' if keyed else ''}")
    return out


def show(cfg: Config) -> str:
    """The resolved config as YAML, each key followed by its description as a comment."""
    return "\n".join(_lines(cfg, cfg.model_dump(mode="json"), 0)) + "\n"


def _lines(section: BaseModel, dumped: dict, depth: int) -> list[str]:
    pad, lines = "  " * depth, []
    for name, field in type(section).model_fields.items():
        value, note = dumped[name], f"  # {field.description}" if field.description else ""
        child = getattr(section, name)
        if isinstance(child, BaseModel):
            lines += [f"{pad}{name}:{note}", *_lines(child, value, depth + 1)]
        elif isinstance(child, dict) and child and all(isinstance(v, BaseModel) for v in child.values()):
            lines.append(f"{pad}{name}:{note}")
            lines += [f"{pad}  {k}: {json.dumps({a: b for a, b in v.items() if b is not None})}" for k, v in value.items()]
        else:
            lines.append(f"{pad}{name}: {json.dumps(value, ensure_ascii=False)}{note}")  # JSON scalars are YAML
    return lines


def schema() -> str:
    return json.dumps(Config.model_json_schema(), indent=2)
