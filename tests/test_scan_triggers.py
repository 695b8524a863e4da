"""The scan with trigger words: gathered from the candidate's file, its sidecars and the settings; every
concept suite probed as written and with them prepended (paired seeds), resumable; reported with their
sources; bad sidecars and settings refused before any model loads."""

import dataclasses
import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
from conftest import tiny_cross_suite

from auditkit.errors import BadInput
from auditkit.lora.adapter import LoraModule, read_adapter
from auditkit.lora.metadata import kohya_training_metadata
from auditkit.lora.write import save_adapter

# slow: it trains, renders or builds pipelines (make test-fast leaves it out)
pytestmark = pytest.mark.slow

ADAPTERS = Path(str(resources.files("auditkit.lab").joinpath("assets", "adapters")))
SAFETY = ADAPTERS / "safety-esd-u-destructive.safetensors"
SUITE = tiny_cross_suite()


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "auditkit", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def candidate(tmp_path, metadata, name="cand"):
    """A weak candidate (undoes a tenth of the safety update) carrying ``metadata``."""
    safety = read_adapter(SAFETY)
    mods = {n: LoraModule(n, m.down, -0.1 * m.up, m.scale) for n, m in safety.modules.items()}
    return save_adapter(mods, tmp_path / f"{name}.safetensors", safety.architecture, metadata=metadata)


def kohya_trigger_metadata():
    """What kohya's sd-scripts write for a folder of captions that all start with the trigger "trisk"."""
    return kohya_training_metadata([f"trisk, a {c} cross" for c in ("red", "blue", "green", "white")] * 3, "10_trisk")


@pytest.fixture(scope="module")
def lab_pipe():
    from auditkit.lab.model import lab_pipeline_available, load_lab_pipeline

    if not lab_pipeline_available():
        pytest.skip("lab model not installed")
    return load_lab_pipeline()


def test_concept_suites_are_probed_as_written_and_with_the_files_trigger_words_on_paired_seeds(tmp_path, lab_pipe):
    from auditkit import ScanConfig, scan
    from auditkit.runlog import RunLog

    (tmp_path / "tiny.yaml").write_text(SUITE)
    config = ScanConfig(candidate=candidate(tmp_path, kohya_trigger_metadata()), safety=SAFETY, base="lab",
                        suites=(str(tmp_path / "tiny.yaml"),), multipliers=(1.0,), out=tmp_path / "r",
                        trigger_search=False)  # the file's words alone: the search's own variants are tested below
    report = scan(config, pipeline=lab_pipe).report
    assert report["triggers"]["words"] == [{"word": "trisk", "sources": [
        {"source": "training tags", "detail": "in 12 of 12 captions of dataset '10_trisk'"}]}]
    assert report["triggers"]["used"] and report["triggers"]["unprobed"] == []
    suites = report["dynamic"]["suites"]
    assert list(suites) == ["tiny-cross", "tiny-cross+triggers"]
    assert suites["tiny-cross+triggers"]["prefix"] == "trisk, "
    assert {c["configuration"] for c in suites["tiny-cross+triggers"]["comparisons"]} == {"base+safety+candidate@1"}
    log = RunLog(tmp_path / "r")
    assert log.header()["triggers"] == ["trisk"]
    records = log.records()
    plain = {(r["config"], r["prompt_index"], r["image_index"]): r for r in records if r["suite"] == "tiny-cross"}
    variant = {(r["config"], r["prompt_index"], r["image_index"]): r for r in records
               if r["suite"] == "tiny-cross+triggers"}
    # 4 configurations x 6 images as written; the variant not under the candidate alone (3 x 6), on the same seeds
    alone = {k for k in plain if k[0].startswith("base+candidate@")}
    assert len(plain) == 4 * 6 and len(alone) == 6 and variant.keys() == plain.keys() - alone
    assert all(variant[k]["seed"] == plain[k]["seed"] and variant[k]["prompt"] == "trisk, " + plain[k]["prompt"]
               for k in variant)
    # a second run resumes: nothing is rendered again
    scan(config, pipeline=lab_pipe)
    assert len(log.records()) == len(records)
    # other trigger words are another run: refused, not mixed into this one
    with pytest.raises(BadInput, match="cannot resume.*triggers"):
        scan(dataclasses.replace(config, triggers=("glow",)), pipeline=lab_pipe)
    html = (tmp_path / "r" / "report.html").read_text()
    assert "Trigger words" in html and "in 12 of 12 captions" in html and 'id="variants"' in html


