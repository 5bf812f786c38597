"""Build dreambooth/assets/words/english.txt.gz, the offline word list behind identifier checks.

Why: `dreambooth token` must never suggest a real word (the text encoder already has a meaning for
it, Ruiz et al. sec. 4.1), and `check` warns when the chosen identifier is one. The runtime reads
only the gzipped list this script writes; it never imports the source below.

Source: SCOWL (Spell Checker Oriented Word Lists) by Kevin Atkinson, as shipped by Debian's
`wamerican` package, version 2020.12.07-2 (`apt-get install wamerican`, file
/usr/share/dict/american-english, size-50 list: common words, names and acronyms).
Licence: SCOWL's permissive licence (copyright Kevin Atkinson and the list authors; use, copy,
modify, distribute and sell permitted provided the notice is kept). The notice is reproduced in
dreambooth/assets/words/README.md.

Processing: lowercase every entry (so names and acronyms such as "TV" or "NASA" count too), drop
possessives, keep entries of letters a-z only, add EXTRA_WORDS below (the project's own additions:
internet and tech abbreviations the text encoder knows well but a spell-checker list lacks, and a
few slurs and profanity spellings that must never be suggested). Output is sorted, one word a line,
gzipped with a fixed mtime so rebuilding gives the same bytes.

Usage: python scripts/build_word_list.py [--source /usr/share/dict/american-english]
"""
from __future__ import annotations

import argparse
import gzip
import re
from pathlib import Path

OUTPUT = Path(__file__).resolve().parents[1] / "dreambooth" / "assets" / "words" / "english.txt.gz"
WORD = re.compile(r"[a-z]+")

# Abbreviations a captioned-image corpus uses often; SCOWL (a spell-checker list) lacks them.
EXTRA_WORDS = """
ai api app ar aka asap bff brb bts cgi cpu css diy dj dslr fml fps fyi gif gpu hdr html idk imo
ios jpg kpop lmao lol mmo nft nsfw ok omg ootd pc png rgb rip rofl rpg smh ssd svg tbh ui url
usb ux vfx vr wtf xyz yolo
fck fuk fuq kkk nig jap
""".split()


def read_words(source: Path) -> set[str]:
    """Lowercased a-z entries of the source list, possessives removed."""
    words = set()
    for line in source.read_text(encoding="utf-8").splitlines():
        entry = line.strip().lower()
        if entry.endswith("'s"):
            entry = entry[:-2]
        if WORD.fullmatch(entry):
            words.add(entry)
    return words


def write_gzip(words: set[str], output: Path) -> None:
    """Write the sorted list gzipped with mtime 0, so rebuilds are byte-identical."""
    data = "".join(f"{w}\n" for w in sorted(words)).encode("ascii")
    with open(output, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        gz.write(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("/usr/share/dict/american-english"))
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    words = read_words(args.source) | set(EXTRA_WORDS)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_gzip(words, args.output)
    print(f"wrote {len(words)} words to {args.output} ({args.output.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
