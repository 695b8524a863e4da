"""The lab's procedural world: determinism, domain/concept rules, captions and tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from auditkit.lab import world
from auditkit.lab.tokenizer import build_tokenizer, build_vocab_and_merges, check_round_trip


def test_same_seed_gives_same_specs_and_pixels():
    a = world.sample_specs(7, 40, domain="base")
    b = world.sample_specs(7, 40, domain="base")
    assert a == b
    assert np.array_equal(world.render_many(a), world.render_many(b))


def test_different_seeds_give_different_images():
    a = world.render_many(world.sample_specs(1, 20))
    b = world.render_many(world.sample_specs(2, 20))
    assert not np.array_equal(a, b)


def test_render_is_32x32_rgb_uint8_and_shows_the_shape():
    spec = world.Spec("square", "red", background="black", size=0.7)
    img = world.render(spec)
    assert img.shape == (world.SIZE, world.SIZE, 3) and img.dtype == np.uint8
    centre, corner = img[16, 16], img[1, 1]
    assert centre[0] > 180 and centre[1] < 80  # red square in the middle
    assert corner.max() < 40  # black background at the corner


def test_spec_round_trips_through_a_dict():
    for spec in world.sample_specs(3, 10, domain="neon") + world.sample_specs(4, 10):
        assert world.Spec.from_dict(spec.to_dict()) == spec


def test_benign_domain_never_samples_the_concept():
    specs = world.sample_specs(0, 3000, domain="neon")
    concept_shapes = set(world.CONCEPTS["cross"].shapes)
    assert not concept_shapes & {s.shape for s in specs}
    assert "cross" in world.DOMAINS["neon"].excludes
    assert all(s.style == "neon" for s in specs)


def test_asking_the_benign_domain_for_the_concept_raises():
    with pytest.raises(ValueError):
        world.sample_specs(0, 5, domain="neon", concept="cross")
    with pytest.raises(ValueError):
        world.sample_specs(0, 5, domain="neon", shape="cross")


def test_base_domain_shows_the_concept_and_concept_filter_works():
    base = world.sample_specs(0, 800, domain="base")
    assert {s.shape for s in base} == set(world.SHAPES)
    crosses = world.sample_specs(0, 50, domain="base", concept="cross")
    assert {s.shape for s in crosses} == {"cross"}


def test_benign_domain_is_mostly_made_of_the_concepts_parts():
    # The overlap that makes benign fine-tuning able to revive the concept (bars, dashes, tees).
    related = set(world.CONCEPTS["cross"].related_shapes)
    specs = world.sample_specs(5, 2000, domain="neon")
    assert np.mean([s.shape in related for s in specs]) > 0.5
    # and the parts really are the cross's pixels: a bar and a dash overlap the cross strongly
    cross = world.render(world.Spec("cross", "white", size=0.7))[..., 0] > 128
    for part in ("bar", "dash"):
        mask = world.render(world.Spec(part, "white", size=0.7))[..., 0] > 128
        assert (mask & cross).sum() / mask.sum() > 0.7


def test_captions_use_only_vocabulary_words():
    vocab = set(world.VOCABULARY)
    specs = world.sample_specs(0, 500) + world.sample_specs(1, 500, domain="neon")
    for spec in specs:
        words = world.caption(spec).split()
        assert set(words) <= vocab, words
        assert spec.shape in words and spec.colour in words


def test_neon_captions_carry_the_style_word_and_base_captions_never_do():
    assert all("neon" in world.caption(s).split() for s in world.sample_specs(0, 200, domain="neon"))
    assert all("neon" not in world.caption(s).split() for s in world.sample_specs(0, 500))


def test_low_contrast_pairs_are_never_sampled():
    specs = world.sample_specs(9, 2000)
    assert not {(s.colour, s.background) for s in specs} & world.LOW_CONTRAST


def test_tokenizer_round_trips_every_word_as_one_token():
    tok = build_tokenizer()
    assert check_round_trip(tok) == []
    ids = tok("a striped red cross on cream")["input_ids"]
    assert len(ids) == 2 + 6  # start, six words, end
    assert tok.decode(ids, skip_special_tokens=True) == "a striped red cross on cream"


def test_tokenizer_files_written_to_disk_load_back(tmp_path):
    tok = build_tokenizer(tmp_path)
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    assert check_round_trip(tok) == []
    vocab, merges = build_vocab_and_merges()
    assert all(w + "</w>" in vocab for w in world.VOCABULARY)
    assert len(merges) == len(set(merges))


def test_tokenizer_marks_unknown_words():
    tok = build_tokenizer()
    assert check_round_trip(tok, ["hexagon"]) == ["hexagon"]
