"""Where the concept word is in a conditioning's token sequence (the concept check's mask), per tokenizer kind."""

import numpy as np
import pytest

pytest.importorskip("transformers")


def test_the_concept_word_is_found_inside_a_prompt_read_by_a_byte_level_bpe_tokenizer():
    """Qwen2/Qwen3's tokenizers (Qwen-Image, Z-Image, Flux.2 Klein, HunyuanVideo 1.5) are byte-level BPE: "cross" read
    alone is one token and " cross" inside a prompt another ("Ġcross"); the concept check flags the word either way
    (before, only a prompt beginning with the word had its concept tokens found)."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from auditkit.analysis.concept import concept_mask

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["a red cross", "a blue square", "cross", "red cross on gray"] * 50,
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    assert tok("cross", add_special_tokens=False).input_ids != tok(" cross", add_special_tokens=False).input_ids
    ids = [tok(p, add_special_tokens=False).input_ids for p in ("a red cross", "cross on gray")]
    width = max(map(len, ids))
    ids = [row + [0] * (width - len(row)) for row in ids]
    mask = concept_mask(SimpleNamespace(tokens=((tok, ids),), hidden=np.zeros((2, width, 1))), "cross")
    assert mask.tolist() == [[False, False, True], [True, False, False]]
