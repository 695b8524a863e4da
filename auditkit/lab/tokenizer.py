"""A word-level ``CLIPTokenizer`` for the lab world's vocabulary.

CLIP's tokenizer is byte-pair encoding: a word starts as characters (the last one carrying the
``</w>`` end-of-word suffix) and merges are applied in rank order. To make every world word one
token we write the merges ourselves: for each word, simulate BPE with the merges so far and, while
the word is still in pieces, append a merge of its first two pieces. Appended merges have the
lowest priority, so they never change words already finished. The ``tokenizers`` BPE model needs
every piece and merge result in the vocabulary, so those are included too (their embeddings are
simply never trained).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from auditkit.lab.world import VOCABULARY

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
MAX_LENGTH = 16  # longest caption is 8 words + start/end tokens


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Reference BPE on one word (same algorithm as CLIP's and the ``tokenizers`` BPE model)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(parts[:-1], parts[1:], strict=True))]
        pairs = [(r, i) for r, i in pairs if r is not None]
        if not pairs:
            break
        best = min(pairs)[0]
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and ranks.get((parts[i], parts[i + 1])) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def build_vocab_and_merges(words: Iterable[str] = VOCABULARY) -> tuple[dict[str, int], list[str]]:
    """Vocabulary (token -> id) and merges (``"a b"`` lines, by rank) making each word one token."""
    words = list(dict.fromkeys(w.lower() for w in words))
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        while len(pieces := _bpe(word, ranks)) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
    tokens: list[str] = list(SPECIAL_TOKENS) + [w + "</w>" for w in words]
    pieces_seen: list[str] = []
    for word in words:  # every initial piece
        pieces_seen += list(word[:-1]) + [word[-1] + "</w>"]
    for a, b in ranks:  # every merge input and result
        pieces_seen += [a, b, a + b]
    for piece in pieces_seen:
        if piece not in tokens:
            tokens.append(piece)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    return vocab, merges


def write_tokenizer_files(directory: str | Path, words: Iterable[str] = VOCABULARY) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` into ``directory``; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges(words)
    (directory / "vocab.json").write_text(json.dumps(vocab, indent=1))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return directory


def build_tokenizer(directory: str | Path | None = None, words: Iterable[str] = VOCABULARY):
    """A ``CLIPTokenizer`` whose vocabulary is the lab world's words (one token each).

    If ``directory`` is given, the files are written there and loaded from disk (the round trip
    a saved pipeline goes through); otherwise the tokenizer is built in memory.
    """
    from transformers import CLIPTokenizer

    if directory is not None:
        directory = write_tokenizer_files(directory, words)
        return CLIPTokenizer(vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt"),
                             model_max_length=MAX_LENGTH)
    vocab, merges = build_vocab_and_merges(words)
    pairs = [tuple(m.split(" ")) for m in merges]  # the tokenizers backend wants tuples in memory
    return CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=MAX_LENGTH)


def check_round_trip(tokenizer, words: Iterable[str] = VOCABULARY) -> list[str]:
    """Words that do *not* encode to exactly one known token and decode back (empty = all good)."""
    bad = []
    unk = tokenizer.unk_token_id
    for word in words:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == unk or tokenizer.decode(ids).strip() != word:
            bad.append(word)
    return bad
