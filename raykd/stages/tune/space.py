"""tune.space: parse and check the search space, and apply sampled values to a config (no Ray)."""

from __future__ import annotations

import itertools
import types
import typing
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError

from raykd.config import Config, SearchDim
from raykd.core.errors import RaykdError

# Keys the search may not touch: they set resources (tune.cpus_per_trial does) or other stages.
NOT_SEARCHABLE = {"distill.train.num_workers", "distill.train.cpus_per_worker", "distill.train.use_gpu",
                  "distill.train.max_failures", "distill.train_nokd"}


def parse_space(cfg: Config) -> dict[str, Any]:
    """Check `tune.space` against the config model and return Optuna distributions by dotted key.

    Raises RaykdError for an empty space, a key that is not a config key (or not a student
    setting), a bad range or type, or values the config itself would reject.
    """
    import optuna.distributions as od

    space = cfg.tune.space
    if not space:
        raise RaykdError("tune.space is empty: name at least one setting to search, e.g.\n"
                         "  tune:\n    space:\n      distill.temperature: {type: loguniform, low: 1, high: 10}")
    out = {}
    for key, dim in space.items():
        field = _leaf_field(key)
        where = f"tune.space.{key}"
        numeric = _numeric_kind(field)
        if dim.type == "choice":
            if not dim.values:
                raise RaykdError(f"{where}: type choice needs a non-empty `values` list, e.g. values: [8, 16, 32]")
            if dim.low is not None or dim.high is not None:
                raise RaykdError(f"{where}: type choice takes `values`, not low/high")
            for v in dim.values:
                _check_value(cfg, key, v, where)
            out[key] = od.CategoricalDistribution(list(dim.values))
            continue
        if dim.values is not None:
            raise RaykdError(f"{where}: `values` is only for type choice; type {dim.type} takes low and high")
        if dim.low is None or dim.high is None:
            raise RaykdError(f"{where}: type {dim.type} needs both low and high")
        if numeric is None:
            raise RaykdError(f"{where}: {key} is not a number; search it with type choice and a values list")
        if dim.low > dim.high:
            raise RaykdError(f"{where}: low ({dim.low:g}) is greater than high ({dim.high:g})")
        if dim.type == "loguniform" and dim.low <= 0:
            raise RaykdError(f"{where}: loguniform needs low > 0 (got {dim.low:g}); use type uniform for ranges "
                             "that start at 0")
        integer = dim.type == "int" or numeric is int
        if integer and (dim.low != int(dim.low) or dim.high != int(dim.high)):
            raise RaykdError(f"{where}: {key} takes whole numbers; low and high must be whole (got "
                             f"{dim.low:g}, {dim.high:g})")
        if integer:
            low, high = int(dim.low), int(dim.high)
            dist = od.IntDistribution(low, high, log=dim.type == "loguniform")
        else:
            low, high = float(dim.low), float(dim.high)
            dist = od.FloatDistribution(low, high, log=dim.type == "loguniform")
        for v in (low, high):
            _check_value(cfg, key, v, where)
        out[key] = dist
    _check_heads(cfg, space)
    return out


def _leaf_field(key: str):
    """The pydantic field a dotted key names, or a RaykdError listing the valid keys."""
    parts = key.split(".")
    if not all(parts):
        raise RaykdError(f"tune.space: {key!r} is not a dotted config key like distill.temperature")
    model: type[BaseModel] = Config
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        here = ".".join(parts[:i])
        if field is None:
            valid = ", ".join(f"{here}.{k}" if here else k for k in model.model_fields)
            raise RaykdError(f"tune.space: {key!r} is not a config key: {here + '.' if here else ''}{part} does "
                             f"not exist; valid keys here: {valid}")
        sub = _section_of(field.annotation)
        if i < len(parts) - 1:
            if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
                raise RaykdError(f"tune.space: {key!r} is not a config key: {'.'.join(parts[:i + 1])} is a value, "
                                 "not a section")
            model = sub
        elif isinstance(sub, type) and issubclass(sub, BaseModel):
            raise RaykdError(f"tune.space: {key!r} is a section; search one of its keys: "
                             + ", ".join(f"{key}.{k}" for k in sub.model_fields))
    if parts[0] != "distill" or key in NOT_SEARCHABLE:
        why = ("trials train only the student, so only distill.* settings change a trial"
               if parts[0] != "distill" else "it sets resources or another stage (see tune.cpus_per_trial)")
        raise RaykdError(f"tune.space: {key!r} is a config key but cannot be searched: {why}")
    return field


