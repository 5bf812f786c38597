"""Prompts: placeholder filling (the one rule every command uses), the DreamBooth benchmark lists,
user prompt files, and the class version of a prompt that CLIP-T scores against.

Ruiz et al. (CVPR 2023, sec. 4.1) evaluate each subject on 25 prompts: one list for objects
(mostly recontextualization and property changes) and one for live subjects (dogs and cats, which
also get accessorization prompts such as outfits and hats). Templates use `{0}` for the unique
identifier and `{1}` for the class noun, as in the benchmark's `prompts_and_classes.txt`; the
exported lists use the tool's own `{identifier}` and `{class}` placeholders.
"""
from __future__ import annotations

import re
from pathlib import Path

from dreambooth.errors import ConfigError, Problem, raise_if_errors

# Benchmark data, not code: the 25 object prompts and 25 live-subject prompts of the DreamBooth
# dataset, google/dreambooth `dataset/prompts_and_classes.txt` (Ruiz et al., CVPR 2023; CC-BY 4.0).
# Both lists open with the same 10 recontextualization prompts and close with the same 5
# property-modification prompts; in between, objects get 10 more contexts and live subjects
# 10 accessorization prompts. Order as in the source file.
_SHARED_CONTEXTS = (
    "a {0} {1} in the jungle",
    "a {0} {1} in the snow",
    "a {0} {1} on the beach",
    "a {0} {1} on a cobblestone street",
    "a {0} {1} on top of pink fabric",
    "a {0} {1} on top of a wooden floor",
    "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background",
    "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest",
)
_OBJECT_CONTEXTS = (
    "a {0} {1} with a wheat field in the background",
    "a {0} {1} with a tree and autumn leaves in the background",
    "a {0} {1} with the Eiffel Tower in the background",
    "a {0} {1} floating on top of water",
    "a {0} {1} floating in an ocean of milk",
    "a {0} {1} on top of green grass with sunflowers around it",
    "a {0} {1} on top of a mirror",
    "a {0} {1} on top of the sidewalk in a crowded street",
    "a {0} {1} on top of a dirt road",
    "a {0} {1} on top of a white rug",
)
_LIVE_ACCESSORIES = (
    "a {0} {1} wearing a red hat",
    "a {0} {1} wearing a santa hat",
    "a {0} {1} wearing a rainbow scarf",
    "a {0} {1} wearing a black top hat and a monocle",
    "a {0} {1} in a chef outfit",
    "a {0} {1} in a firefighter outfit",
    "a {0} {1} in a police outfit",
    "a {0} {1} wearing pink glasses",
    "a {0} {1} wearing a yellow shirt",
    "a {0} {1} in a purple wizard outfit",
)
_PROPERTIES = (
    "a red {0} {1}",
    "a purple {0} {1}",
    "a shiny {0} {1}",
    "a wet {0} {1}",
    "a cube shaped {0} {1}",
)


