"""Typed, frozen configuration per stage, loaded from params.yaml.

Each stage reads its own section into a frozen dataclass. Unknown keys (typos such as
``train.resolutoin``) and values of the wrong type fail at start with the file and the dotted key
named, before any work is done (nanoGPT's "Unknown config key" check, made strict).

Ensemble members (``ensemble.members.<name>``) are dotted overrides applied on top of the base
sections before they are typed, so ``dvc exp run -S train.resolution=224`` changes every member
that does not override ``train.resolution`` itself.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from products10k.common import ConfigError

T = TypeVar("T")


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing file, bad YAML or a non-mapping is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        with path.open(encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints are accepted as floats)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError:
                continue  # try the next member of the union; the message below names them all
        raise ConfigError(f"{where}: key '{key}' has value {value!r}, expected {_type_name(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{where}: key '{key}' is {value!r}, expected one of {', '.join(map(repr, choices))}"
            )
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key '{key}' must be a mapping, got {value!r}")
        return from_dict(tp, value, where=where, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: key '{key}' must be a list, got {value!r}")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(items)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key '{key}' must be a mapping, got {value!r}")
        return copy.deepcopy(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: key '{key}' must be true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: key '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: key '{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def from_dict(cls: type[T], data: dict, where: str = "params.yaml", prefix: str = "") -> T:
    """Build the frozen dataclass ``cls`` from ``data``.

    Unknown keys raise ConfigError naming ``where`` (the file) and the dotted key; missing keys
    take the dataclass default (the embedded default), or raise if the field has none.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: section '{prefix}' must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    dotted = (prefix + ".") if prefix else ""
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key '{dotted}{unknown[0]}'"
            f" (known keys of '{prefix or 'top level'}': {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], dotted + name, where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key '{dotted}{name}'")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as exc:
            raise ConfigError(f"{where}: section '{prefix}': {exc}") from exc
    return obj


def set_dotted(tree: dict, dotted: str, value: Any, where: str = "params.yaml") -> None:
    """Set ``tree['a']['b'] = value`` for ``dotted='a.b'``; the parent sections must exist."""
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        if part not in node or not isinstance(node[part], dict):
            raise ConfigError(f"{where}: override '{dotted}': no section '{'.'.join(parts[: i + 1])}'")
        node = node[part]
    node[parts[-1]] = copy.deepcopy(value)


def apply_overrides(params: dict, overrides: dict, where: str = "params.yaml") -> dict:
    """Return a copy of ``params`` with dotted ``overrides`` (``{'train.resolution': 224}``) set."""
    out = copy.deepcopy(params)
    for dotted, value in (overrides or {}).items():
        set_dotted(out, str(dotted), value, where)
    return out


def section(params: dict, name: str, cls: type[T], where: str = "params.yaml") -> T:
    """Type the top-level section ``name`` of ``params`` as ``cls``."""
    return from_dict(cls, params.get(name) or {}, where=where, prefix=name)


def load_section(path: str | Path, name: str, cls: type[T]) -> T:
    """Load ``path`` and type its section ``name`` as ``cls`` (the common case for a stage)."""
    return section(load_yaml(path), name, cls, where=str(path))


def member_names(params: dict, where: str = "params.yaml") -> list[str]:
    """Names of the ensemble members (``ensemble.members``), in params order."""
    members = (params.get("ensemble") or {}).get("members")
    if not isinstance(members, dict) or not members:
        raise ConfigError(f"{where}: 'ensemble.members' must be a non-empty mapping of name -> overrides")
    return list(members)


def member_params(params: dict, member: str, where: str = "params.yaml") -> dict:
    """``params`` with member ``member``'s dotted overrides applied (``{'model.arch': 'resnet34'}``).

    A member that does not override a key follows the base section, so ``-S train.resolution=224``
    changes every member that does not set ``train.resolution`` itself.
    """
    names = member_names(params, where)
    if member not in names:
        raise ConfigError(f"{where}: unknown ensemble member '{member}' (members: {', '.join(names)})")
    overrides = params["ensemble"]["members"][member] or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: 'ensemble.members.{member}' must be a mapping of dotted key -> value")
    return apply_overrides(params, overrides, where=f"{where} (ensemble.members.{member})")
