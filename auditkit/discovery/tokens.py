"""Prompts given as token ids, read through a pipeline's own prompt encoding.

The token sweep reads every token of a vocabulary, also the pieces of words that no text spells alone
("tri" of "trisk"), so it cannot go through text. :func:`pinned` swaps each tokenizer of a pipeline for a
:class:`PinnedTokens` that reads some placeholder prompts as fixed token ids (special tokens added the
tokenizer's own way) and everything else as the tokenizer would, so the family's own encoding
(:func:`auditkit.models.pipeline.encode`: ``encode_prompt``, penultimate layers, pooled outputs) runs
unchanged. Tokenizers of another vocabulary (T5 beside CLIP) read the token's text instead.

``short``: pinned prompts are padded to the longest in the batch, not to the pipeline's length; exact for
causal encoders (CLIP: a position never sees the positions after it), an approximation for T5 (bidirectional,
and read without an attention mask by SD3 and Flux: a pinned T5 prompt is the token and ``</s>``, not padded to
256 or 512 positions). It keeps a T5 vocabulary's sweep short too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")


class PinnedTokens:
    """A tokenizer that reads the prompts in ``pinned`` (placeholder -> token ids, or -> text) as given."""

    def __init__(self, tokenizer, pinned: dict[str, list[int] | str], short: bool = True):
        self._tokenizer, self._pinned, self._short = tokenizer, pinned, short

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __len__(self) -> int:
        return len(self._tokenizer)

    def tokenize(self, text, **kwargs) -> list[str]:
        """A pinned prompt's tokens (diffusers' textual-inversion check tokenizes each prompt), others as usual."""
        value = self._pinned.get(text) if isinstance(text, str) else None
        if value is None or isinstance(value, str):
            return self._tokenizer.tokenize(text if value is None else value, **kwargs)
        return self._tokenizer.convert_ids_to_tokens(list(value))

    def __call__(self, text, padding=False, max_length=None, truncation=None, return_tensors=None, **kwargs):
        texts = [text] if isinstance(text, str) else list(text)
        if not any(t in self._pinned for t in texts):
            return self._tokenizer(text, padding=padding, max_length=max_length, truncation=truncation,
                                   return_tensors=return_tensors, **kwargs)
        tok = self._tokenizer
        rows = []
        for t in texts:
            value = self._pinned.get(t, t)
            if isinstance(value, str):
                rows.append(tok(value, truncation=bool(truncation), max_length=max_length).input_ids)
            else:
                head, tail = special_tokens(tok)
                rows.append(head + list(value) + tail)
        if truncation and max_length:
            rows = [r if len(r) <= max_length else r[: max_length - 1] + r[-1:] for r in rows]
        width = max(len(r) for r in rows)
        if padding == "max_length" and max_length and not self._short:
            width = max_length
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = [r + [pad] * (width - len(r)) for r in rows]
        mask = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
        from transformers import BatchEncoding

        return BatchEncoding({"input_ids": ids, "attention_mask": mask}, tensor_type=return_tensors)


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """(the ids a tokenizer puts before a prompt's tokens, those after): CLIP's start and end, T5's end."""
    content = tokenizer("a", add_special_tokens=False).input_ids
    full = tokenizer("a").input_ids
    k = next(i for i in range(len(full)) if full[i: i + len(content)] == content)
    return full[:k], full[k + len(content):]


def sequence_tokenizers(pipe) -> list[str]:
    """The pipeline's tokenizer attributes whose tokens the denoiser reads as a sequence, one per vocabulary
    (SD/SDXL: ``tokenizer``; SD3: CLIP's and T5's; Flux: T5's)."""
    from auditkit.models.pipeline import encode

    cond = encode(pipe, [""])
    seen, out = [], []
    for tokenizer, _ in cond.tokens:
        if tokenizer is None:
            continue
        attr = next(a for a in TOKENIZERS if getattr(pipe, a, None) is tokenizer)
        vocab = tokenizer.get_vocab()
        if vocab not in seen:
            seen.append(vocab)
            out.append(attr)
    return out


def sweepable_ids(tokenizer) -> list[int]:
    """Every id of the vocabulary but the special tokens (start, end, padding, unknown)."""
    special = set(tokenizer.all_special_ids)
    return [i for i in sorted(set(tokenizer.get_vocab().values())) if i not in special]


@contextlib.contextmanager
def pinned(pipe, swept: str, prompts: dict[str, list[int]], short: bool = True) -> Iterator[None]:
    """Within, ``pipe``'s tokenizers read each placeholder of ``prompts`` as its ids (the tokenizer ``swept``
    and those of the same vocabulary) or as the ids' text (the others)."""
    source = getattr(pipe, swept)
    vocab = source.get_vocab()
    texts = {p: source.decode(ids).strip() for p, ids in prompts.items()}
    saved = {}
    try:
        for attr in TOKENIZERS:
            tok = getattr(pipe, attr, None)
            if tok is None:
                continue
            same = tok is source or tok.get_vocab() == vocab
            saved[attr] = tok
            # past DiffusionPipeline.__setattr__, which would re-register the component in the pipeline's config
            object.__setattr__(pipe, attr, PinnedTokens(tok, prompts if same else texts, short))
        yield
    finally:
        for attr, tok in saved.items():
            object.__setattr__(pipe, attr, tok)