def _user_placeholders(templates: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(t.format("{identifier}", "{class}") for t in templates)


OBJECT_PROMPTS: tuple[str, ...] = _user_placeholders(_SHARED_CONTEXTS + _OBJECT_CONTEXTS + _PROPERTIES)
LIVE_SUBJECT_PROMPTS: tuple[str, ...] = _user_placeholders(_SHARED_CONTEXTS + _LIVE_ACCESSORIES + _PROPERTIES)

# The 30 benchmark subjects and their class nouns (same source file): subject folder -> class.
BENCHMARK_CLASSES: dict[str, str] = {
    "backpack": "backpack", "backpack_dog": "backpack", "bear_plushie": "stuffed animal",
    "berry_bowl": "bowl", "can": "can", "candle": "candle", "cat": "cat", "cat2": "cat",
    "clock": "clock", "colorful_sneaker": "sneaker", "dog": "dog", "dog2": "dog", "dog3": "dog",
    "dog5": "dog", "dog6": "dog", "dog7": "dog", "dog8": "dog", "duck_toy": "toy",
    "fancy_boot": "boot", "grey_sloth_plushie": "stuffed animal", "monster_toy": "toy",
    "pink_sunglasses": "glasses", "poop_emoji": "toy", "rc_car": "toy", "red_cartoon": "cartoon",
    "robot_toy": "toy", "shiny_sneaker": "sneaker", "teapot": "teapot", "vase": "vase",
    "wolf_plushie": "stuffed animal",
}

# The paper's live classes: the 9 live subjects of the benchmark are dogs and cats.
PAPER_LIVE_CLASSES: frozenset[str] = frozenset({"dog", "cat"})

# Our extension (not from the paper): other nouns for which outfit and hat prompts make sense,
# so that "a sks man" or "a sks puppy" gets the live-subject list.
EXTRA_LIVE_CLASSES: frozenset[str] = frozenset({
    "puppy", "kitten", "person", "man", "woman", "boy", "girl", "child", "baby", "horse",
    "rabbit", "bunny", "bird", "parrot", "hamster", "guinea pig", "ferret", "pig", "cow",
    "goat", "sheep", "monkey", "bear", "fox", "lion", "tiger", "animal", "pet",
})

LIVE_CLASSES: frozenset[str] = PAPER_LIVE_CLASSES | EXTRA_LIVE_CLASSES

USER_PLACEHOLDERS = ("identifier", "class")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def fill_prompt(template: str, identifier: str, class_noun: str) -> str:
    """Replace `{identifier}` and `{class}` in a prompt; any other text, braces included, stays."""
    return template.replace("{identifier}", identifier).replace("{class}", class_noun)


def fill_from_run_info(prompt: str, info: dict | None) -> str:
    """`fill_prompt` with a run's identifier and class noun (`info`: its dreambooth.json, or None
    for a plain model, where a prompt with placeholders is an error)."""
    if "{identifier}" not in prompt and "{class}" not in prompt:
        return prompt
    if info is None:
        raise ConfigError("prompt has placeholders but MODEL is not a run directory", [
            Problem(prompt, "write the identifier and class noun out, or pass a run directory as --model")])
    return fill_prompt(prompt, info["identifier"], info["class_noun"])


def is_live_class(class_noun: str) -> bool:
    """True when the class noun names a live subject, which gets accessorization prompts."""
    return class_noun.strip().lower() in LIVE_CLASSES


def prompts_for(identifier: str, class_noun: str) -> list[str]:
    """The benchmark's 25 prompts for this subject: the live list for live classes, else objects.

    Ruiz et al. sec. 4.1: live subjects get outfit/accessory prompts instead of some of the
    recontextualization prompts that objects get.
    """
    templates = LIVE_SUBJECT_PROMPTS if is_live_class(class_noun) else OBJECT_PROMPTS
    return [fill_prompt(t, identifier, class_noun) for t in templates]


def class_prompt(class_noun: str) -> str:
    """The plain class prompt, "a dog": what the paper's PRES images and class images use."""
    return f"a {class_noun}"


def class_prompt_for(prompt: str, identifier: str, class_noun: str) -> str:
    """The prompt with the identifier replaced by the class noun, for CLIP-T.

    CLIP has no meaning for "sks", so CLIP-T scores the image against the class version of the
    prompt: "a sks dog on the moon" -> "a dog on the moon"; "a photo of sks" -> "a photo of dog".
    """
    ident = re.escape(identifier)
    noun = re.escape(class_noun)
    text = re.sub(rf"(?<!\w){ident}\s+(?={noun}(?!\w))", "", prompt)  # "sks dog" -> "dog"
    text = re.sub(rf"(?<!\w){ident}(?!\w)", class_noun, text)  # a bare "sks" -> "dog"
    return " ".join(text.split())


def _placeholder_problems(line: str, where: str) -> list[Problem]:
    """Problems with one user prompt line: unknown placeholders, or no `{identifier}`."""
    names = _PLACEHOLDER.findall(line)
    problems = [
        Problem(where, f"unknown placeholder {{{n}}}; use {{identifier}} and {{class}} only")
        for n in names if n not in USER_PLACEHOLDERS
    ]
    if "identifier" not in names:
        problems.append(Problem(where, "no {identifier}: the prompt would not show the subject"))
    return problems


def read_prompt_lines(path: Path | str) -> list[tuple[int, str]]:
    """(line number, prompt) of a prompt file: one per line, blank lines and `#` comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("Prompt file not found", [Problem(str(path), "no such file; expected a text file, "
                                                             "one prompt per line")])
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    return [(i, ln) for i, ln in enumerate(lines, 1) if ln and not ln.startswith("#")]


def read_prompt_file(path: Path | str, identifier: str, class_noun: str) -> list[str]:
    """A user's evaluation prompts, one per line, with `{identifier}` and `{class}` filled in.

    Blank lines and lines starting with `#` are skipped. Every bad line is reported at once.
    """
    numbered = read_prompt_lines(path)
    problems = [p for i, ln in numbered for p in _placeholder_problems(ln, f"{path}:{i}")]
    if not numbered:
        problems.append(Problem(str(path), "no prompts found; write one prompt per line"))
    raise_if_errors(f"Cannot use prompt file {path}", problems, ConfigError)
    return [fill_prompt(ln, identifier, class_noun) for _, ln in numbered]
