"""Identifier checks and rare-token suggestions from the tokenizer vocabulary.

DreamBooth binds the subject to a made-up identifier ("sks"). Ruiz et al. (CVPR 2023, sec. 4.1)
ask for a *rare token*: one vocabulary entry of at most 3 characters that the text encoder has a
weak prior for. A real word ("dog", "photo") drags its meaning into the subject; an identifier that
splits into several tokens spreads the subject over pieces that each mean something already.

CLIP's BPE vocabulary is ordered by merge rank, so high token ids are the merges learned last, i.e.
the rarest ones. We suggest from the top of that range and drop anything in the offline word list
(dreambooth/assets/words, built by scripts/build_word_list.py).
"""
from __future__ import annotations

import gzip
import random
import re
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from dreambooth.errors import Problem

WORD_LIST = Path(__file__).resolve().parent / "assets" / "words" / "english.txt.gz"
END_OF_WORD = "</w>"  # CLIP BPE marks the last piece of a word with this suffix
SHORT_LETTERS = re.compile(r"[a-z]{1,3}")
# Ids at or above this are the rarest ~20% of CLIP's 49408 entries ("sks" is 48136).
RARE_ID_FLOOR = 40_000


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer these checks use (CLIPTokenizer and its fast twin)."""

    def tokenize(self, text: str) -> list[str]: ...

    def get_vocab(self) -> dict[str, int]: ...


@lru_cache(maxsize=1)
def load_word_list() -> frozenset[str]:
    """The shipped English word list, lowercase; cached because the vocabulary scan asks often."""
    with gzip.open(WORD_LIST, "rt", encoding="ascii") as f:
        return frozenset(line.strip() for line in f if line.strip())


def token_pieces(tokenizer: Tokenizer, text: str) -> list[str]:
    """BPE pieces of `text`, with the end-of-word marker removed for display."""
    return [piece.removesuffix(END_OF_WORD) for piece in tokenizer.tokenize(text)]


def check_identifier(tokenizer: Tokenizer, identifier: str, class_noun: str) -> list[Problem]:
    """Problems with `identifier` as the subject's name; errors only for unusable values.

    Warnings, not errors, for multi-token and real-word identifiers: they train, just worse, and a
    user may choose one deliberately (e.g. resuming a run that used it).
    """
    where = "identifier"
    if not identifier:
        return [Problem(where, "is empty; pick a rare token such as 'sks' (see `dreambooth token`)")]
    if any(ch.isspace() for ch in identifier):
        return [Problem(where, f"{identifier!r} contains whitespace; the identifier must be one word "
                               "(see `dreambooth token` for single-token suggestions)")]
    problems = []
    pieces = token_pieces(tokenizer, identifier)
    if len(pieces) > 1:
        problems.append(Problem(
            where,
            f"{identifier!r} splits into {len(pieces)} tokens ({' + '.join(pieces)}); a single rare "
            "token binds the subject best, run `dreambooth token` for suggestions",
            "warning"))
    if identifier.lower() in load_word_list():
        problems.append(Problem(
            where,
            f"{identifier!r} is a common English word, so the model already has a meaning for it "
            "that will mix with your subject; prefer a rare token such as 'sks'",
            "warning"))
    if identifier.strip().lower() == class_noun.strip().lower():
        problems.append(Problem(
            where,
            f"{identifier!r} equals the class noun; the prompt 'a {identifier} {class_noun}' then "
            "cannot tell your subject from its class, choose a different identifier",
            "warning"))
    return problems


def rare_candidates(tokenizer: Tokenizer, *, rare_id_floor: int = RARE_ID_FLOOR) -> list[str]:
    """Every rare single-token identifier in the vocabulary, sorted by token id.

    A candidate is a whole-word entry ("xyz</w>") of 1-3 letters a-z with id >= `rare_id_floor`,
    not in the word list, and one token when typed alone (so it stays one token in a prompt).
    """
    words = load_word_list()
    found = []
    for entry, token_id in tokenizer.get_vocab().items():
        text = entry.removesuffix(END_OF_WORD)
        if (token_id < rare_id_floor or not entry.endswith(END_OF_WORD)
                or not SHORT_LETTERS.fullmatch(text) or text in words):
            continue
        if tokenizer.tokenize(text) == [entry]:
            found.append((token_id, text))
    return [text for _, text in sorted(found)]


def suggest_identifiers(tokenizer: Tokenizer, count: int = 10, *, seed: int = 0) -> list[str]:
    """`count` rare single-token identifiers, drawn deterministically from `rare_candidates`.

    Sampling (rather than taking the top ids) keeps suggestions varied across seeds, so a team
    training many subjects can give each its own identifier.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    candidates = rare_candidates(tokenizer)
    return random.Random(seed).sample(candidates, min(count, len(candidates)))
