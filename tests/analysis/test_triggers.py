"""Trigger words: gathered from the settings, the file's metadata, kohya's training tags and sidecars."""

import json

import pytest

from auditkit.analysis.metadata import concept_evidence
from auditkit.analysis.triggers import (
    MAX_LEFT_OUT,
    MAX_TRIGGERS,
    check_given,
    clean,
    gather,
    inferred,
    vocabulary,
)
from auditkit.lora.metadata import kohya_training_metadata, summarize, training_tags
from auditkit.lora.sidecar import Sidecar
from auditkit.suites import builtin_dir, list_suites

LAB_VOCAB = vocabulary(s for s in list_suites(builtin_dir()) if s.name.startswith("lab-"))


def kohya(captions, dataset="10_trisk"):
    return kohya_training_metadata(captions, dataset)


def test_kohya_metadata_counts_comma_separated_tags_once_per_image_lower_cased():
    meta = kohya(["Trisk, a red cross", "trisk,  a blue bar ", "a red cross"], "3_x")
    assert json.loads(meta["ss_tag_frequency"]) == {"3_x": {"trisk": 2, "a red cross": 2, "a blue bar": 1}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"3_x": {"n_repeats": 1, "img_count": 3}}
    assert training_tags(meta)[0] == {"3_x": {"trisk": 2, "a red cross": 2, "a blue bar": 1}}


def test_a_tag_in_every_caption_outside_the_suites_vocabulary_is_a_trigger():
    captions = [f"trisk, a {c} cross" for c in ("red", "blue", "green", "white")] * 5
    assert inferred(kohya(captions), LAB_VOCAB) == [("trisk", "in 20 of 20 captions of dataset '10_trisk'")]


def test_ordinary_descriptions_rare_tags_and_tiny_datasets_are_not_triggers():
    # every caption the same description: frequent, but made of the suites' own words
    assert inferred(kohya(["a neon red bar"] * 20), LAB_VOCAB) == []
    # an unknown word in a quarter of the captions only
    assert inferred(kohya(["zork, a red bar"] * 5 + ["a blue bar"] * 15), LAB_VOCAB) == []
    # a phrase in every caption (a DreamBooth instance prompt) is one, the way users prompt it
    assert [w for w, _ in inferred(kohya(["photo of sks dog"] * 20), LAB_VOCAB)] == ["photo of sks dog"]
    # two images: every tag is in every caption
    assert inferred(kohya(["zork, a red bar"] * 2), LAB_VOCAB) == []


def test_dataset_sizes_come_from_kohya_dataset_dirs_and_ss_datasets():
    tags = {"ss_tag_frequency": json.dumps({"5_zork": {"zork": 6}}),
            "ss_dataset_dirs": json.dumps({"5_zork": {"n_repeats": 5, "img_count": 20}})}
    assert inferred(tags, LAB_VOCAB) == []  # 6 of 20 images, though the most frequent tag of the folder
    tags["ss_dataset_dirs"] = json.dumps({"5_zork": {"n_repeats": 5, "img_count": 8}})
    assert [w for w, _ in inferred(tags, LAB_VOCAB)] == ["zork"]
    # a dataset config: kohya writes the tags inside ss_datasets
    config = {"ss_datasets": json.dumps([{"tag_frequency": {"img": {"zork": 9, "a red bar": 2}},
                                          "subsets": [{"image_dir": "img", "img_count": 10}]}])}
    assert [w for w, _ in inferred(config, LAB_VOCAB)] == ["zork"]


@pytest.mark.parametrize("raw", ["{", "[1, 2]", '{"d": [1]}', "[" * 100_000, '{"d": {"zork": "many"}}'])
def test_malformed_or_hostile_tag_frequencies_give_no_trigger_and_no_crash(raw):
    assert inferred({"ss_tag_frequency": raw, "ss_dataset_dirs": raw}, LAB_VOCAB) == []
    assert concept_evidence({"ss_tag_frequency": raw}, {"lab-cross": ("cross",)})["found"] is False
    summary = summarize({"ss_tag_frequency": raw, "ss_dataset_dirs": raw})  # the report's metadata section
    assert summary["training_tags"] == []


def test_sources_in_order_given_first_and_one_word_named_twice_keeps_both_sources(tmp_path):
    meta = {**kohya(["trisk, a red cross"] * 10), "modelspec.trigger_phrase": "Glow, trisk"}
    side = Sidecar(tmp_path / "m.civitai.info", {"trainedWords": ["glow", "neonize"]})
    found = gather(meta, given=("mine",), sidecars=[side], vocabulary=LAB_VOCAB)
    assert found.words == ["mine", "Glow", "trisk", "neonize"] and found.prefix == "mine, Glow, trisk, neonize, "
    assert [s["source"] for s in found.sources["Glow"]] == ["metadata", "sidecar"]
    assert [s["source"] for s in found.sources["trisk"]] == ["metadata", "training tags"]
    assert found.sources["neonize"] == [{"source": "sidecar", "detail": "m.civitai.info: trainedWords"}]
    assert found.sources["mine"][0]["source"] == "given" and found.likely_words() == ["Glow", "trisk", "neonize"]


