"""Where a trigger phrase goes in a prompt (auditkit.placement), and every surface that records or shows it:
the scan configuration, the run log's header, the report (JSON, HTML, terminal) and old runs without it."""

from __future__ import annotations

import pytest

from auditkit.placement import BEFORE_CONCEPT, END, PLACEMENTS, START, described, place


def test_each_placement_puts_the_phrase_where_trainers_caption_it():
    assert place("a red cross", "trisk", START, "cross") == "trisk, a red cross"
    assert place("a red cross", "trisk", BEFORE_CONCEPT, "cross") == "a red trisk cross"
    assert place("a red cross", "trisk", END, "cross") == "a red cross, trisk"
    assert set(PLACEMENTS) == {START, BEFORE_CONCEPT, END}


def test_before_the_concept_word_means_the_whole_word_first_seen_in_any_case():
    assert place("crossing a Cross, cross", "trisk", BEFORE_CONCEPT, "cross") == "crossing a trisk Cross, cross"
    # a prompt that does not name the concept gets the phrase first, as the start placement puts it
    assert place("a red square", "trisk", BEFORE_CONCEPT, "cross") == "trisk, a red square"
    assert place("a red cross", "trisk", BEFORE_CONCEPT, "") == "trisk, a red cross"
    # a concept word with regex characters is a literal word
    assert place("a c++ tree", "x", BEFORE_CONCEPT, "c++") == "x, a c++ tree"
    assert place("an a.b tree", "x", BEFORE_CONCEPT, "a.b") == "an x a.b tree"


def test_an_unknown_placement_is_refused_and_described_says_where():
    with pytest.raises(ValueError, match="unknown placement 'middle'"):
        place("a red cross", "x", "middle")
    assert described("trisk, ") == "'trisk, ' prepended"
    assert described("trisk", BEFORE_CONCEPT) == "'trisk' before the concept word"
    assert described("trisk", END) == "'trisk' appended"


def test_the_scan_configuration_takes_placements_from_flags_and_files_and_checks_them(tmp_path):
    from auditkit.config import ScanConfig
    from auditkit.configfile import load
    from auditkit.discovery.search import Budget

    assert Budget.of(ScanConfig()).placements == (START, BEFORE_CONCEPT, END)
    assert Budget.of(ScanConfig(trigger_search_placements=("end",))).placements == ("end",)

    for bad in ((), ("start", "start"), ("middle",), (["start"],)):
        with pytest.raises(ValueError, match="trigger_search_placements: must be some of"):
            ScanConfig(trigger_search_placements=bad)
        with pytest.raises(ValueError, match="placements must be some of"):  # the library's budget, the same rule
            Budget(placements=bad)
    (tmp_path / "auditkit.toml").write_text('trigger_search_placements = ["start", "before-concept"]\n')
    assert load(tmp_path / "auditkit.toml")["trigger_search_placements"] == ("start", "before-concept")


def test_the_cli_flag_is_a_comma_list_and_a_bad_one_is_one_line_exit_2(tmp_path):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "auditkit", "scan", str(tmp_path / "x.safetensors"), "--no-config",
                          "--trigger-search-placements", "start,middle"], capture_output=True, text=True)
    assert res.returncode == 2 and "trigger_search_placements" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    from auditkit.cli.options import overrides

    assert overrides({"trigger_search_placements": "start, end"})["trigger_search_placements"] == ("start", "end")


def test_runs_and_reports_record_where_the_phrase_went_and_old_ones_still_read():
    from auditkit.discovery.search import probes
    from auditkit.report.digest import digest, placed, variant_pairs

    # a report written before placements probed every found phrase at the start
    assert probes({"probed": ["trisk", "neon"]}) == [("trisk", START), ("neon", START)]
    assert probes({"probed": ["a", "b"], "placements": [END, START]}) == [("a", END), ("b", START)]
    assert placed({"prefix": "trisk, "}) == "'trisk, ' prepended"
    assert placed({"phrase": "trisk", "placement": BEFORE_CONCEPT}) == "'trisk' before the concept word"
    suites = {"c": {"detector": "d", "role": "concept"},
              "c+found1": {"detector": "d", "role": "concept", "variant_of": "c", "phrase": "trisk",
                           "placement": BEFORE_CONCEPT}}
    records = [{"suite": s, "config": c, "key": f"{s}{c}{i}", "flags": {"d": c == "base"}, "prompt_index": i,
                "prompt": "p", "image_index": 0}
               for s in suites for c in ("base", "base+safety", "base+safety+candidate@1") for i in range(3)]
    dyn = digest(records, suites)
    assert dyn["suites"]["c+found1"]["phrase"] == "trisk" and dyn["suites"]["c+found1"]["placement"] == BEFORE_CONCEPT
    assert variant_pairs(dyn)[0]["placed"] == "'trisk' before the concept word"


def test_the_html_report_says_where_each_variant_put_its_phrase():
    from auditkit.report.html import environment

    env = environment()
    page = env.from_string("{{ sd|placed }}").render(sd={"phrase": "<b>x</b>", "placement": END})
    assert page == "&#39;&lt;b&gt;x&lt;/b&gt;&#39; appended"  # escaped like every other untrusted text