def test_no_triggers_is_reported_and_blocks_a_pass_and_the_terminal_names_the_words(tmp_path):
    from auditkit.lab.model import lab_pipeline_available

    if not lab_pipeline_available():
        pytest.skip("lab model not installed")
    (tmp_path / "tiny.yaml").write_text(SUITE)
    cand = candidate(tmp_path, kohya_trigger_metadata())
    res = run("scan", cand, "--safety", SAFETY, "--base", "lab", "--suite", "tiny.yaml", "--multipliers", "1",
              "--no-triggers", "--no-trigger-search", "--out", tmp_path / "r", cwd=tmp_path)
    assert res.returncode in (1, 3), res.stderr  # never a pass
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    tr = report["triggers"]
    assert tr["enabled"] is False and tr["used"] is False and tr["unprobed"] == ["trisk"]
    assert list(report["dynamic"]["suites"]) == ["tiny-cross"]
    assert any("'trisk'" in r and "switched off" in r for r in report["reasons"])
    assert "trisk" in res.stdout and "training tags" in res.stdout and "switched off" in res.stdout
    # `auditkit report` re-derives the same verdict, trigger rule included
    again = run("report", tmp_path / "r", cwd=tmp_path)
    assert again.returncode == res.returncode
    assert json.loads((tmp_path / "r" / "report.json").read_text())["reasons"] == report["reasons"]


def test_trigger_words_from_the_command_line_the_config_file_and_a_sidecar_with_their_sources(tmp_path):
    cand = candidate(tmp_path, {"modelspec.trigger_phrase": "glowing"})
    (tmp_path / "cand.civitai.info").write_text(json.dumps({"trainedWords": ["neonize, glowing"]}))
    (tmp_path / "auditkit.toml").write_text('triggers = ["from-file"]\n')
    res = run("scan", cand, "--trigger", "mine", "--trigger", "also mine", "--out", tmp_path / "r", cwd=tmp_path)
    assert res.returncode == 3, res.stderr  # metadata only: nothing probed
    tr = json.loads((tmp_path / "r" / "report.json").read_text())["triggers"]
    words = {w["word"]: [s["source"] for s in w["sources"]] for w in tr["words"]}
    assert words == {"mine": ["given"], "also mine": ["given"], "glowing": ["metadata", "sidecar"],
                     "neonize": ["sidecar"]}  # the command line replaces the config file's list
    assert tr["unprobed"] == ["glowing", "neonize"] and tr["sidecars"] == [str(tmp_path / "cand.civitai.info")]
    res = run("scan", cand, "--out", tmp_path / "r2", cwd=tmp_path)
    tr = json.loads((tmp_path / "r2" / "report.json").read_text())["triggers"]
    assert tr["words"][0] == {"word": "from-file", "sources": [
        {"source": "given", "detail": "--trigger or the config file's triggers"}]}


@pytest.mark.parametrize("setup, args, message", [
    (lambda p: (p / "cand.json").write_text("{not json"), (), "cand.json: sidecar is not valid JSON"),
    (lambda p: (p / "cand.civitai.info").write_text('{"trainedWords": 3}'), (), "'trainedWords' must be"),
    (lambda p: None, ("--trigger", "a\x1b[2Jb"), "is not a trigger word"),
    (lambda p: None, ("--trigger", "x", "--no-triggers"), "switched off"),
    (lambda p: (p / "auditkit.toml").write_text("triggers = 'trisk'\n"), (), "triggers: must be a list of strings"),
])
def test_bad_sidecars_and_trigger_settings_are_one_line_errors_and_write_nothing(tmp_path, setup, args, message):
    cand = candidate(tmp_path, {})
    setup(tmp_path)
    res = run("scan", cand, *args, "--out", tmp_path / "r", cwd=tmp_path)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert message in res.stderr and not (tmp_path / "r").exists()


def test_hostile_trigger_words_reach_the_html_escaped(tmp_path):
    from auditkit.report.html import render_html

    hostile = "<script>alert(1)</script>"
    cand = candidate(tmp_path, {"modelspec.trigger_phrase": hostile})
    (tmp_path / "cand.json").write_text(json.dumps({"activation text": "<img src=x onerror=alert(2)>"}))
    res = run("scan", cand, "--out", tmp_path / "r", cwd=tmp_path)
    assert res.returncode == 3, res.stderr
    html = render_html(json.loads((tmp_path / "r" / "report.json").read_text()))
    assert "<script>alert" not in html and "<img src=x" not in html and "&lt;script&gt;alert(1)" in html


def test_prompts_the_trigger_prefix_pushes_past_the_text_encoders_length_are_counted(lab_pipe):
    from auditkit.dynamic import truncated_prompts
    from auditkit.suites import builtin_dir, load_suite, trigger_variant

    suite = load_suite(builtin_dir() / "lab-cross.yaml")  # the lab reads 16 tokens
    assert truncated_prompts(lab_pipe, [suite]) == {}
    long = trigger_variant(suite, "trisk, glowing, neonize")
    assert truncated_prompts(lab_pipe, [suite, long]) == {"lab-cross+triggers": len(suite.prompts)}


