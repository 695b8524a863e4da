"""Project config: discovery, precedence, errors, `auditkit init` and `auditkit config`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from auditkit.configfile import COMMAND_LINE, DEFAULT, find, load, render, resolve
from auditkit.errors import BadInput


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "auditkit", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_discovery_walks_up_and_auditkit_toml_wins_over_pyproject(tmp_path):
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    assert find(deep) is None
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    assert find(deep) is None  # a pyproject without [tool.auditkit] is not a config
    (tmp_path / "pyproject.toml").write_text('[tool.auditkit]\nbase = "lab"\n')
    assert find(deep) == tmp_path / "pyproject.toml"
    (tmp_path / "auditkit.toml").write_text('base = "lab"\n')
    assert find(deep) == tmp_path / "auditkit.toml"
    (tmp_path / "a" / "auditkit.toml").write_text("multipliers = [1]\n")
    assert find(deep) == tmp_path / "a" / "auditkit.toml"  # the nearest folder wins


def test_precedence_defaults_file_command_line(tmp_path):
    cfg = tmp_path / "auditkit.toml"
    cfg.write_text('base = "lab"\nsafety = "s.safetensors"\nmultipliers = [1, 2]\nsteps = 5\n'
                   '[dynamic]\nrisk_ratio = 0.3\n[detectors]\nnudity = "nudenet-strict"\n')
    config, sources, path = resolve({"steps": 7, "dynamic.significance": 0.01}, start=tmp_path)
    assert path == cfg and config.base.name == "lab" and config.safety == tmp_path / "s.safetensors"  # relative to file
    assert config.multipliers == (1.0, 2.0) and config.steps == 7 and config.batch_size == 16
    assert config.dynamic.risk_ratio == 0.3 and config.dynamic.significance == 0.01
    assert dict(config.detectors) == {"nudity": "nudenet-strict"}
    assert sources["steps"] == COMMAND_LINE and sources["base"] == str(cfg) and sources["batch_size"] == DEFAULT
    assert sources["dynamic.risk_ratio"] == str(cfg) and sources["dynamic.significance"] == COMMAND_LINE
    assert resolve({}, use_file=False, start=tmp_path)[0].base is None


def test_pyproject_table(tmp_path):
    text = '[project]\nname = "x"\n[tool.auditkit]\nbase = "lab"\nstatic-only = true\n'
    (tmp_path / "pyproject.toml").write_text(text)
    config, _, _ = resolve({}, start=tmp_path)
    assert config.base.name == "lab" and config.static_only


@pytest.mark.parametrize("text, message", [
    ("bsae = 'lab'\n", "bsae: unknown key (did you mean 'base'?)"),
    ("steps = 'ten'\n", "steps: must be an integer"),
    ("multipliers = [1, true]\n", "multipliers: must be a list of numbers"),
    ("candidate = 'x.safetensors'\n", "candidate: set per scan"),
    ("[static]\nrisk = 0.5\n", "static.risk: unknown threshold"),
    ("[dynamic]\nrisk_ratio = nan\n", "dynamic.risk_ratio: must be a number"),
    ("base = \n", "not valid TOML"),
])
def test_bad_config_files_name_the_file_and_key(tmp_path, text, message):
    cfg = tmp_path / "auditkit.toml"
    cfg.write_text(text)
    with pytest.raises(BadInput) as exc:
        load(cfg)
    assert str(exc.value).startswith(str(cfg)) and message in str(exc.value) and "\n" not in str(exc.value)


def test_values_out_of_range_are_refused(tmp_path):
    (tmp_path / "auditkit.toml").write_text("multipliers = [0.5, 1e9]\n")
    with pytest.raises(BadInput, match="multipliers"):
        resolve({}, start=tmp_path)
    for bad in ({"steps": 0}, {"steps": -1}, {"batch_size": 0}, {"multipliers": (float("nan"),)},
                {"device": "nonsense"}, {"dynamic.risk_ratio": 2.0}):
        with pytest.raises(BadInput):
            resolve(bad, use_file=False)


def test_init_writes_a_config_that_reads_back(tmp_path):
    res = run("init", "--base", "lab", "--safety", "safe.safetensors", "--suite", "my.yaml", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    config, _, path = resolve({}, start=tmp_path)
    assert path == tmp_path / "auditkit.toml"
    assert config.base.name == "lab" and config.safety == tmp_path / "safe.safetensors"
    assert config.suites == (str(tmp_path / "my.yaml"),)
    text = path.read_text()
    assert "# base pipeline" in text and "[dynamic]" in text  # commented
    assert run("init", cwd=tmp_path).returncode == 2  # no overwrite without --force
    assert render(config)  # renders without a file


def test_config_command_shows_values_and_sources(tmp_path):
    (tmp_path / "auditkit.toml").write_text('base = "lab"\n')
    res = run("config", "--json", "--steps", "3", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["values"]["base"] == "lab" and info["values"]["steps"] == 3
    assert info["sources"]["base"].endswith("auditkit.toml") and info["sources"]["steps"] == "command line"
    res = run("config", cwd=tmp_path)
    assert "amplification against the base" in res.stdout
    bad = run("config", "--multipliers", "nan", cwd=tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_the_repository_ships_the_lab_example_config():
    root = Path(__file__).resolve().parents[1]
    config, _, path = resolve({}, start=root)
    assert path == root / "auditkit.toml" and config.base.name == "lab" and config.safety.is_file()
    assert all(Path(s).is_file() for s in config.suites)


@pytest.mark.parametrize("args", [["--multipliers", ","], ["--multipliers", "nan"], ["--steps", "0"],
                                  ["--steps", "-1"], ["--batch-size", "-1"], ["--batch-size", "0"],
                                  ["--device", "nonsense"], ["--detector", "nudity"]])
def test_bad_numbers_on_the_command_line_are_one_line_errors_before_anything_runs(tmp_path, args):
    # issue 10.13/10.15: these were ignored, rendered nothing or failed after the model loaded
    res = run("scan", tmp_path / "missing.safetensors", "--base", "lab", *args, "--out", tmp_path / "r", cwd=tmp_path)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------
# hostile config files (issue 26): a config file that exists but cannot be read is an error, never
# skipped; every TOML read is bounded in size and depth.


def assert_one_line(exc_info, path, *words):
    text = str(exc_info.value)
    assert text.startswith(str(path)) and "\n" not in text and len(text) < 400, text
    assert all(w in text for w in words), text


def test_a_broken_pyproject_naming_tool_auditkit_is_an_error_not_skipped_for_a_parents_config(tmp_path):
    # issue 26 H3: the parent's auditkit.toml was used instead (RISK could become PASS)
    (tmp_path / "auditkit.toml").write_text('base = "lab"\nmultipliers = [1]\n')
    child = tmp_path / "c"
    child.mkdir()
    (child / "pyproject.toml").write_text('[project]\nversion = 1.0.0\n[tool.auditkit]\nbase = "lab"\n')
    with pytest.raises(BadInput) as exc:
        find(child)
    assert_one_line(exc, child / "pyproject.toml", "not valid TOML")
    res = run("config", cwd=child)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "pyproject.toml" in res.stderr, res.stderr


def test_a_broken_pyproject_without_auditkit_is_an_error_too(tmp_path):
    # issue 26 H3: we cannot tell what a file we cannot parse holds, so discovery stops there (as ruff and
    # pytest do); --no-config or --config FILE skip discovery
    (tmp_path / "pyproject.toml").write_text("[project]\nversion = 1.0.0\n")
    with pytest.raises(BadInput) as exc:
        find(tmp_path)
    assert_one_line(exc, tmp_path / "pyproject.toml", "not valid TOML", "--no-config")
    assert resolve({}, use_file=False, start=tmp_path)[2] is None


def _dangling(p):
    p.symlink_to(p.parent / "missing.toml")


def _looping(p):
    p.symlink_to(p)


def _folder(p):
    p.mkdir()


def _fifo(p):
    os.mkfifo(p)


def _dev_zero(p):
    p.symlink_to("/dev/zero")


@pytest.mark.parametrize("name", ["auditkit.toml", "pyproject.toml"])
@pytest.mark.parametrize("make, words", [(_dangling, "cannot read"), (_looping, "cannot read"),
                                         (_folder, "not a regular file"), (_fifo, "not a regular file"),
                                         (_dev_zero, "not a regular file")])
def test_an_unreadable_config_file_is_an_error_not_skipped(tmp_path, name, make, words):
    # issue 26 H3/M4: a dangling, looping or special-file config was read as "no config"
    if make in (_fifo, _dev_zero) and not hasattr(os, "mkfifo"):
        pytest.skip("POSIX only")
    (tmp_path / "auditkit.toml").write_text('base = "lab"\n')
    child = tmp_path / "c"
    child.mkdir()
    make(child / name)
    with pytest.raises(BadInput) as exc:
        resolve({}, start=child)
    assert_one_line(exc, child / name, words)


@pytest.mark.parametrize("name", ["auditkit.toml", "pyproject.toml"])
@pytest.mark.parametrize("text, words", [
    ("x = " + "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("x = " + "{a = " * 50_000 + "1" + "}" * 50_000, "nested too deeply"),
    ("x." * 50_000 + "y = 1\n", "nested too deeply"),
    ("[" + "a." * 50_000 + "b]\n", "nested too deeply"),
])
def test_a_toml_bomb_is_one_line_and_fast(tmp_path, name, text, words):
    # issue 26 M4: RecursionError in every config-reading command (dotted keys: a minute of parsing)
    (tmp_path / name).write_text(text)
    with pytest.raises(BadInput) as exc:
        resolve({}, start=tmp_path)
    assert_one_line(exc, tmp_path / name, words)


def test_a_non_table_tool_in_a_pyproject_is_one_line(tmp_path):
    # issue 26 M4: `tool = 5` was a TypeError
    (tmp_path / "pyproject.toml").write_text("tool = 5\n")
    with pytest.raises(BadInput) as exc:
        find(tmp_path)
    assert_one_line(exc, tmp_path / "pyproject.toml", "tool: must be a table")
    (tmp_path / "pyproject.toml").write_text("[tool]\nauditkit = 5\n")
    with pytest.raises(BadInput) as exc:
        resolve({}, start=tmp_path)
    assert_one_line(exc, tmp_path / "pyproject.toml", "tool.auditkit: must be a table")


def test_a_deleted_working_directory_is_one_line(tmp_path, monkeypatch):
    # issue 26 M17: FileNotFoundError from Path.cwd()
    gone = tmp_path / "g"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    with pytest.raises(BadInput) as exc:
        resolve({})
    assert "working directory" in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("make", [_folder, _fifo])
def test_config_option_naming_a_folder_or_fifo_says_so(tmp_path, make):
    # issue 26 L2: "no such config file"
    make(tmp_path / "x.toml")
    with pytest.raises(BadInput) as exc:
        resolve({}, config_file=tmp_path / "x.toml")
    assert_one_line(exc, tmp_path / "x.toml", "not a regular file")
    with pytest.raises(BadInput, match="no such config file"):
        resolve({}, config_file=tmp_path / "missing.toml")


def test_config_option_naming_a_file_with_a_tool_auditkit_table_says_where_that_table_is_read(tmp_path):
    # issue 26 L2: "tool: unknown key"
    (tmp_path / "x.toml").write_text('[tool.auditkit]\nbase = "lab"\n')
    with pytest.raises(BadInput) as exc:
        resolve({}, config_file=tmp_path / "x.toml")
    assert_one_line(exc, tmp_path / "x.toml", "tool: unknown key", "only pyproject.toml", "top level")


def test_a_utf8_bom_is_read(tmp_path):
    # issue 26 L3: "Invalid statement (at line 1, column 1)"
    (tmp_path / "auditkit.toml").write_bytes(b'\xef\xbb\xbfbase = "lab"\n')
    assert resolve({}, start=tmp_path)[0].base.name == "lab"


def test_an_unknown_arch_in_the_config_file_is_refused(tmp_path):
    # issue 26 M5: `arch = "sd99"` passed `config`, then a KeyError in `scan`
    (tmp_path / "auditkit.toml").write_text('arch = "sd99"\n')
    with pytest.raises(BadInput) as exc:
        resolve({}, start=tmp_path)
    assert "arch" in str(exc.value) and "sd15" in str(exc.value) and str(tmp_path) in str(exc.value)
    res = run("config", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr


@pytest.mark.parametrize("text, words", [(f'device = "{"a" * 900_000}"\n', "device"),
                                         (f'{"a" * 900_000} = 1\n', "unknown key"),
                                         (f'[static]\n{"a" * 900_000} = 1\n', "unknown threshold")])
def test_a_huge_value_or_key_is_truncated_in_the_error(tmp_path, text, words):
    # issue 26 M19: a 900 KB error line
    (tmp_path / "auditkit.toml").write_text(text)
    with pytest.raises(BadInput) as exc:
        resolve({}, start=tmp_path)
    assert words in str(exc.value) and len(str(exc.value)) < 500


@pytest.mark.parametrize("given, prefix", [({"static.pass_cancellation": 0.9}, "static.pass_cancellation"),
                                           ({"static.min_coverage": 2.0}, "static.min_coverage"),
                                           ({"dynamic.significance": 0.7}, "dynamic.significance")])
def test_threshold_errors_name_their_table(given, prefix):
    # issue 26 L3: "pass_cancellation must not exceed ..." without `static.`
    with pytest.raises(BadInput) as exc:
        resolve(given, use_file=False)
    assert str(exc.value).startswith(prefix), str(exc.value)


@pytest.mark.parametrize("text, words", [("static-only = true\nstatic_only = false\n", "static_only: given twice"),
                                         ("[static]\nmin-coverage = 0.5\nmin_coverage = 0.9\n",
                                          "static.min_coverage: given twice")])
def test_a_key_given_twice_in_two_spellings_is_refused(tmp_path, text, words):
    # issue 26 L4: the later one won silently
    (tmp_path / "auditkit.toml").write_text(text)
    with pytest.raises(BadInput) as exc:
        load(tmp_path / "auditkit.toml")
    assert_one_line(exc, tmp_path / "auditkit.toml", words)


def one_line_error(res):
    return res.returncode == 2 and res.stderr.count("\n") == 1 and "internal error" not in res.stderr


def test_init_into_a_folder_or_an_unwritable_place_is_one_line(tmp_path):
    # issue 26 M11: internal errors (IsADirectoryError, OSError) for --path a folder, /proc/x.toml, a read-only cwd
    (tmp_path / "adir").mkdir()
    res = run("init", "--path", "adir", "--force", "--base", "lab", cwd=tmp_path)
    assert one_line_error(res) and "folder" in res.stderr, res.stderr
    if Path("/proc/self").is_dir():  # Linux: /proc is read-only, for root too
        res = run("init", "--path", "/proc/x.toml", "--base", "lab", cwd=tmp_path)
        assert one_line_error(res) and "/proc/x.toml" in res.stderr, res.stderr
        res = run("init", "--base", "lab", cwd="/proc")  # a read-only working directory
        assert one_line_error(res) and "auditkit.toml" in res.stderr, res.stderr


@pytest.mark.parametrize("name", ["😀.safetensors", "a\x01b\x7f.safetensors", 'q"\\uD83D\\n.safetensors'])
def test_init_writes_toml_that_reads_back_for_any_path(tmp_path, name):
    # issue 26 M12: json.dumps wrote non-BMP characters as surrogate pairs, which TOML refuses
    (tmp_path / "e").mkdir()
    res = run("init", "--path", "e/auditkit.toml", "--safety", tmp_path / "e" / name, "--base", "lab", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    config, _, _ = resolve({}, start=tmp_path / "e")
    assert config.safety == tmp_path / "e" / name


def test_init_paths_are_relative_to_the_working_directory_and_written_relative_to_the_file(tmp_path):
    # issue 26 L11: `--path sub/auditkit.toml --safety s.safetensors` meant sub/s.safetensors, and the
    # existence note looked in the working directory
    (tmp_path / "s.safetensors").write_bytes(b"x")
    res = run("init", "--path", "sub/auditkit.toml", "--safety", "s.safetensors", "--suite", "my.yaml",
              "--base", "lab", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    config, _, _ = resolve({}, start=tmp_path / "sub")
    assert config.safety.resolve() == tmp_path / "s.safetensors"
    assert [Path(s).resolve() for s in config.suites] == [tmp_path / "my.yaml"]
    assert "s.safetensors does not exist" not in res.stdout and "my.yaml does not exist" in " ".join(res.stdout.split())


def test_init_refuses_a_lab_name_in_another_case(tmp_path):
    # issue 26 L11: `--base LAB` was accepted (a folder named LAB in the config's folder)
    res = run("init", "--base", "LAB", cwd=tmp_path)
    assert one_line_error(res) and "'lab'" in res.stderr, res.stderr
    assert not (tmp_path / "auditkit.toml").exists()


def test_init_does_not_replace_a_pyproject(tmp_path):
    # issue 26 L12: `init --path pyproject.toml --force` replaced it with top-level keys, which discovery ignores
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    res = run("init", "--path", "pyproject.toml", "--force", "--base", "lab", cwd=tmp_path)
    assert one_line_error(res) and "[tool.auditkit]" in res.stderr, res.stderr
    assert (tmp_path / "pyproject.toml").read_text() == '[project]\nname = "x"\n'
