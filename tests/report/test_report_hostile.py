"""`auditkit report` on tampered run folders (issue 26 M9): a field of report.json or run.jsonl of the wrong type
is one line naming the file and the field (exit 2), never an internal error, and nothing is rewritten."""

import json
import shutil
from importlib import resources
from pathlib import Path

import pytest

from auditkit.errors import BadInput

ADAPTERS = Path(str(resources.files("auditkit.lab").joinpath("assets", "adapters")))
SAFETY = ADAPTERS / "safety-esd-u-destructive.safetensors"
CAND = ADAPTERS / "safety-esd-x-destructive.safetensors"


def cli(*args):
    from auditkit.cli import cli as command

    with pytest.raises(SystemExit) as done:
        command.main([*map(str, args)], standalone_mode=False)
    return done.value.code


def image(config, key, flag):
    suite, prompt, index = key.split("/")
    return {"type": "image", "config": config, "key": key, "suite": suite, "prompt_index": int(prompt),
            "image_index": int(index), "prompt": "a red cross", "seed": 7, "guidance": 5.0, "steps": 2,
            "image": f"images/{config}/{prompt}_{index}.png", "scores": {"lab-cross": float(flag)},
            "flags": {"lab-cross": flag}}


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    """A static scan's folder given a dynamic section and a run log written by hand (no model renders)."""
    from auditkit.runlog import RunLog

    folder = tmp_path_factory.mktemp("scan") / "r"
    assert cli("scan", CAND, "--no-config", "--safety", SAFETY, "--static", "--out", folder) in (1, 3)
    report = json.loads((folder / "report.json").read_text())
    report["dynamic"] = {"thresholds": {}, "device": "cpu", "dtype": "float32",
                         "adapter_coverage": {"candidate": {"expected": 1, "loaded": 1, "missing": []}}}
    (folder / "report.json").write_text(json.dumps(report))
    log = RunLog(folder)
    log.start({"base": "lab", "suites": {"tiny": {"detector": "lab-cross", "role": "concept", "prompts": 1}},
               "multipliers": [1.0], "steps_override": 2, "adapters": {"safety": "0" * 64}})
    log.append([image(c, f"tiny/0/{i}", c != "base+safety") for c in ("base", "base+safety",
                                                                       "base+safety+candidate@1") for i in range(3)])
    assert cli("report", folder) in (1, 3)  # the untampered folder re-renders
    return folder


def edit_report(change):
    def edit(folder):
        report = json.loads((folder / "report.json").read_text())
        change(report)
        (folder / "report.json").write_text(json.dumps(report))
    return edit


def edit_line(number, change):
    def edit(folder):
        lines = (folder / "run.jsonl").read_text().splitlines()
        record = json.loads(lines[number - 1])
        change(record)
        lines[number - 1] = json.dumps(record)
        (folder / "run.jsonl").write_text("\n".join(lines) + "\n")
    return edit


def put(*path_and_value):
    *path, value = path_and_value

    def change(obj):
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value
    return change


# issue 26 M9: each of these gave `report` an internal error (the first six are the issue's own)
TAMPERED = {
    "static.cancellation": ("report.json", edit_report(put("static", "cancellation", "abc"))),
    "flags.lab-cross": ("run.jsonl", edit_line(2, put("flags", {"lab-cross": "yes"}))),
    "suite": ("run.jsonl", edit_line(2, put("suite", ["x"]))),
    "image": ("run.jsonl", edit_line(2, put("image", 5))),
    "line 2 is not a JSON record": ("run.jsonl", lambda f: (f / "run.jsonl").write_text(
        (f / "run.jsonl").read_text().replace('"prompt_index": 0', '"prompt_index": ' + "9" * 5000, 1))),
    "suites.tiny": ("run.jsonl", edit_line(1, put("suites", {"tiny": "abc"}))),
    "suites.tiny.detector": ("run.jsonl", edit_line(1, put("suites", {"tiny": {"role": "concept"}}))),
    "multipliers[0]": ("run.jsonl", edit_line(1, put("multipliers", ["x"]))),
    "seed": ("run.jsonl", edit_line(3, put("seed", -1))),
    "scores.lab-cross": ("run.jsonl", edit_line(3, put("scores", {"lab-cross": "high"}))),
    "prompt_index": ("run.jsonl", edit_line(3, put("prompt_index", 1.5))),
    "static.groups[0].safety_share": ("report.json", edit_report(put("static", "groups", [{
        "block": "up", "kind": "ff", "cancellation": 0.1, "safety_share": "x", "modules": 1,
        "energy_in_safety_subspace": 0.1}]))),
    "static.modules": ("report.json", edit_report(put("static", "modules", 5))),
    "static.top_modules[0]": ("report.json", edit_report(put("static", "top_modules", [[1]]))),
    "static.verdict": ("report.json", edit_report(lambda r: r["static"].pop("verdict"))),
    "candidate.components": ("report.json", edit_report(put("candidate", "components", [1]))),
    "candidate.coverage.fraction": ("report.json", edit_report(put("candidate", "coverage", {"fraction": "all"}))),
    "safety.ranks": ("report.json", edit_report(put("safety", "ranks", 4))),
    "triggers.unprobed": ("report.json", edit_report(put("triggers", {"unprobed": 5}))),
    "triggers.words[0].sources": ("report.json", edit_report(put("triggers", {"words": [{"sources": 3}]}))),
    "concept_check.reverted": ("report.json", edit_report(put("concept_check", {"reverted": "most"}))),
    "dynamic.adapter_coverage.candidate.missing": ("report.json", edit_report(
        put("dynamic", "adapter_coverage", {"candidate": {"missing": 5}}))),
    "dynamic": ("report.json", edit_report(put("dynamic", [1]))),
    "repair.after": ("report.json", edit_report(put("repair", {"before": {}}))),
    "repair.before.static_cancellation": ("report.json", edit_report(put("repair", {
        "before": {"static_cancellation": "x"}, "after": {}, "comparisons": []}))),
    "candidate": ("report.json", edit_report(lambda r: r.pop("candidate"))),
}


@pytest.mark.parametrize("field", TAMPERED)
def test_a_tampered_field_is_one_line_naming_the_file_and_the_field(scanned, tmp_path, field):
    name, tamper = TAMPERED[field]
    folder = tmp_path / "r"
    shutil.copytree(scanned, folder)
    tamper(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    with pytest.raises(BadInput) as exc:
        cli("report", folder)
    text = str(exc.value)
    assert text.startswith(str(folder / name)) and field in text and "\n" not in text, text
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before  # nothing rewritten
