"""Config errors in words a user can act on: the key, what is wrong, and the valid keys around it.

`explain(err, root)` turns a pydantic ValidationError of the config model `root` (raykd.config.Config)
into one line per problem; an unknown key lists the keys valid at its place, so that a typo never
reads as "unknown" without the fix beside it. `section_type` says which config section a field holds
(also used by raykd.config.docs to walk the config).
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, ValidationError


def explain(err: ValidationError, root: type[BaseModel]) -> str:
    """One indented line per problem of `err`, a validation error of the model `root`."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            valid = ", ".join(fields_at(root, e["loc"][:-1]))
            lines.append(f"  unknown key '{loc}'; valid keys here: {valid}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            whole_section = e["type"] == "value_error" and isinstance(got, dict)  # a check across fields
            where = f"{loc}: " if loc else ""  # a check across sections has no location
            lines.append(f"  {where}{msg}" + ("" if whole_section else f" (got {got!r})"))
    return "\n".join(lines)


def fields_at(root: type[BaseModel], loc: tuple) -> list[str]:
    """The keys of the section at `loc` (a dotted path as a tuple) below `root`."""
    model = root
    parts = [str(p) for p in loc]
    while parts:
        field = model.model_fields.get(parts.pop(0))
        sub = section_type(field.annotation) if field else None
        if sub is None:
            return []
        if typing.get_origin(field.annotation) is dict and parts:
            parts.pop(0)  # a key of a dict of sections, e.g. tune.space.<searched key>
        model = sub
    return list(model.model_fields)


def section_type(annotation: Any) -> type[BaseModel] | None:
    """The config section a field holds: its type, or the X of `X | None` and `dict[str, X]`."""
    for t in (annotation, *typing.get_args(annotation)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None
