"""One way to run a stage script (``stages/*.py``): arguments, settings, the family's function, done.

- **Files**: a stage's files are one dataclass (a :class:`StageFiles`) whose fields are its
  command-line options, as dvc.yaml passes them: field ``label_map`` is ``--label-map``, a
  ``Path``; a field with a default is optional. :func:`stage_parser` builds the parser (``--params``,
  ``--member`` and ``--phase`` where the stage takes them, then the files), ``Files.of(args)`` the
  dataclass the family's function takes.
- **Settings**: :class:`StageParams` reads params.yaml once; :meth:`StageParams.typed` types the
  sections a stage reads (the schema's, :data:`SECTIONS`) and checks, once, the rules that span
  sections: the member is one of ``ensemble.members``, a phase the stage reads was evaluated
  (``evaluate.phases``). A stage under torchrun types its sections inside the process group, after
  the ranks compared their params (``products10k.dist.group``): ``StageParams.section("dist")``
  first, ``typed(...)`` inside.

A stage script then reads::

    args = stage_parser(__doc__, EvalFiles, member=True, phase=True).parse_args(argv)
    settings = StageParams(args.params).typed("evaluate", "tta", "cv", member=args.member,
                                              phase=args.phase)
    evaluate_phase(args.member, args.phase, EvalFiles.of(args), settings.evaluate, ...)
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

from products10k.common import ConfigError
from products10k.config.load import load_yaml, member_names, member_params, section
from products10k.config.schema import PHASES, SECTIONS

F = TypeVar("F", bound="StageFiles")


def option(help: str, *, optional: bool = False) -> Any:
    """A field of a StageFiles: a path option, ``help`` its help text; ``optional``: may be absent."""
    return dataclasses.field(default=None if optional else dataclasses.MISSING, metadata={"help": help})


class StageFiles:
    """Base of a stage's files; subclasses are dataclasses (frozen or not) whose command-line options
    are :func:`option` fields."""

    @classmethod
    def options(cls) -> list[dataclasses.Field]:
        """The fields that are command-line options (made by :func:`option`); others are state."""
        return [field for field in dataclasses.fields(cls) if "help" in field.metadata]

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        for field in cls.options():
            required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
            parser.add_argument(
                "--" + field.name.replace("_", "-"),
                dest=field.name,
                type=Path,
                required=required,
                default=None,
                help=field.metadata.get("help"),
            )

    @classmethod
    def of(cls: type[F], args: argparse.Namespace) -> F:
        """The files of parsed ``args`` (a parser :func:`stage_parser` built for ``cls``)."""
        return cls(**{field.name: getattr(args, field.name) for field in cls.options()})


def stage_parser(
    doc: str | None, files: type[StageFiles], *, member: bool = False, phase: bool = False
) -> argparse.ArgumentParser:
    """The command line of a stage: ``--params``, ``--member``/``--phase`` where it takes them, its files."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", required=True, type=Path, help="params.yaml")
    if member:
        parser.add_argument("--member", required=True, help="ensemble member name (ensemble.members)")
    if phase:
        # no argparse choices: a phase outside evaluate.phases is a ConfigError naming params.yaml
        parser.add_argument("--phase", required=True, help=f"training phase ({', '.join(PHASES)})")
    files.add_arguments(parser)
    return parser


class StageParams:
    """params.yaml, read once, and its sections typed for one stage (module docstring)."""

    def __init__(self, path: str | Path, tree: dict | None = None):
        self.path = Path(path)
        self.where = str(path)
        self.tree = load_yaml(path) if tree is None else tree

    def for_member(self, member: str) -> StageParams:
        """These params with ensemble member ``member``'s overrides applied (an unknown member is a
        ConfigError naming it): what a member's training phase runs on."""
        return StageParams(self.path, member_params(self.tree, member, self.where))

    def section(self, name: str):
        """Section ``name`` typed by the schema (a ConfigError names the file and the key)."""
        if name not in SECTIONS:
            raise KeyError(f"no section '{name}' in the schema ({', '.join(SECTIONS)})")
        return section(self.tree, name, SECTIONS[name], where=self.where)

    def typed(self, *names: str, member: str | None = None, phase: str | None = None, evaluated=()):
        """The sections ``names`` typed, as attributes, and the rules across sections checked once:
        ``member`` is one of ``ensemble.members``; ``phase`` (the stage's ``--phase``) and each dotted
        key of ``evaluated`` (``"retrieval.phase"``: a typed section's field) are in ``evaluate.phases``."""
        settings = SimpleNamespace(**{name: self.section(name) for name in names})
        if member is not None:
            require_member(member, self.tree, self.where)
        checks = {"--phase": phase} if phase is not None else {}
        for key in evaluated:
            name, field = key.split(".")
            checks[key] = getattr(getattr(settings, name, None) or self.section(name), field)
        if checks:
            phases = settings.evaluate.phases if "evaluate" in names else self.section("evaluate").phases
            for key, value in checks.items():
                require_evaluated_phase(value, phases, self.where, key=key)
        return settings


def require_member(member: str, params: dict, where: str, key: str = "--member") -> None:
    """ConfigError unless ``member`` is one of ``ensemble.members`` (``key`` names where it comes from)."""
    if member not in member_names(params, where):
        raise ConfigError(f"{where}: {key} '{member}' is not in ensemble.members")


def require_evaluated_phase(phase: str, phases, where: str, key: str = "phase") -> None:
    """ConfigError unless ``phase`` is one of ``evaluate.phases`` (``key`` names its source)."""
    if phase not in phases:
        raise ConfigError(f"{where}: {key} '{phase}' is not in evaluate.phases ({', '.join(phases)})")
