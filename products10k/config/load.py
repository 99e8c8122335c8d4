"""Loading params.yaml into the typed, frozen sections of :mod:`products10k.config.schema`.

Every error is a ConfigError naming the file and the dotted key (``params.yaml: unknown key
'train.resolutoin' ...``), raised at start, before any work is done.

Ensemble members (``ensemble.members.<name>``) are dotted overrides applied on top of the base
sections before they are typed, so ``dvc exp run -S train.resolution=224`` changes every member
that does not override ``train.resolution`` itself. A finetune phase is the ``train`` section with
its own section's keys on top, so ``-S train.min_lr=...`` reaches every phase that does not set
``min_lr`` itself.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from products10k.common import ConfigError
from products10k.config.schema import PHASES, PhaseConfig

T = TypeVar("T", bound=BaseModel)

#: how pydantic names the member of a union it tried, in an error's location
_UNION_TAGS = {"int", "float", "str", "bool", "none"}


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


def _dotted_key(cls: type[BaseModel], loc: tuple, prefix: str) -> tuple[str, type[BaseModel]]:
    """The dotted params key of a pydantic error location, and the model whose key it is."""
    key, model, owner = prefix, cls, cls
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
            model = None
            continue
        if model is None:
            if part in _UNION_TAGS or "[" in part:
                continue  # the union member pydantic tried ('int', "literal['auto']"): not a key
            key += f".{part}"  # a key of a mapping-valued field (ensemble.weights.m0)
            continue
        key = f"{key}.{part}" if key else part
        owner = model
        field = model.model_fields.get(part)
        if field is None:
            break  # an unknown key
        annotation = field.annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return key, owner


def _is_field(owner: type[BaseModel] | None, loc: tuple) -> bool:
    """Whether an error's location ends at a plain field (a field validator's) rather than at a
    section (a model validator's, whose location is the section itself)."""
    if not loc or owner is None or not isinstance(loc[-1], str) or loc[-1] not in owner.model_fields:
        return False
    annotation = owner.model_fields[loc[-1]].annotation
    return not (isinstance(annotation, type) and issubclass(annotation, BaseModel))


def _first_error(exc: ValidationError, cls: type[BaseModel], where: str, prefix: str) -> ConfigError:
    """One ConfigError for the first problem pydantic found, in the words of params.yaml."""
    # an unknown key first: a typo (``per_klass``) also makes the real key (``per_class``) missing;
    # else the deepest: of a union's members, the one that got furthest into the value
    err = min(exc.errors(), key=lambda e: (e["type"] != "extra_forbidden", -len(e["loc"])))
    key, owner = _dotted_key(cls, tuple(err["loc"]), prefix)
    section = key.rpartition(".")[0] or "top level"
    kind = err["type"]
    if kind == "extra_forbidden":
        known = ", ".join(owner.model_fields)
        return ConfigError(f"{where}: unknown key '{key}' (known keys of '{section}': {known})")
    if kind == "missing":
        return ConfigError(
            f"{where}: missing key '{key}' "
            "(params.yaml holds every default: copy the key from the project's params.yaml)"
        )
    message = err["msg"].removeprefix("Value error, ")
    if kind == "value_error" and not _is_field(owner, err["loc"]):  # a check across a section's keys
        return ConfigError(f"{where}: section '{key or 'top level'}': {message}")
    return ConfigError(f"{where}: key '{key}' is {err.get('input')!r}: {message}")


def from_dict(cls: type[T], data: Any, where: str = "params.yaml", prefix: str = "") -> T:
    """Type ``data`` (the mapping at ``prefix`` in ``where``) as the section model ``cls``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: section '{prefix}' must be a mapping, got {data!r}")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise _first_error(exc, cls, where, prefix) from None


def section(params: dict, name: str, cls: type[T], where: str = "params.yaml") -> T:
    """Type the top-level section ``name`` of ``params`` as ``cls``."""
    return from_dict(cls, params.get(name), where=where, prefix=name)


def load_section(path: str | Path, name: str, cls: type[T]) -> T:
    """Load ``path`` and type its section ``name`` as ``cls`` (the common case for a stage)."""
    return section(load_yaml(path), name, cls, where=str(path))


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
    # the launcher starts every stage with the top-level dist (processes, nodes); the folds stage
    # deals one set of folds for every member (the ensemble's members must predict the same val rows)
    shared = sorted(str(key) for key in overrides if str(key).split(".")[0] in ("dist", "cv"))
    if shared:
        raise ConfigError(
            f"{where}: ensemble.members.{member} overrides {', '.join(shared)}: "
            f"'{shared[0].split('.')[0]}' is one for the whole pipeline (set it at the top level)"
        )
    return apply_overrides(params, overrides, where=f"{where} (ensemble.members.{member})")


def phase_config(params: dict, phase: str, where: str = "params.yaml") -> PhaseConfig:
    """The config of training ``phase``: ``train``, with the phase's own section on top.

    A finetune section names only what differs from ``train`` (epochs, lr, ...); an unknown key
    there fails naming ``<phase>.<key>``.
    """
    if phase not in PHASES:
        raise ConfigError(f"{where}: unknown phase '{phase}' (known: {', '.join(PHASES)})")
    train = params.get("train")
    if not isinstance(train, dict):
        raise ConfigError(f"{where}: section 'train' must be a mapping, got {train!r}")
    if phase == "train":
        return from_dict(PhaseConfig, train, where, "train")
    overrides = params.get(phase) or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: section '{phase}' must be a mapping, got {overrides!r}")
    unknown = sorted(set(overrides) - set(PhaseConfig.model_fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key '{phase}.{unknown[0]}' "
            f"(known keys of '{phase}': those of 'train': {', '.join(PhaseConfig.model_fields)})"
        )
    return from_dict(PhaseConfig, {**train, **overrides}, where, phase)
