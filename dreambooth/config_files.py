"""The YAML side of configuration: the shipped presets, YAML mappings and `--set group.key=value`.

These produce plain nested dicts; `config.build_config` type-checks and validates them.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from dreambooth.errors import ConfigError, Problem

PRESET_DIR = Path(__file__).resolve().parent / "configs"


def read_preset(preset: str | Path) -> dict:
    path = Path(preset)
    if not path.exists():
        path = PRESET_DIR / f"{preset}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown preset {preset!r}",
                          [Problem(str(preset), f"use a YAML file or one of: {', '.join(list_presets())}")])
    return read_yaml_mapping(path, "the preset")


def read_yaml_mapping(path: Path, what: str) -> dict:
    """A YAML file of `group: {key: value}`; unreadable, malformed or non-mapping YAML is a ConfigError."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {what} {path}", [Problem(str(path), str(e))]) from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{what} {path} is not valid YAML", [Problem(str(path), (
            f"{getattr(e, 'problem', None) or e}{where}; fix the file, or start a new run if it was "
            "damaged"))]) from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} is not a mapping", [Problem(str(path), (
            f"holds a {type(data).__name__}; expected groups such as 'train:' with 'key: value' lines"))])
    return data


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def parse_dotted(items, problems: list[Problem]) -> dict:
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        group, dot, name = key.strip().partition(".")
        if not sep or not dot:
            problems.append(Problem(item, "use --set group.key=value, e.g. train.lr=1e-5"))
            continue
        try:
            out.setdefault(group, {})[name] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            problems.append(Problem(key.strip(), f"{raw!r} is not a valid value; quote it or fix the brackets"))
    return out
