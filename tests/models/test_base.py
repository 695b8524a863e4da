"""The base, resolved once (issue 25 §1): what ``--base`` names becomes one frozen value when the configuration is
resolved, every module gets that value, and what is written to JSON is the name as the user gave it."""

import ast
import dataclasses
import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

import auditkit
from auditkit.config import ScanConfig
from auditkit.errors import BadInput
from auditkit.lab.bases import LAB_BASES
from auditkit.models import architectures
from auditkit.models.base import Base, resolve_base

PACKAGE = Path(auditkit.__file__).parent
LAB_HOME = {"lab/bases.py"}  # the one module that tests a name for being a lab model's
SAFETY = Path(str(resources.files("auditkit.lab").joinpath("assets", "adapters", "safety-esd-u.safetensors")))
needs_lab = pytest.mark.skipif(not LAB_BASES["lab"].available(), reason="lab model not built")


def test_a_lab_name_resolves_to_the_lab_record_and_keeps_its_name():
    base = resolve_base("lab-dit")
    assert base == Base("lab-dit", LAB_BASES["lab-dit"]) and str(base) == "lab-dit"
    assert base.suites == ("lab-cross", "lab-neon") and base.absolute() is base  # a lab name is never a path
    assert base.architecture is architectures.get("lab-dit")  # the shipped table, not built from the folder
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.name = "lab"


def test_a_folder_base_reads_nothing_until_asked(tmp_path):
    base = resolve_base(str(tmp_path / "nowhere"))
    assert base.lab is None and base.folder == tmp_path / "nowhere" and base.suites == ("nudity", "benign")
    assert base.absolute() == base and resolve_base("rel").absolute().name == str(Path("rel").absolute())
    with pytest.raises(BadInput, match="not a diffusers pipeline folder"):
        base.family  # noqa: B018 - first use reads model_index.json


@needs_lab
@pytest.mark.slow  # builds the architecture on the meta device (imports torch, diffusers)
def test_a_folder_base_has_its_family_and_the_architecture_its_shapes_match(tmp_path, monkeypatch):
    from auditkit.models import pipeline

    reads = []
    monkeypatch.setattr(pipeline, "read_model_index", lambda f, read=pipeline.read_model_index: reads.append(f)
                        or read(f))
    folder = tmp_path / "my-base"
    folder.symlink_to(LAB_BASES["lab"].path())
    base = resolve_base(str(folder))
    assert base.family.name == "sd" and base.check().name == "sd"
    assert base.architecture is architectures.get("lab") and base.extra_architectures == ()
    assert reads == [folder]  # model_index.json read once, however often the base is asked


def test_the_configuration_resolves_the_base_once_and_records_its_name(tmp_path):
    config = ScanConfig(base="lab-dit")
    assert isinstance(config.base, Base) and config.base.lab is LAB_BASES["lab-dit"]
    assert dataclasses.replace(config, steps=3).base is config.base  # passed down as it is, not resolved again
    assert config.to_dict()["base"] == "lab-dit"
    folder = ScanConfig(base=str(tmp_path / "sd"))
    assert json.loads(json.dumps(folder.to_dict()))["base"] == str(tmp_path / "sd")
    with pytest.raises(ValueError, match="base: must be"):
        ScanConfig(base=3)


def test_a_config_file_base_is_a_lab_name_or_a_folder_relative_to_the_file(tmp_path):
    from auditkit.configfile import load

    (tmp_path / "auditkit.toml").write_text('base = "lab-dit"\n')
    assert load(tmp_path / "auditkit.toml")["base"] == resolve_base("lab-dit")
    (tmp_path / "auditkit.toml").write_text('base = "models/sd"\n')
    assert load(tmp_path / "auditkit.toml")["base"].name == str(tmp_path / "models" / "sd")
    (tmp_path / "auditkit.toml").write_text('base = "LAB"\n')
    with pytest.raises(BadInput, match="did you mean 'lab'"):
        load(tmp_path / "auditkit.toml")


def test_the_run_log_and_the_report_record_the_base_as_named():
    from auditkit.dynamic import _header
    from auditkit.lora.adapter import read_adapter
    from auditkit.report.build import build_report

    adapter = read_adapter(SAFETY)
    assert _header(resolve_base("lab"), [], (1.0,), None, {}, {}, ())["base"] == "lab"
    report = build_report(adapter, adapter, None, ScanConfig(base="lab-dit", safety=SAFETY))
    assert report["base"] == "lab-dit" and report["config"]["base"] == "lab-dit"
    json.dumps(report)


def _lab_name_tests(path: Path, root: Path = PACKAGE) -> list[str]:
    """Where ``path`` (a module under ``root``) compares something with a lab name, or looks a name up among
    the lab models (outside :mod:`auditkit.models.base`, which resolves the base)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            names = [n.value for n in (node.left, *node.comparators) if isinstance(n, ast.Constant)]
            if any(v in LAB_BASES for v in names):
                found.append(f"{path.name}:{node.lineno}: compares with a lab name")
        if isinstance(node, ast.ImportFrom) and node.module == "auditkit.lab.bases":
            used = {a.name for a in node.names} & {"lab_base", "refuse_miscased_lab"}
            if used and path.relative_to(root).as_posix() != "models/base.py":
                found.append(f"{path.name}:{node.lineno}: imports {', '.join(sorted(used))}")
    return found


def test_lab_names_are_tested_only_in_the_lab_bases_module():
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) if path.relative_to(PACKAGE).as_posix() not in LAB_HOME
             for hit in _lab_name_tests(path)]
    assert not found, found


def test_the_lab_name_check_finds_a_comparison(tmp_path):
    (tmp_path / "m.py").write_text('def f(base):\n    return base == "lab-dit"\n')
    (tmp_path / "n.py").write_text("from auditkit.lab.bases import lab_base\n")
    hits = [h for p in (tmp_path / "m.py", tmp_path / "n.py") for h in _lab_name_tests(p, tmp_path)]
    assert len(hits) == 2, hits


@needs_lab
@pytest.mark.slow  # a real process
def test_batch_with_a_lab_dit_base_keeps_the_lab_name(tmp_path):
    """``auditkit batch --base lab-dit`` from a folder where ``lab-dit`` is no path: the batch records and scans
    with the lab model (the lab safety adapter is refused for being another architecture than lab-dit's, by
    name, not as a missing folder). Before aa8eaaa (issue 26 M2) batch.json recorded ``<cwd>/lab-dit``."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "c.safetensors").write_bytes(SAFETY.read_bytes())
    run = subprocess.run([sys.executable, "-m", "auditkit", "batch", "in", "--base", "lab-dit", "--safety", str(SAFETY),
                          "--static", "--out", "o", "--triage-workers", "1", "--no-config"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 3, run.stderr
    assert json.loads((tmp_path / "o" / "batch.json").read_text())["scan"]["base"] == "lab-dit"
    (row,) = [json.loads(line) for line in (tmp_path / "o" / "results.jsonl").read_text().splitlines()]
    assert "another architecture than --base lab-dit (lab-dit:" in row["error"], row["error"]
