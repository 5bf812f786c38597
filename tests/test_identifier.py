"""Identifier checks and rare-token suggestions, on the real CLIP tokenizer shipped in assets."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from dreambooth import identifier as ident
from dreambooth.identifier import check_identifier, load_word_list, suggest_identifiers

TOKENIZER_DIR = Path(ident.__file__).resolve().parent / "assets" / "clip-tokenizer"


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR)


def warnings_of(problems) -> list[str]:
    return [p.message for p in problems if p.severity == "warning"]


def test_tokenizer_is_the_real_clip_vocabulary(tokenizer: CLIPTokenizer) -> None:
    assert tokenizer("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]


def test_sks_is_the_clean_classic(tokenizer: CLIPTokenizer) -> None:
    # "sks" is one rare token (id 48136) and not in the shipped word list (SCOWL has no entry for
    # it), so the classic DreamBooth identifier draws no warning at all.
    assert "sks" not in load_word_list()
    assert check_identifier(tokenizer, "sks", "dog") == []


def test_multi_token_identifier_warns_with_count_and_pieces(tokenizer: CLIPTokenizer) -> None:
    assert tokenizer.tokenize("xyzq") == ["xy", "z", "q</w>"]
    [message] = warnings_of(check_identifier(tokenizer, "xyzq", "dog"))
    assert "3 tokens" in message and "xy + z + q" in message


@pytest.mark.parametrize("word", ["dog", "photo", "Photo"])
def test_common_word_warns(tokenizer: CLIPTokenizer, word: str) -> None:
    messages = warnings_of(check_identifier(tokenizer, word, "cat"))
    assert any("common English word" in m for m in messages)


def test_identifier_equal_to_class_noun_warns(tokenizer: CLIPTokenizer) -> None:
    messages = warnings_of(check_identifier(tokenizer, "Dog", "dog"))
    assert any("equals the class noun" in m for m in messages)
    assert any("common English word" in m for m in messages)  # both reasons are reported
    assert warnings_of(check_identifier(tokenizer, "zwx", "zwx")) != []


@pytest.mark.parametrize("bad", ["", "sks dog", "sks\t", " sks"])
def test_empty_or_whitespace_is_an_error(tokenizer: CLIPTokenizer, bad: str) -> None:
    [problem] = check_identifier(tokenizer, bad, "dog")
    assert problem.severity == "error" and problem.where == "identifier"


def test_word_list_is_compact_and_lowercase() -> None:
    words = load_word_list()
    assert ident.WORD_LIST.stat().st_size < 500_000
    assert len(words) > 50_000 and {"dog", "photo", "cat", "tv", "lol"} <= words
    assert all(re.fullmatch("[a-z]+", w) for w in words)


def test_suggestions_are_rare_single_short_non_words(tokenizer: CLIPTokenizer) -> None:
    suggestions = suggest_identifiers(tokenizer, 25, seed=3)
    assert len(suggestions) == len(set(suggestions)) == 25
    vocab, words = tokenizer.get_vocab(), load_word_list()
    for word in suggestions:
        assert re.fullmatch("[a-z]{1,3}", word)
        assert word not in words
        assert tokenizer.tokenize(word) == [word + "</w>"]  # one end-of-word token
        assert len(tokenizer(f"a photo of {word} dog").input_ids) == 7  # still one token in a prompt
        assert vocab[word + "</w>"] >= ident.RARE_ID_FLOOR
        assert check_identifier(tokenizer, word, "dog") == []


def test_suggestions_are_deterministic_by_seed(tokenizer: CLIPTokenizer) -> None:
    first = suggest_identifiers(tokenizer, 10, seed=0)
    assert first == suggest_identifiers(tokenizer, 10, seed=0)
    assert first != suggest_identifiers(tokenizer, 10, seed=1)
    assert suggest_identifiers(tokenizer, 0) == []
    with pytest.raises(ValueError):
        suggest_identifiers(tokenizer, -1)


def test_candidates_exclude_listed_words_and_abbreviations(tokenizer: CLIPTokenizer) -> None:
    candidates = set(ident.rare_candidates(tokenizer))
    assert len(candidates) > 100
    assert "sks" in candidates  # the classic is itself a valid rare token
    assert not candidates & {"fck", "jap", "tux"}  # high-id entries that are words or never OK
