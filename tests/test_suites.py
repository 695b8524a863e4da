"""Probe suites are validated data: shipped suites load, malformed ones get one-line errors."""

import re
import subprocess
import sys

import pytest

from auditkit.errors import BadInput
from auditkit.suites import builtin_dir, list_suites, load_csv, load_suite

GOOD = """schema: auditkit.suite/1
name: demo
version: 2
concept: {word: cross, neutral: square}
detector: lab-cross
sampling: {steps: 10, guidance: 3, seed: 100}
prompts:
  - a red cross
  - {text: "a blue   cross", category: explicit, seed: 7, guidance: 9}
"""


def write(tmp_path, text, name="s.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_shipped_suites_validate_with_unique_names():
    suites = {s.name: s for s in list_suites()}
    assert {"nudity", "benign", "lab-cross", "lab-neon"} <= set(suites)
    assert suites["nudity"].role == "concept" and suites["benign"].role == "control"
    assert {"explicit", "innocuous"} <= set(suites["nudity"].categories)
    assert all(len(s.prompts) >= 8 for s in suites.values())
    assert builtin_dir().name == "probes"


def test_suite_fields_defaults_and_paired_seeds(tmp_path):
    s = load_suite(write(tmp_path, GOOD))
    assert (s.name, s.version, s.steps, s.role) == ("demo", 2, 10, "concept")
    first, second = s.prompts
    assert (first.text, first.seed, first.guidance) == ("a red cross", 100, 3.0)
    assert (second.text, second.seed, second.guidance, second.category) == ("a blue cross", 7, 9.0, "explicit")


@pytest.mark.parametrize("change,expected", [
    (("schema: auditkit.suite/1", "schema: other/9"), "schema must be"),
    (("name: demo", "name: Bad Name"), "name must match"),
    (("version: 2", "version: zero"), "version must be"),
    (("detector: lab-cross\n", "detector: lab-cross\nextra: 1\n"), "unknown field(s): extra"),
    (("  - a red cross", "  - {text: ''}"), "prompts[0].text must be a non-empty string"),
    (("seed: 7,", "seed: -7,"), "prompts[1].seed must be"),
    (("steps: 10", "steps: -1"), "sampling.steps must be"),
    (("prompts:\n  - a red cross\n  - {text: \"a blue   cross\", category: explicit, seed: 7, guidance: 9}\n",
      "prompts: []\n"), "prompts must be a non-empty list"),
    (("concept: {word: cross, neutral: square}", "concept: cross"), "concept must have"),
])
def test_malformed_suites_name_the_field(tmp_path, change, expected):
    old, new = change
    assert old in GOOD
    with pytest.raises(BadInput, match=re.escape(expected)) as info:
        load_suite(write(tmp_path, GOOD.replace(old, new)))
    assert "s.yaml" in str(info.value)


def test_executable_yaml_tags_are_refused(tmp_path):
    evil = GOOD.replace("name: demo", "name: !!python/object/apply:os.system ['touch pwned']")
    with pytest.raises(BadInput, match="not valid YAML"):
        load_suite(write(tmp_path, evil))
    assert not (tmp_path / "pwned").exists()


def test_i2p_style_csv(tmp_path):
    p = write(tmp_path, "prompt,categories,sd_seed,sd_guidance_scale,hard\n"
                        "\"a painting, oil\",sexual,42,7\n,,,,\nplain prompt,,,,\n", name="i2p.csv")
    s = load_csv(p)
    assert [pr.text for pr in s.prompts] == ["a painting, oil", "plain prompt"]
    assert (s.prompts[0].seed, s.prompts[0].guidance, s.prompts[0].category) == (42, 7.0, "sexual")
    assert s.prompts[1].seed == 2 and s.prompts[1].guidance == 7.5  # defaults: seed + row
    assert load_suite(p).name == "i2p"


@pytest.mark.parametrize("text,expected", [
    ("text\nhello\n", "needs a 'prompt' column"),
    ("prompt,seed\nhi,abc\n", "line 2: seed 'abc' is not a number"),
    ("prompt,seed\nhi,1.5\n", "not a non-negative integer"),
    ("prompt\n\n", "no prompts"),
])
def test_bad_csvs(tmp_path, text, expected):
    with pytest.raises(BadInput, match=expected):
        load_csv(write(tmp_path, text, name="p.csv"))


def test_cli_ls_and_validate(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "auditkit", "suites", *map(str, args)], capture_output=True,
                              text=True, timeout=60)

    res = run("ls")
    assert res.returncode == 0 and "nudity" in res.stdout and "lab-cross" in res.stdout
    assert run("validate", write(tmp_path, GOOD)).returncode == 0
    bad = run("validate", write(tmp_path, GOOD.replace("version: 2", "version: 0"), name="b.yaml"))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "b.yaml" in bad.stderr


# --- input images of edit suites (Flux.1 Kontext) ---------------------------------------------------------

def test_an_edit_suite_names_its_input_image_by_path_or_as_a_lab_image(tmp_path):
    import numpy as np
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.fromarray(np.full((6, 4, 3), 200, np.uint8)).save(tmp_path / "img" / "room.png")
    suite = load_suite(write(tmp_path, GOOD + "input_image: {path: img/room.png}\n"))
    assert suite.input_image.path == str((tmp_path / "img" / "room.png").resolve())
    assert suite.input_image.pixels().shape == (6, 4, 3) and len(suite.input_image.sha256) == 64
    lab = load_suite(write(tmp_path, GOOD + "input_image: {lab_seed: 3}\n", name="l.yaml")).input_image
    assert lab.describe() == "lab:3" and lab.pixels().dtype == np.uint8 and lab.pixels().shape[2] == 3
    assert not np.array_equal(lab.pixels(), load_suite(write(tmp_path, GOOD + "input_image: {lab_seed: 4}\n",
                                                             name="m.yaml")).input_image.pixels())
    assert load_suite(write(tmp_path, GOOD, name="t.yaml")).input_image is None


@pytest.mark.parametrize("value, named, expected", [
    ("{path: missing.png}", "s.yaml", "input_image.path 'missing.png': no such file"),
    ("{path: notes.png}", "notes.png", "unreadable image"),
    ("{path: img}", "s.yaml", "no such file"),
    ("{lab_seed: -1}", "s.yaml", "input_image.lab_seed must be a non-negative integer"),
    ("{url: x}", "s.yaml", "input_image must be {path: FILE} or {lab_seed: SEED}"),
    ("room.png", "s.yaml", "input_image must be {path: FILE} or {lab_seed: SEED}"),
])
def test_a_bad_input_image_is_one_line_naming_the_file(tmp_path, value, named, expected):
    from conftest import assert_one_line_error

    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "img").mkdir()
    path = write(tmp_path, GOOD + f"input_image: {value}\n")
    assert_one_line_error(lambda: load_suite(path), (tmp_path / named).resolve(), expected)


def test_cli_validate_refuses_a_missing_input_image_with_exit_2(tmp_path):
    import os
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])  # this tree's auditkit, whatever is installed
    res = subprocess.run([sys.executable, "-m", "auditkit", "suites", "validate",
                          str(write(tmp_path, GOOD + "input_image: {path: gone.png}\n"))],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": root})
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "s.yaml" in res.stderr and "gone.png" in res.stderr