def _section_of(ann):
    """The section class an annotation names, an optional section's too (`ItemTableConfig | None`:
    searching one of its keys gives every trial that section, its other keys at their defaults)."""
    options = typing.get_args(ann) if typing.get_origin(ann) in (typing.Union, types.UnionType) else (ann,)
    sections = [t for t in options if isinstance(t, type) and issubclass(t, BaseModel)]
    return sections[0] if len(sections) == 1 else ann


def _numeric_kind(field) -> type | None:
    """int or float when the field holds a number (possibly optional), else None."""
    ann = field.annotation
    options = typing.get_args(ann) if typing.get_origin(ann) in (typing.Union, types.UnionType) else (ann,)
    for t in options:
        if t in (int, float) and t is not bool:
            return t
    return None


def _check_value(cfg: Config, key: str, value: Any, where: str) -> None:
    try:
        apply_values(cfg, {key: value})
    except RaykdError as err:
        raise RaykdError(f"{where}: {value!r} is not a valid {key}: {err}") from None


def _check_heads(cfg: Config, space: dict[str, SearchDim]) -> None:
    """SASRec needs dim divisible by heads: refuse a space that can sample a broken pair."""
    if cfg.distill.model.family != "sasrec":
        return

    def candidates(key: str, fixed: int) -> list[int]:
        dim = space.get(key)
        if dim is None:
            return [fixed]
        if dim.type == "choice":
            return [v for v in dim.values if isinstance(v, int)]
        low, high = int(dim.low), int(dim.high)
        return list(range(low, high + 1)) if high - low <= 512 else [low, high]

    dims = candidates("distill.model.dim", cfg.distill.model.dim)
    heads = candidates("distill.model.heads", cfg.distill.model.heads)
    bad = [(d, h) for d, h in itertools.product(dims, heads) if h > 0 and d % h]
    if bad:
        d, h = bad[0]
        raise RaykdError(f"tune.space: the search can sample distill.model.dim={d} with distill.model.heads={h}, "
                         "but SASRec needs dim divisible by heads; narrow the choices (e.g. heads: 1, or powers "
                         "of two for both)")


def apply_values(cfg: Config, values: dict[str, Any]) -> Config:
    """A copy of `cfg` with dotted-key values set, validated like a loaded config."""
    raw = cfg.model_dump(mode="json")
    for key, value in values.items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            if node.get(part) is None:  # an optional section that is off (distill.model.item_table: null)
                node[part] = {}
            node = node[part]
        node[leaf] = value.item() if isinstance(value, np.generic) else value
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise RaykdError("; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())) from None



def configured_point(cfg: Config, space: dict) -> dict | None:
    """The config's own values of the searched keys, if every one lies inside the space."""
    point = {key: config_value(cfg, key) for key in space}
    for key, dist in space.items():
        value = point[key]
        if value is None:  # a key of an optional section the config leaves off
            return None
        if hasattr(dist, "choices"):
            if value not in dist.choices:
                return None
        elif not dist.low <= value <= dist.high:
            return None
    return point


def config_value(cfg: Config, key: str) -> Any:
    """The config's value of a dotted key; None under an optional section that is off."""
    node: Any = cfg
    for part in key.split("."):
        node = None if node is None else getattr(node, part)
    return node