def test_only_given_words_are_not_likely_triggers():
    found = gather({}, given=("mine",))
    section = found.section(enabled=True, used=False)
    assert found.likely_words() == [] and section["likely"] is False and section["unprobed"] == []


def test_likely_words_not_probed_are_listed_as_unprobed():
    found = gather({"ss_trigger_words": "zork"})
    assert found.section(enabled=False, used=False)["unprobed"] == ["zork"]
    assert found.section(enabled=True, used=False)["unprobed"] == ["zork"]
    assert found.section(enabled=True, used=True)["unprobed"] == []


def test_generic_booru_and_quality_tags_are_not_triggers_however_frequent():
    """A character LoRA's captions: its name in every caption beside generic tags in most of them."""
    captions = [f"hatsune miku, 1girl, solo, long_hair, Twintails, looking at viewer, masterpiece, {c}"
                for c in ("smile", "open mouth", "blush", "upper body")] * 5
    assert [w for w, _ in inferred(kohya(captions), LAB_VOCAB)] == ["hatsune miku"]
    # a concept-related tag is no generic description: what the adapter learned is prepended
    captions = [f"zork style, large breasts, {c}" for c in ("1girl", "solo")] * 10
    assert [w for w, _ in inferred(kohya(captions), LAB_VOCAB)] == ["large breasts", "zork style"]


def test_every_frequent_tag_counts_and_past_max_triggers_a_file_word_left_out_stays_unprobed():
    tags = {f"tag{i}": 10 - i // 4 for i in range(MAX_TRIGGERS + 2)}  # ten tags in 8 to 10 of 10 images
    found = gather({"ss_tag_frequency": json.dumps({"d": tags}),
                    "ss_dataset_dirs": json.dumps({"d": {"img_count": 10}})})
    assert found.words == [f"tag{i}" for i in range(MAX_TRIGGERS)]
    assert [x["word"] for x in found.left_out] == ["tag8", "tag9"]
    assert found.section(enabled=True, used=True)["unprobed"] == ["tag8", "tag9"]


def test_at_most_max_triggers_are_used_and_a_file_word_left_out_stays_unprobed():
    given = tuple(f"g{i}" for i in range(MAX_TRIGGERS))
    found = gather({"modelspec.trigger_phrase": "zork"}, given=given)
    assert found.words == list(given) and found.left_out[0]["word"] == "zork" and found.notes
    assert found.section(enabled=True, used=True)["unprobed"] == ["zork"]


def test_a_flood_of_frequent_tags_is_bounded():
    tags = {f"t{i}": 10 for i in range(100_000)}
    found = gather({"ss_tag_frequency": json.dumps({"d": tags})})
    assert len(found.words) == MAX_TRIGGERS and len(found.left_out) == MAX_LEFT_OUT
    assert found.more_left_out == 100_000 - MAX_TRIGGERS - MAX_LEFT_OUT and found.section(True, True)["unprobed"]


def test_hostile_words_are_left_out_and_counted():
    long = "x" * 500
    found = gather({"modelspec.trigger_phrase": f"ok, {long}, bad\x1b[2J, \u200b, \u202eevil, ***"})
    # issue 26 H1: the file's own words are probed with their control and format characters removed, and one too
    # long to prompt with is never dropped: it stays unprobed, so the candidate cannot pass
    assert found.words == ["ok", "bad[2J", "evil"] and any("2 listed trigger word" in n for n in found.notes)
    assert found.section(True, True)["unprobed"] == ["x" * 59 + "…"]
    assert "removed" in found.sources["evil"][0]["detail"]
    given = gather({}, given=["ok"])
    assert given.words == ["ok"]
    assert clean("  two   words ") == "two words" and clean("\x00") is None and clean(7) is None


@pytest.mark.parametrize("words, problem", [("zork", "list of words"), (("a",) * (MAX_TRIGGERS + 1), "at most"),
                                            (("",), "not a trigger word"), (("a\nb",), "not a trigger word"),
                                            (("x" * 101,), "not a trigger word")])
def test_given_words_are_checked(words, problem):
    assert problem in check_given(words)


def test_concept_evidence_counts_tags_that_are_the_concept_word_itself():
    meta = {"ss_tag_frequency": json.dumps({"d": {"Cross": 4, "crosses": 2, "a red cross": 3, "crossbow": 5}})}
    ev = concept_evidence(meta, {"lab-cross": ("cross",)})["suites"]["lab-cross"]
    assert {h["tag"]: h["count"] for h in ev["tags"]} == {"Cross": 4, "a red cross": 3, "crosses": 2}
    assert ev["tag_count"] == 9


def test_concept_evidence_counts_trigger_words_from_every_source():
    ev = concept_evidence({}, {"nudity": ("nude",)}, triggers=["nudecore", "nude style"])
    assert ev["suites"]["nudity"]["triggers"] == ["nude style"] and ev["found"]
