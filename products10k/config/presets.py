"""Named recipes (``presets/<name>.yaml``) merged into params.yaml, keeping its comments.

    python -m products10k.config.presets list
    python -m products10k.config.presets apply paper [--params params.yaml]
    python -m products10k.config.presets apply paper offline   # several, merged in order

A preset is a partial params.yaml: its keys are deep-merged into the target (keys it does not
name keep their values), and the result is type-checked before params.yaml is replaced
atomically. DVC then sees ordinary params changes: ``dvc repro`` runs the recipe and
``dvc exp run -S train.resolution=224`` works on top of it.
"""

from __future__ import annotations

import argparse
import copy
import io
import logging
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedSeq

from products10k.common import ConfigError, Products10kError, setup_logging, write_text
from products10k.config.load import load_yaml, member_names, member_params, phase_config, section
from products10k.config.schema import PHASES, SECTIONS

log = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).resolve().parents[2] / "presets"


def available(preset_dir: Path = PRESET_DIR) -> list[str]:
    return sorted(p.stem for p in preset_dir.glob("*.yaml"))


def preset_path(name: str, preset_dir: Path = PRESET_DIR) -> Path:
    path = preset_dir / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no preset '{name}' in {preset_dir} (have: {', '.join(available(preset_dir))})")
    return path


def _copy_comment(source, target, key) -> None:
    """Put ``source``'s end-of-line comment of ``key`` on ``target``, keeping target's blank lines."""
    new = source.ca.items.get(key) if hasattr(source, "ca") else None
    if new is None or not hasattr(target, "ca") or len(new) < 3 or new[2] is None:
        return
    old = target.ca.items.get(key)
    old_token = old[2] if old is not None and len(old) > 2 else None
    newlines = len(old_token.value) - len(old_token.value.rstrip("\n")) if old_token is not None else 1
    token = copy.copy(new[2])
    token.value = token.value.rstrip("\n") + "\n" * max(1, newlines)
    target.ca.items[key] = [None, None, token, None]


def _merge(target, updates, prefix: str = "") -> list[str]:
    """Deep-merge the preset mapping ``updates`` into ``target`` (both round-trip mappings).

    A changed key also takes the preset's end-of-line comment, so the note beside a value
    describes the value now there; keys the preset does not name keep value and comment.
    """
    changed = []
    for key, value in updates.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            changed += _merge(target[key], value, dotted + ".")
            continue
        if isinstance(value, list):
            value = CommentedSeq(value)
            value.fa.set_flow_style()  # [20, 40, 60] on one line, like the hand-written params
        if target.get(key) != value:
            target[key] = value
            changed.append(dotted)
            _copy_comment(updates, target, key)
    return changed


def check_params(params: dict, where: str) -> None:
    """Type-check every section of every member, as the stages will read them (no torch import)."""
    for member in member_names(params, where):
        mp = member_params(params, member, where)
        for name, cls in SECTIONS.items():
            section(mp, name, cls, where)
        for phase in PHASES:
            phase_config(mp, phase, where)


def _represent_float(representer, value: float):
    """Floats as YAML 1.1 reads them too: PyYAML takes ``1e-06`` for a string, ``1.0e-06`` not."""
    text = repr(float(value))
    if "e" in text and "." not in text.split("e")[0]:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


def _represent_none(representer, _value):
    return representer.represent_scalar("tag:yaml.org,2002:null", "null")


def apply_preset(name: str, params_path: str | Path, preset_dir: Path = PRESET_DIR) -> list[str]:
    """Merge preset ``name`` into ``params_path`` (comments kept); return the changed dotted keys."""
    params_path = Path(params_path)
    path = preset_path(name, preset_dir)
    load_yaml(path)  # plain-YAML check of the preset first: clear errors for a broken file
    yaml = YAML()  # round-trip mode: comments and key order of params.yaml survive
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.representer.add_representer(float, _represent_float)
    yaml.representer.add_representer(type(None), _represent_none)
    with path.open(encoding="utf-8") as f:
        preset = yaml.load(f)
    with params_path.open(encoding="utf-8") as f:
        doc = yaml.load(f)
    changed = _merge(doc, preset)
    buf = io.StringIO()
    yaml.dump(doc, buf)
    text = buf.getvalue()
    import yaml as pyyaml

    check_params(pyyaml.safe_load(text), f"{params_path} + preset {name}")
    write_text(params_path, text)
    return changed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the presets")
    ap = sub.add_parser("apply", help="merge presets into params.yaml, in the order given")
    ap.add_argument("names", nargs="+", metavar="name")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    setup_logging()
    if args.command == "list":
        for name in available():
            log.info("%s: %s", name, preset_path(name))
        return
    for name in dict.fromkeys(args.names):  # each preset once; params.yaml is checked after each
        try:
            changed = apply_preset(name, args.params)
        except Products10kError as exc:
            raise SystemExit(f"error: {exc}") from exc
        log.info("applied preset '%s' to %s: %d key(s) changed", name, args.params, len(changed))
        for key in changed:
            log.info("  %s", key)


if __name__ == "__main__":
    main()
