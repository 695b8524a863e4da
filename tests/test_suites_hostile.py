"""Hostile inputs to probe-suite loading: each is refused with a one-line BadInput (exit 2) before any model
loads, without a traceback and without exhausting memory."""

import hashlib
import re
import subprocess
import sys

import pytest

from auditkit.errors import BadInput
from auditkit.suites import (
    MAX_GUIDANCE,
    MAX_IMAGES_PER_PROMPT,
    MAX_PROMPT_SEED,
    MAX_PROMPTS,
    MAX_STEPS,
    MAX_SUITE_IMAGES,
    MAX_YAML_BYTES,
    MAX_YAML_NODES,
    load_csv,
    load_suite,
    load_suites,
)

GOOD = """schema: auditkit.suite/1
name: demo
version: 2
description: a demo suite
concept: {word: cross, neutral: square}
detector: lab-cross
sampling: {steps: 10, guidance: 3, seed: 100, images_per_prompt: 1}
prompts:
  - a red cross
  - {text: "a blue cross", category: explicit, seed: 7, guidance: 9}
"""


def write(tmp_path, text, name="s.yaml"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def refused(tmp_path, text, expected, name="s.yaml"):
    """``text`` is refused with one line naming the file and containing ``expected``."""
    with pytest.raises(BadInput, match=re.escape(expected)) as info:
        load_suite(write(tmp_path, text, name))
    assert name in str(info.value) and "\n" not in str(info.value)
    return info.value


def inline_bomb(levels: int) -> str:
    """Billion laughs inside one flow list (a suite refuses unknown top-level keys, so the anchors live in a
    field): elements define anchors a0..a<levels>, each a list of nine aliases to the previous one."""
    parts = ['&a0 "lol"'] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "[" + ", ".join(parts) + "]"


def validate_cli(path, memory_bytes: int | None = None) -> subprocess.CompletedProcess:
    if memory_bytes and sys.platform == "win32":
        pytest.skip("memory limits use resource.setrlimit (POSIX)")

    def limit() -> None:  # runs in the child: a blow-up fails there, not on the test machine
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

    return subprocess.run([sys.executable, "-m", "auditkit", "suites", "validate", str(path)], capture_output=True,
                          text=True, timeout=120, preexec_fn=limit if memory_bytes else None)


# 1. YAML structure: aliases, size, nesting, field types


def test_yaml_aliases_are_refused(tmp_path):
    # Three levels: tiny, but it passed validation before (the list was stringified into the description).
    refused(tmp_path, GOOD.replace("a demo suite", inline_bomb(3)), "YAML aliases")


def test_merge_key_bomb_is_refused(tmp_path):
    # Merge keys copy the merged pairs into each mapping: nested merges grow exponentially even with few aliases.
    doc = GOOD.replace("concept: {word: cross, neutral: square}",
                       "concept: {word: cross, neutral: square, <<: {<<: [&m {w: 1}, *m]}}")
    refused(tmp_path, doc, "YAML aliases")


def test_alias_bomb_cannot_exhaust_memory(tmp_path):
    # Nine levels (9**9 strings once expanded) used to exhaust memory; it must be a one-line exit 2 within 1 GiB.
    res = validate_cli(write(tmp_path, GOOD.replace("a demo suite", inline_bomb(9))), memory_bytes=1 << 30)
    assert res.returncode == 2, res.stderr[-500:]
    assert len(res.stderr.strip().splitlines()) == 1 and "YAML aliases" in res.stderr


def test_oversized_suite_file_is_refused_before_parsing(tmp_path):
    padding = "# padding\n" * (MAX_YAML_BYTES // 10 + 1)
    refused(tmp_path, padding + GOOD, "larger than")


@pytest.mark.slow
def test_many_values_cannot_exhaust_memory(tmp_path):
    # 5 MB of empty mappings used to take 1.8 GB (and a minute) in PyYAML's composer before any check ran.
    doc = GOOD.replace("a demo suite", "[" + "{}," * (MAX_YAML_BYTES // 3 - 200) + "{}]")
    res = validate_cli(write(tmp_path, doc), memory_bytes=1 << 30)
    assert res.returncode == 2, res.stderr[-500:]
    assert len(res.stderr.strip().splitlines()) == 1 and f"more than {MAX_YAML_NODES} values" in res.stderr


def test_deep_nesting_is_refused(tmp_path):
    deep = "[" * 50_000 + "]" * 50_000
    refused(tmp_path, GOOD.replace("description: a demo suite", f"description: {deep}"), "nested")


def test_huge_integer_literal_is_refused(tmp_path):
    # Python refuses to convert integers over 4300 digits: a ValueError from inside the YAML loader.
    refused(tmp_path, GOOD.replace("version: 2", "version: " + "9" * 5000), "not valid YAML")


@pytest.mark.parametrize("change,expected", [
    (("description: a demo suite", "description: [a, b]"), "description must be a string"),
    (("description: a demo suite", "description: {a: b}"), "description must be a string"),
    (("description: a demo suite", "description: " + "d" * 5000), "description is longer than"),
    (("{word: cross, neutral: square}", "{word: cross, neutral: [square]}"), "concept must have"),
    (("{word: cross, neutral: square}", "{word: '', neutral: square}"), "concept.word must be a non-empty string"),
    (("{word: cross, neutral: square}", "{word: " + "c" * 500 + ", neutral: square}"), "concept.word is longer"),
    (("{word: cross, neutral: square}", "{word: cross, neutral: square, extra: 1}"),
     "concept has unknown field(s): extra"),
    (("version: 2", "version: 99999999999"), "version must be an integer"),
    (("detector: lab-cross", "detector: [lab-cross]"), "detector must be"),
    (("role: concept", "role: [concept]"), "role must be one of"),
    (("  - a red cross", "  - {text: a red cross, category: [x]}"), "prompts[0].category must be a string"),
    (("  - a red cross", "  - {text: a red cross, category: " + "k" * 500 + "}"), "prompts[0].category is longer"),
])
def test_every_field_is_type_checked(tmp_path, change, expected):
    old, new = change
    text = GOOD.replace("detector: lab-cross\n", "detector: lab-cross\nrole: concept\n")
    assert old in text
    refused(tmp_path, text.replace(old, new), expected)


# 2. Upper bounds on sampling, seeds and guidance


@pytest.mark.parametrize("change,expected", [
    (("steps: 10", "steps: 100000"), f"sampling.steps must be an integer in [1, {MAX_STEPS}]"),
    (("images_per_prompt: 1", "images_per_prompt: 1000000000"),
     f"sampling.images_per_prompt must be an integer in [1, {MAX_IMAGES_PER_PROMPT}]"),
    (("seed: 100,", "seed: 100000000000000000000,"),
     f"sampling.seed must be a non-negative integer <= {MAX_PROMPT_SEED}"),
    (("seed: 7,", "seed: 100000000000000000000,"),
     f"prompts[1].seed must be a non-negative integer <= {MAX_PROMPT_SEED}"),
    (("guidance: 9", "guidance: .nan"), f"prompts[1].guidance must be a finite number in [0, {MAX_GUIDANCE:g}]"),
    (("guidance: 9", "guidance: -1"), "prompts[1].guidance must be a finite number in"),
    (("guidance: 9", "guidance: .inf"), "prompts[1].guidance must be a finite number in"),
    (("guidance: 9", "guidance: 1000"), "prompts[1].guidance must be a finite number in"),
    (("guidance: 3,", "guidance: 101.0,"), f"sampling.guidance must be a finite number in [0, {MAX_GUIDANCE:g}]"),
])
def test_sampling_upper_bounds(tmp_path, change, expected):
    old, new = change
    assert old in GOOD
    refused(tmp_path, GOOD.replace(old, new), expected)


def test_default_seeds_stay_in_range(tmp_path):
    # Prompts without a seed use sampling.seed + their index: the last one can pass the maximum.
    text = GOOD.replace("seed: 100,", f"seed: {MAX_PROMPT_SEED},") + "  - a green cross\n"
    refused(tmp_path, text, f"prompts[2].seed must be a non-negative integer <= {MAX_PROMPT_SEED}")


def test_limits_are_consistent_and_reachable(tmp_path):
    # Image k of a prompt uses seed prompt.seed * 1000 + k: the largest must stay exact as a float / JSON number.
    assert MAX_IMAGES_PER_PROMPT <= 1000 and MAX_PROMPT_SEED * 1000 + 999 < 2**53
    at_limit = (GOOD.replace("steps: 10", f"steps: {MAX_STEPS}").replace("seed: 7,", f"seed: {MAX_PROMPT_SEED},")
                .replace("images_per_prompt: 1", f"images_per_prompt: {MAX_IMAGES_PER_PROMPT}")
                .replace("guidance: 9", f"guidance: {MAX_GUIDANCE}"))
    s = load_suite(write(tmp_path, at_limit))
    assert (s.steps, s.images_per_prompt, s.prompts[1].seed, s.prompts[1].guidance) == (
        MAX_STEPS, MAX_IMAGES_PER_PROMPT, MAX_PROMPT_SEED, MAX_GUIDANCE)


def test_total_images_and_prompt_count_are_capped(tmp_path):
    n = MAX_SUITE_IMAGES // MAX_IMAGES_PER_PROMPT + 1
    many = GOOD.split("prompts:")[0].replace("images_per_prompt: 1", f"images_per_prompt: {MAX_IMAGES_PER_PROMPT}")
    refused(tmp_path, many + "prompts:\n" + "  - p\n" * n, f"more than {MAX_SUITE_IMAGES} images")
    refused(tmp_path, GOOD.split("prompts:")[0] + "prompts:\n" + "  - p\n" * (MAX_PROMPTS + 1),
            f"more than {MAX_PROMPTS} prompts")


@pytest.mark.parametrize("row,expected", [
    ("hi,inf,7", f"line 2: seed 'inf' is not a non-negative integer <= {MAX_PROMPT_SEED}"),
    ("hi,1e20,7", "line 2: seed '1e20' is not a non-negative integer <="),
    ("hi,-5,7", "line 2: seed '-5' is not a non-negative integer <="),
    ("hi,nan,7", "line 2: seed 'nan' is not a non-negative integer <="),
    ("hi,5,nan", f"line 2: guidance 'nan' is not a finite number in [0, {MAX_GUIDANCE:g}]"),
    ("hi,5,inf", "line 2: guidance 'inf' is not a finite number in"),
    ("hi,5,-1", "line 2: guidance '-1' is not a finite number in"),
    ("hi,5,101", "line 2: guidance '101' is not a finite number in"),
])
def test_csv_seed_and_guidance_bounds(tmp_path, row, expected):
    with pytest.raises(BadInput, match=re.escape(expected)):
        load_csv(write(tmp_path, f"prompt,seed,guidance\n{row}\n", name="p.csv"))


def test_csv_default_seeds_stay_in_range(tmp_path):
    with pytest.raises(BadInput, match=re.escape("line 3: seed")):
        load_csv(write(tmp_path, "prompt\na\nb\n", name="p.csv"), seed=MAX_PROMPT_SEED)


# 3. Detector names are checked against the registry, without importing the detectors


def test_unknown_detector_is_refused_with_a_suggestion(tmp_path):
    refused(tmp_path, GOOD.replace("detector: lab-cross", "detector: lab-cros"),
            "unknown detector 'lab-cros'; did you mean 'lab-cross'?")
    refused(tmp_path, GOOD.replace("detector: lab-cross", "detector: zzz"), "unknown detector 'zzz'; known: ")
    with pytest.raises(BadInput, match="unknown detector 'nudenet'"):
        load_csv(write(tmp_path, "prompt\nhi\n", name="p.csv"), detector="nudenet")


def test_validating_a_suite_imports_no_model_library(tmp_path):
    path = write(tmp_path, GOOD)
    code = ("import sys; from auditkit.suites import load_suite; load_suite(sys.argv[1]); "
            "heavy = [m for m in ('torch', 'onnxruntime', 'open_clip', 'diffusers') if m in sys.modules]; "
            "assert not heavy, heavy")
    res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


# 4. CSV encoding and syntax; control characters


def test_csv_with_utf8_bom_loads(tmp_path):
    p = tmp_path / "excel.csv"
    p.write_bytes("\ufeffprompt,seed\nhello there,4\n".encode())
    s = load_csv(p)
    assert [(x.text, x.seed) for x in s.prompts] == [("hello there", 4)]


@pytest.mark.parametrize("text,expected", [
    ('prompt,seed\n"an unterminated prompt,4\nnext,5\n', "malformed CSV"),
    ('prompt,seed\n"a "quoted" word",4\n', "malformed CSV at line 2"),
    ("prompt,seed\nhello\x00there,4\n", "NUL"),
])
def test_malformed_csvs_are_refused(tmp_path, text, expected):
    with pytest.raises(BadInput, match=re.escape(expected)) as info:
        load_csv(write(tmp_path, text, name="p.csv"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("escaped", ["\\0", "\\e", "\\x07", "\\x9b"])
def test_control_characters_in_yaml_texts_are_refused(tmp_path, escaped):
    refused(tmp_path, GOOD.replace('"a blue cross"', f'"a blue{escaped}cross"'), "prompts[1].text contains a control")
    refused(tmp_path, GOOD.replace("a demo suite", f'"a demo{escaped}suite"'), "description contains a control")


# 5. Several suites at once; content hash


def test_load_suites_refuses_two_files_with_one_name(tmp_path):
    first = write(tmp_path, GOOD, "a.yaml")
    second = write(tmp_path, GOOD.replace("version: 2", "version: 3"), "b.yaml")
    with pytest.raises(BadInput, match=re.escape(f"suite name 'demo' is also defined by {first.resolve()}")) as info:
        load_suites([first, second])
    assert str(second.resolve()) in str(info.value)


def test_load_suites_treats_relative_and_absolute_paths_as_one_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, GOOD, "a.yaml")
    other = write(tmp_path, GOOD.replace("name: demo", "name: other"), "b.yaml")
    suites = load_suites(["a.yaml", path, "./sub/../a.yaml", other])
    assert [s.name for s in suites] == ["demo", "other"]
    assert suites[0].path == str(path.resolve())
    assert load_suite("a.yaml").path == str(path.resolve())


def test_suites_record_the_sha256_of_their_bytes(tmp_path):
    path = write(tmp_path, GOOD)
    csv_path = write(tmp_path, "prompt\nhi\n", name="p.csv")
    assert load_suite(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_csv(csv_path).sha256 == hashlib.sha256(csv_path.read_bytes()).hexdigest()
    before = load_suite(path).sha256
    path.write_text(GOOD.replace("a red cross", "a red  cross"))  # same prompts once normalised, other bytes
    assert load_suite(path).sha256 != before


def test_errors_are_one_line_from_the_cli(tmp_path):
    res = validate_cli(write(tmp_path, GOOD.replace("detector: lab-cross", "detector: lab-cros")))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "did you mean" in res.stderr
