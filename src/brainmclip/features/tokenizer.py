"""CLIP's byte-level BPE tokenizer, from a local model folder or built offline from open_clip's merges file.

A real model folder (a local copy of ``openai/clip-vit-large-patch14`` or its Hugging Face cache
snapshot) carries ``vocab.json`` + ``merges.txt`` and/or ``tokenizer.json``; :func:`load_clip_tokenizer`
reads it with ``local_files_only=True``. Without a folder, the same tokenizer is rebuilt from the BPE
merges that the open_clip wheel ships (``open_clip/bpe_simple_vocab_16e6.txt.gz``) following CLIP's
definition of the vocabulary, so tests and the demo never need the network.

:func:`tokenize` turns captions into the fixed ``(n, 77)`` id layout the CLIP text tower expects:
``<|startoftext|> tokens... <|endoftext|>`` then padding. Padding uses the ``<|endoftext|>`` id (49407),
as the Hugging Face openai tokenizer does (open_clip pads with 0 instead; the text tower never looks past
the first ``<|endoftext|>``, which is why :func:`tokenize` also returns that position).
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import os
from functools import lru_cache
from pathlib import Path

import torch
from transformers import CLIPTokenizer

from brainmclip.errors import InvalidInputError, MissingInputError

__all__ = ["load_clip_tokenizer", "tokenize", "build_clip_vocab", "BPE_FILE_NAME", "VOCAB_SIZE",
           "SOT_TOKEN", "EOT_TOKEN", "CONTEXT_LENGTH"]

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
_N_BYTES = 256
# CLIP keeps this many merges: the vocabulary is 256 bytes + 256 bytes with "</w>" + merges + 2 special tokens.
_N_MERGES = VOCAB_SIZE - 2 * _N_BYTES - 2  # = 49152 - 256 - 2


def _byte_to_unicode() -> list[str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters, in byte order.

    Printable latin-1 bytes map to themselves; the others (controls, space, a few latin-1 gaps) are
    shifted to code points 256, 257, ... in increasing byte order. CLIP lists the vocabulary in the
    order: printable bytes first (in byte order), then the shifted ones.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept = set(printable)
    chars = [chr(b) for b in printable]
    shifted = 0
    for b in range(_N_BYTES):
        if b not in kept:
            chars.append(chr(_N_BYTES + shifted))
            shifted += 1
    return chars


def _byte_to_char() -> dict[int, str]:
    """Byte value -> its character in :func:`_byte_to_unicode`'s map (that list is in vocabulary order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(_N_BYTES) if b not in set(printable)]
    return dict(zip(printable + others, _byte_to_unicode(), strict=True))


def _bpe_file() -> Path:
    """The gzipped BPE merges file inside the installed open_clip package (found without importing it)."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        looked = "the open_clip package (not installed)"
    else:
        candidates = [Path(folder) / BPE_FILE_NAME for folder in spec.submodule_search_locations]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        looked = ", ".join(str(c) for c in candidates)
    raise MissingInputError(
        f"CLIP BPE merges file {BPE_FILE_NAME} not found; looked in: {looked} "
        "(install open_clip_torch, or pass a model folder with vocab.json and merges.txt)"
    )


def build_clip_vocab(bpe_path: str | os.PathLike) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (token -> id, 49408 entries) and its merges, in rank order, from the gz BPE file.

    Merges are ``(left, right)`` pairs: the form the ``tokenizers`` 0.2x BPE model accepts (it rejects
    ``"left right"`` strings given as a list).
    """
    lines = gzip.decompress(Path(bpe_path).read_bytes()).decode("utf-8").split("\n")
    pairs = [tuple(line.split(" ")) for line in lines[1 : 1 + _N_MERGES]]  # line 0 is a "#version" header
    if len(pairs) != _N_MERGES or any(len(p) != 2 for p in pairs):
        raise InvalidInputError(f"{bpe_path}: expected at least {_N_MERGES} merge lines of the form 'a b' after the header")
    merges: list[tuple[str, str]] = pairs  # type: ignore[assignment]
    bytes_chars = _byte_to_unicode()
    tokens = bytes_chars + [c + "</w>" for c in bytes_chars] + [left + right for left, right in merges]
    tokens += [SOT_TOKEN, EOT_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise InvalidInputError(f"{bpe_path}: built {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab, merges


@lru_cache(maxsize=4)
def _offline_tokenizer(model_max_length: int) -> CLIPTokenizer:
    vocab, merges = build_clip_vocab(_bpe_file())
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def load_clip_tokenizer(path: str | os.PathLike | None = None, model_max_length: int = CONTEXT_LENGTH) -> CLIPTokenizer:
    """CLIP's tokenizer from the local folder ``path``, or built offline from open_clip's BPE file.

    With ``path``, only that folder is read (never the network); it must hold ``vocab.json`` and
    ``merges.txt``, or ``tokenizer.json``. Without it, the tokenizer is built once per
    ``model_max_length`` and cached: the same object is returned on later calls, so do not mutate it.
    """
    if path is None:
        return _offline_tokenizer(int(model_max_length))
    folder = Path(path).expanduser()
    has_pair = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not (has_pair or (folder / "tokenizer.json").is_file()):
        raise MissingInputError(
            f"{folder}: no CLIP tokenizer files; expected vocab.json and merges.txt, or tokenizer.json"
        )
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, model_max_length=model_max_length)


try:  # CLIP cleans captions with ftfy before tokenizing; open_clip depends on it, so it is normally present.
    import ftfy as _ftfy
except ImportError:  # pragma: no cover - depends on the environment
    _ftfy = None


def _clean(text: str) -> str:
    """CLIP's caption cleaning: ftfy (when installed), HTML unescaping twice, whitespace collapsed.

    The Hugging Face fast tokenizer only applies NFC, whitespace collapsing and lower-casing; for
    ordinary text both agree, but e.g. curly quotes, ``&amp;`` or mojibake differ. Cleaning here makes
    the ids match what CLIP was trained on. Lower-casing is left to the tokenizer's normalizer.
    """
    if _ftfy is not None:
        text = _ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split())


