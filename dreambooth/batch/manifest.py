"""A batch manifest: many subjects, each trained as a normal run directory, checked as a whole first.

    output: runs/pets            # the batch folder: batch.json, logs/, and the runs without an output
    defaults:                    # optional; every subject starts from these, its own keys win
      preset: sd15-lora
      model: runwayml/stable-diffusion-v1-5
      set: [train.steps=800]
    subjects:
      - images: photos/rex
        class_noun: dog
        name: rex                # default: the photos folder's name; names the run dir and log
      - images: photos/tom
        class_noun: cat
        identifier: zwx
        set: [train.lr=2e-4]     # after the defaults' set
        output: /data/runs/tom   # default: <batch folder>/<name>

Relative paths are read from the manifest's folder. Every problem of every subject (an unknown key,
a missing photos folder, two subjects writing one run directory, a bad `--set` value) is reported
in one ConfigError before any run starts.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dreambooth.config import RunConfig, load_config
from dreambooth.config_files import read_yaml_mapping
from dreambooth.errors import ConfigError, DreamboothError, Problem, raise_if_errors
from dreambooth.rundir import RunDir

SUBJECT_KEYS = {
    "images": "folder with the subject's photos (required)",
    "class_noun": "what the subject is, e.g. dog (required)",
    "identifier": "the rare token (default sks)",
    "name": "names the run dir under the batch folder and the log (default: the photos folder's name)",
    "model": "MODEL, overrides the preset's model.name",
    "preset": "preset name or YAML file (default sd15-full, as `dreambooth train`)",
    "steps": "training steps, overrides the preset's",
    "set": "list of group.key=value, as `dreambooth train --set`",
    "output": "the run directory (default: <batch folder>/<name>)",
}
TOP_KEYS = {"output": "the batch folder", "defaults": "subject keys every subject starts from",
            "subjects": "the list of subjects"}
DEFAULT_PRESET = "sd15-full"


@dataclass(frozen=True)
class Subject:
    index: int
    name: str
    config: RunConfig
    output: Path


@dataclass(frozen=True)
class Batch:
    manifest: Path
    folder: Path  # batch.json and logs/ live here
    subjects: list[Subject]


def read_manifest(path: str | Path, output: str | Path | None = None) -> Batch:
    """Read and check the whole manifest; `output` (the command line's) replaces its batch folder."""
    path = Path(path)
    data = read_yaml_mapping(path, "the batch manifest")
    base = path.resolve().parent
    problems = [Problem(f"{path}: {key}", f"unknown key; a manifest has: {', '.join(TOP_KEYS)}")
                for key in data if key not in TOP_KEYS]
    # a folder given on the command line is read from the working directory, the manifest's from its own
    folder = Path(output).resolve() if output else _resolve(base, data.get("output") or path.stem)
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        problems.append(Problem(f"{path}: defaults", f"{defaults!r} is not a mapping of subject keys"))
        defaults = {}
    problems += [Problem(f"{path}: defaults.{key}", _unknown_key()) for key in defaults if key not in SUBJECT_KEYS]
    entries = data.get("subjects")
    if not isinstance(entries, list) or not entries:
        problems.append(Problem(f"{path}: subjects", "missing or empty; list the subjects, each with at least "
                                "images: and class_noun:"))
        entries = []
    subjects, outputs = [], []
    for index, entry in enumerate(entries):
        subject = _read_subject(index, entry, defaults, base, folder, problems, outputs)
        if subject is not None:
            subjects.append(subject)
    problems += _duplicate_outputs(outputs)
    raise_if_errors(f"the batch manifest {path} has {len(problems)} problem(s); nothing was started",
                    problems, ConfigError)
    return Batch(path, folder, subjects)


def _read_subject(index: int, entry, defaults: dict, base: Path, folder: Path, problems: list[Problem],
                  outputs: list[tuple[int, str, Path]]) -> Subject | None:
    """The subject at `index`, or None with its problems added; its run dir is added to `outputs`
    whenever it can be told, so that two subjects writing one run dir are found among other problems."""
    where = f"subjects[{index}]"
    if not isinstance(entry, dict):
        problems.append(Problem(where, f"{entry!r} is not a mapping; give images: and class_noun:"))
        return None
    unknown = [Problem(f"{where}.{key}", _unknown_key()) for key in entry if key not in SUBJECT_KEYS]
    values = {**{k: v for k, v in defaults.items() if k in SUBJECT_KEYS}, **entry}
    values["set"] = [*_as_list(defaults.get("set")), *_as_list(entry.get("set"))]
    problems += unknown
    found = [Problem(f"{where}.{key}", f"missing: {SUBJECT_KEYS[key]}")
                       for key in ("images", "class_noun") if not values.get(key)]
    if not all(isinstance(item, str) for item in values["set"]):
        found.append(Problem(f"{where}.set", f"{values['set']!r}: give a list of group.key=value strings"))
    images = _resolve(base, values["images"]) if values.get("images") else None
    if images is not None and not images.is_dir():
        found.append(Problem(f"{where}.images", f"{images} is not a folder; check the path (relative paths are "
                             f"read from the manifest's folder {base})"))
    if images is not None:
        name = str(values.get("name") or images.name)
        output = _resolve(base, values["output"]) if values.get("output") else folder / name
        outputs.append((index, name, output))
    if found or unknown:
        problems += found
        return None
    try:
        config = load_config(values.get("preset") or DEFAULT_PRESET, _overrides(values, images), values["set"])
        RunDir(output).check_target(images)
    except DreamboothError as e:
        problems += [Problem(f"{where} ({name}): {p.where}", p.message, p.severity) for p in e.problems]
        return None
    return Subject(index, name, config, output)


def _overrides(values: dict, images: Path) -> dict:
    """The subject's own keys as config overrides, as `dreambooth train` builds them from its flags."""
    overrides = {"data": {"images": str(images), "class_noun": str(values["class_noun"]),
                          "identifier": str(values.get("identifier") or "sks")}}
    if values.get("model"):
        overrides["model"] = {"name": str(values["model"])}
    if values.get("steps") is not None:
        overrides["train"] = {"steps": values["steps"]}
    return overrides


def _duplicate_outputs(outputs: list[tuple[int, str, Path]]) -> list[Problem]:
    first: dict[Path, tuple[int, str]] = {}
    problems = []
    for index, name, output in outputs:
        key = output.resolve()
        if key in first:
            problems.append(Problem(f"subjects[{index}].output", (
                f"{output} is also the run directory of subjects[{first[key][0]}] ({first[key][1]}); "
                "give each subject its own name: or output:")))
        else:
            first[key] = (index, name)
    return problems


def _unknown_key() -> str:
    return f"unknown key; a subject has: {', '.join(SUBJECT_KEYS)}"


def _as_list(value) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _resolve(base: Path, value) -> Path:
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else base / path
