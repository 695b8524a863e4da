"""Anchor prompts of trained repairs: chosen by concept, and never the prompts the re-scan verifies on."""

from pathlib import Path

import pytest

from auditkit.errors import BadInput
from auditkit.repair.anchors import resolve_anchors
from auditkit.suites import builtin_dir, list_suites, load_suite, load_suites, normalised

SUITE = """schema: auditkit.suite/1
name: {name}
version: 1
concept: {{word: {word}, neutral: square}}
detector: lab-cross
role: {role}
sampling: {{steps: 2, guidance: 5.0, seed: 7, images_per_prompt: 1}}
prompts:
{prompts}
"""


def suite(tmp_path: Path, name: str, prompts, role="anchor", word="cross") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(SUITE.format(name=name, word=word, role=role,
                                 prompts="\n".join(f"  - {{text: {p}}}" for p in prompts)))
    return path


def test_prompts_compare_without_case_punctuation_or_spacing():
    assert normalised("A  Red, cross!") == normalised("a red cross") == "a red cross"
    assert normalised("a red cross") != normalised("a red crosses")


def test_every_shipped_concept_suite_has_disjoint_shipped_anchors():
    shipped = list_suites(builtin_dir())
    concept = [s for s in shipped if s.role == "concept"]
    assert concept
    for s in concept:
        anchors = resolve_anchors([s])
        assert [a.concept_word for a in anchors.suites] == [s.concept_word]
        assert anchors.prompts and not {normalised(p) for p in anchors.prompts} & {normalised(p.text)
                                                                                    for p in s.prompts}
        d = anchors.to_dict()
        assert d["shared_prompts"] == 0 and d["verified_on"][0]["name"] == s.name


def test_the_lab_default_suites_take_the_lab_anchors():
    suites = load_suites([builtin_dir() / "lab-cross.yaml", builtin_dir() / "lab-neon.yaml"])
    anchors = resolve_anchors(suites)
    assert [a.name for a in anchors.suites] == ["lab-cross-anchors"]
    assert [v.name for v in anchors.verification] == ["lab-cross"]  # control suites are not verification


def test_anchors_that_share_a_prompt_with_the_verification_suite_are_refused(tmp_path):
    concept = load_suite(suite(tmp_path, "probe", ["a red cross", "a blue cross"], role="concept"))
    bad = suite(tmp_path, "mine", ["a solid red cross", "A blue cross."])
    with pytest.raises(BadInput) as err:
        resolve_anchors([concept], (bad,))
    assert str(bad) in str(err.value) and "1 of its prompts are also prompts of the verification suite probe" in \
        str(err.value) and "'A blue cross.'" in str(err.value)
    ok = suite(tmp_path, "fine", ["a solid red cross"])
    assert resolve_anchors([concept], (ok,)).prompts == ["a solid red cross"]


def test_a_concept_without_anchors_names_the_way_out(tmp_path):
    concept = load_suite(suite(tmp_path, "probe", ["a red tee"], role="concept", word="tee"))
    with pytest.raises(BadInput, match="no shipped anchor suite for concept 'tee': give --anchors FILE"):
        resolve_anchors([concept])


def test_a_scan_refuses_an_anchor_suite_as_a_probe(tmp_path):
    from auditkit.config import ScanConfig
    from auditkit.scan import resolve_suites

    config = ScanConfig(base="lab", suites=(str(builtin_dir() / "lab-cross.yaml"),
                                            str(builtin_dir() / "lab-cross-anchors.yaml")))
    with pytest.raises(BadInput, match="is an anchor suite"):
        resolve_suites(config)