def tokenize(tokenizer: CLIPTokenizer, texts: list[str], context_length: int = CONTEXT_LENGTH
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(n, context_length)`` and the position of each row's ``<|endoftext|>`` token ``(n,)``.

    Rows are ``<|startoftext|>``, the caption's tokens, ``<|endoftext|>``, then padding with the
    ``<|endoftext|>`` id (49407), as the Hugging Face openai tokenizer pads. Captions too long are cut
    to ``context_length - 2`` tokens so ``<|endoftext|>`` is always the last token. ``eos_index`` is the
    first position of the ``<|endoftext|>`` id in each row: the token CLIP pools its text embedding from.
    Captions are cleaned as CLIP does (see :func:`_clean`). A caption that literally contains
    ``<|endoftext|>`` or ``<|startoftext|>`` gets the special id there, as in OpenAI's CLIP and the
    Hugging Face tokenizer (open_clip renamed its special tokens and reads such text as plain characters).
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not a single string")
    texts = list(texts)
    if context_length < 2:
        raise InvalidInputError(f"context_length={context_length} leaves no room for the start and end tokens")
    if not texts:
        return torch.empty(0, context_length, dtype=torch.long), torch.empty(0, dtype=torch.long)
    encoded = tokenizer([_clean(t) for t in texts], padding="max_length", truncation=True,
                        max_length=context_length, return_tensors="pt", return_attention_mask=False)
    input_ids = encoded["input_ids"].long()
    eos_id = tokenizer.eos_token_id
    is_eos = input_ids == eos_id
    if input_ids.shape[1] != context_length or not bool(is_eos.any(dim=1).all()):
        raise RuntimeError(f"tokenizer did not produce rows of {context_length} ids each ending with eos id {eos_id}")
    eos_index = is_eos.int().argmax(dim=1).long()
    return input_ids, eos_index


def _bpe_merges_used(word: str, ranks: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """The merges CLIP's BPE applies to one pre-tokenised word, in the order it applies them."""
    table = _byte_to_char()
    symbols = [table[b] for b in word.encode("utf-8")]
    symbols[-1] += "</w>"
    used = []
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:], strict=False))]
        pairs = [(r, i) for r, i in pairs if r is not None]
        if not pairs:
            break
        rank = min(r for r, _ in pairs)
        pair = next((symbols[i], symbols[i + 1]) for r, i in pairs if r == rank)
        used.append(pair)
        merged, i = [], 0
        while i < len(symbols):  # merge every occurrence of the pair, left to right, as BPE does
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == pair:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return used


def build_subset_vocab(words, bpe_path: str | os.PathLike | None = None
                       ) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small CLIP BPE vocabulary that tokenises ``words`` exactly as CLIP's full one does (with other ids).

    Keeps the 512 byte tokens, the merges CLIP applies to these words (in CLIP's rank order) and the two special
    tokens, so any text still tokenises (words outside ``words`` fall back to shorter pieces). BPE applies the
    lowest-ranked merge present at each step; every merge the full vocabulary applies to a listed word is kept
    and the subset has no others, so each step picks the same merge. A model with a few hundred token ids then
    needs a correspondingly small embedding table.
    """
    _, merges = build_clip_vocab(bpe_path or _bpe_file())
    ranks = {pair: r for r, pair in enumerate(merges)}
    needed: set[tuple[str, str]] = set()
    for word in words:
        if word:
            needed.update(_bpe_merges_used(word, ranks))
    kept = [pair for pair in merges if pair in needed]
    bytes_chars = _byte_to_unicode()
    tokens = bytes_chars + [c + "</w>" for c in bytes_chars] + [a + b for a, b in kept] + [SOT_TOKEN, EOT_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:  # a merge result can equal an earlier token; keep the first id
        vocab.setdefault(token, len(vocab))
    return vocab, kept


def save_tokenizer_files(folder: str | os.PathLike, vocab: dict[str, int], merges: list[tuple[str, str]],
                         model_max_length: int) -> None:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` as a CLIP model folder holds them."""
    import json

    from brainmclip.atomic import write_bytes_atomic, write_json_atomic

    folder = Path(folder)
    write_bytes_atomic(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    write_bytes_atomic(folder / "merges.txt", ("\n".join(lines) + "\n").encode("utf-8"))
    write_json_atomic(folder / "tokenizer_config.json", {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": int(model_max_length), "bos_token": SOT_TOKEN,
        "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN, "pad_token": EOT_TOKEN, "do_lower_case": True})