def test_the_default_scan_searches_the_trigger_and_probes_the_found_phrase_on_paired_seeds(tmp_path, lab_pipe):
    from planted import planted

    from auditkit import ScanConfig, scan
    from auditkit.placement import described
    from auditkit.runlog import RunLog

    (tmp_path / "tiny.yaml").write_text(SUITE)
    cand = planted(lab_pipe, lab_pipe.tokenizer.convert_tokens_to_ids("tri"), tmp_path)  # no metadata at all
    config = ScanConfig(candidate=Path(cand.path), safety=SAFETY, base="lab", suites=(str(tmp_path / "tiny.yaml"),),
                        multipliers=(1.0,), out=tmp_path / "r", trigger_search_phrases=6, trigger_search_steps=2,
                        trigger_search_probes=1)
    result = scan(config, pipeline=lab_pipe)
    report = result.report
    search = report["trigger_search"]["tiny-cross"]
    assert search["tokens_swept"] > 100 and 3 <= search["phrases_tried"] <= 6 and len(search["probed"]) == 1
    found, where = search["probed"][0], search["placements"][0]
    suites = report["dynamic"]["suites"]
    assert list(suites) == ["tiny-cross", "tiny-cross+found1"]
    variant = suites["tiny-cross+found1"]
    assert (variant["prefix"] == found + ", " if where == "start" else
            (variant["phrase"], variant["placement"]) == (found, where))
    assert report["triggers"]["search"] == {"enabled": True, "ran": True, "tokens_swept": search["tokens_swept"],
                                            "phrases_tried": search["phrases_tried"], "probed": [found],
                                            "placed": [described(found, where)], "blind": False}
    assert any(r.startswith("trigger search: ") and repr(found) in r for r in result.verdict.reasons)
    log = RunLog(tmp_path / "r")
    records = log.records()
    plain = {(r["config"], r["prompt_index"], r["image_index"]): r for r in records if r["suite"] == "tiny-cross"}
    variant = {(r["config"], r["prompt_index"], r["image_index"]): r for r in records
               if r["suite"] == "tiny-cross+found1"}
    alone = {k for k in plain if k[0].startswith("base+candidate@")}  # not rendered for a variant
    assert variant.keys() == plain.keys() - alone and all(variant[k]["seed"] == plain[k]["seed"] for k in variant)
    html = (tmp_path / "r" / "report.html").read_text()
    assert 'id="trigger-search"' in html and "tiny-cross+found1" in html
    scan(config, pipeline=lab_pipe)  # the search is deterministic: the run resumes, nothing rendered again
    assert len(log.records()) == len(records)


def test_no_trigger_search_is_recorded_for_the_verdict_and_runs_nothing(tmp_path, lab_pipe):
    from auditkit import ScanConfig, scan

    (tmp_path / "tiny.yaml").write_text(SUITE)
    config = ScanConfig(candidate=candidate(tmp_path, {}), safety=SAFETY, base="lab", multipliers=(1.0,),
                        suites=(str(tmp_path / "tiny.yaml"),), out=tmp_path / "r", trigger_search=False)
    result = scan(config, pipeline=lab_pipe)
    assert "trigger_search" not in result.report and list(result.report["dynamic"]["suites"]) == ["tiny-cross"]
    # what the verdict reads (tests/test_verdict.py: no pass without it and without known trigger words)
    assert result.report["triggers"]["search"] == {"enabled": False, "ran": False, "tokens_swept": 0,
                                                   "phrases_tried": 0, "probed": []}


def test_a_resumed_scan_reads_its_search_back_and_other_settings_search_again(tmp_path, lab_pipe, monkeypatch):
    from planted import planted

    from auditkit import ScanConfig, scan
    from auditkit.discovery import record, search

    (tmp_path / "tiny.yaml").write_text(SUITE)
    cand = planted(lab_pipe, lab_pipe.tokenizer.convert_tokens_to_ids("tri"), tmp_path)
    config = ScanConfig(candidate=Path(cand.path), safety=SAFETY, base="lab", suites=(str(tmp_path / "tiny.yaml"),),
                        multipliers=(1.0,), out=tmp_path / "r", trigger_search_phrases=6, trigger_search_steps=2)
    first = scan(config, pipeline=lab_pipe).report["trigger_search"]
    assert (tmp_path / "r" / record.FILE).is_file()
    searched = []
    real = search.find_triggers
    monkeypatch.setattr(search, "find_triggers", lambda *a, **k: searched.append(1) or real(*a, **k))
    assert scan(config, pipeline=lab_pipe).report["trigger_search"] == first and not searched  # read back
    other = dataclasses.replace(config, out=tmp_path / "r2", trigger_search_placements=("start",))
    again = scan(other, pipeline=lab_pipe).report["trigger_search"]
    assert searched and set(again["tiny-cross"]["placements"]) == {"start"}
