"""Rebuild the shipped CLIP tokenizer files from OpenCLIP's BPE merge list.

The files in dreambooth/assets/clip-tokenizer/ were made with this script from
`open_clip/bpe_simple_vocab_16e6.txt.gz` (open-clip-torch wheel, MIT licence),
the same merge list OpenAI's CLIP and Stable Diffusion use. Usage:

    pip download --no-deps open-clip-torch -d /tmp/oc
    unzip -j /tmp/oc/open_clip_torch-*.whl 'open_clip/bpe_simple_vocab_16e6.txt.gz' -d /tmp/oc
    python scripts/build_clip_tokenizer.py /tmp/oc/bpe_simple_vocab_16e6.txt.gz dreambooth/assets/clip-tokenizer
"""
import gzip
import json
import sys
from pathlib import Path

NUM_MERGES = 49152 - 256 - 2  # CLIP keeps this many merges; vocab = 2*256 bytes + merges + 2 specials


def byte_alphabet() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE uses for raw bytes (GPT-2 scheme).

    Order matters for the ids: printable bytes first, in byte order, then the rest,
    each of those mapped to 256, 257, ... in byte order.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def main(bpe_gz: str, out_dir: str) -> None:
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    alphabet = byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    print(f"{len(tokens)} tokens, {len(merges)} merges -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
