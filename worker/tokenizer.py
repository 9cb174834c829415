"""A CLIP tokenizer built locally from a word list.

No machine here can download CLIP's vocabulary, so Lethe writes its own ``vocab.json`` and
``merges.txt`` in CLIP's byte-level BPE format: the 256 byte symbols (and their end-of-word
forms), one merge chain per domain word so that each word is a single token, and CLIP's
special tokens. ``CLIPTokenizer.from_pretrained`` loads the result unmodified.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_symbols() -> list[str]:
    # GPT-2/CLIP's reversible byte -> printable-unicode table.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_clip_tokenizer(
    folder: str | Path, words: Iterable[str], model_max_length: int = 77
) -> CLIPTokenizer:
    """Write a CLIP tokenizer whose vocabulary holds every byte and each of ``words`` whole."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab: list[str] = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    known = set(vocab)
    for word in sorted({w.lower() for w in words if w}):
        # Merge left to right: "red" -> "r e" -> "re d</w>", each result a vocab entry.
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            left, right = parts[0], parts[1]
            merged = left + right
            if f"{left} {right}" not in merges:
                merges.append(f"{left} {right}")
            if merged not in known:
                vocab.append(merged)
                known.add(merged)
            parts = [merged] + parts[2:]
    vocab += [BOS, EOS]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": model_max_length, "pad_token": EOS})
    )
    # Loading through from_pretrained reads the two files the same way on every
    # transformers version, then save_pretrained adds the fast tokenizer.json.
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


def write_clip_vocabulary(folder: str | Path, merges: Path) -> None:
    """Write CLIP's own ``vocab.json`` and ``merges.txt`` into ``folder`` from its merge list.

    CLIP's vocabulary is a function of its merges (the byte symbols, their end-of-word
    forms, each merge's result in order, then the two specials), so only the merge list
    ships (``worker/architectures/clip-merges.txt``, from OpenAI's CLIP, MIT licence).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = merges.read_text(encoding="utf-8").splitlines()
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(line.split(" ")) for line in lines[1:] if line]
    vocab += [BOS, EOS]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)},
                                                  ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
