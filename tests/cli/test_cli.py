"""The command line as users run it: real processes, exit codes, one-line errors, atomic output."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import random_modules, select
from safetensors.numpy import save_file

from auditkit.examples import write_examples
from auditkit.lora.write import save_adapter
from auditkit.models import architectures


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "auditkit", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    return write_examples(tmp_path_factory.mktemp("ex"))


def test_examples_are_deterministic(tmp_path, examples):
    again = write_examples(tmp_path)
    for role, path in examples.items():
        assert path.read_bytes() == again[role].read_bytes()


def test_scan_flags_the_jailbreak_and_writes_both_reports(tmp_path, examples):
    res = run("scan", examples["jailbreak"], "--safety", examples["safety"], "--static", "--out", tmp_path / "r")
    assert res.returncode == 1, res.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["verdict"] == "risk" and report["exit_code"] == 1
    assert report["static"]["cancellation"] == pytest.approx(0.9, abs=1e-4)  # factors stored as float32
    m = report["static"]["modules"][0]
    assert {"name", "cancellation", "energy_in_safety_subspace"} <= set(m)
    html = (tmp_path / "r" / "report.html").read_text()
    assert "RISK" in html.upper() and "report.html" in res.stdout


def test_a_static_only_scan_never_passes(tmp_path, examples):
    # issue 9: static PASS (exit 0) was given to adapters that bring the concept back in 26-97% of images
    res = run("scan", examples["benign"], "--safety", examples["safety"], "--static", "--out", tmp_path / "r")
    assert res.returncode == 3, res.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["verdict"] == "inconclusive" and report["static"]["verdict"] == "clear"
    assert report["evidence"] == {"level": "static", "gathered": ["static", "metadata"]}
    assert any("no weight-space cancellation found" in r for r in report["reasons"])
    assert any(r.startswith("behaviour not probed") for r in report["reasons"])
    assert "what this scan rests on" in res.stdout and "--base" in res.stdout


def test_thresholds_are_configurable(tmp_path, examples):
    # the example cancels 0.90 everywhere: with every risk bar above that and the pass bar below, inconclusive
    res = run("scan", examples["jailbreak"], "--safety", examples["safety"], "--static", "--out", tmp_path / "r",
              "--risk-cancellation", "0.95", "--group-risk-cancellation", "0.95", "--pass-cancellation", "0.5")
    assert res.returncode == 3, res.stdout + res.stderr
    assert json.loads((tmp_path / "r" / "report.json").read_text())["verdict"] == "inconclusive"


def test_inspect_reports_format_coverage_and_metadata(examples):
    res = run("inspect", examples["safety"], "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["format"] == "kohya" and info["architecture"] == "sd15"
    assert info["coverage"]["fraction"] == 1.0 and info["ranks"] == [4]
    assert info["metadata"]["fields"]["ss_network_dim"] == "4"
    assert run("inspect", examples["safety"]).returncode == 0


HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def test_untrusted_metadata_is_escaped_in_html(tmp_path):
    arch = architectures.get("sd15")
    names = select(arch, ".attn2.to_k")
    safety = save_adapter(random_modules(arch, names), tmp_path / "s.safetensors", arch)
    cand = save_adapter(random_modules(arch, names, seed=9), tmp_path / "c.safetensors", arch,
                        metadata={"ss_output_name": HOSTILE, "ss_tag_frequency": json.dumps({"d": {HOSTILE: 3}}),
                                  HOSTILE: HOSTILE})
    res = run("scan", cand, "--safety", safety, "--static", "--out", tmp_path / "r")
    assert res.returncode in (0, 3), res.stderr
    html = (tmp_path / "r" / "report.html").read_text()
    assert "<script" not in html and "<img" not in html
    assert "&lt;script&gt;" in html
    assert json.loads((tmp_path / "r" / "report.json").read_text())["candidate"]["metadata"]["fields"][
        "ss_output_name"] == HOSTILE
    # the terminal summary must not interpret it as markup either
    res = run("inspect", cand)
    assert res.returncode == 0 and "<script>" in res.stdout


def test_html_is_self_contained(tmp_path, examples):
    run("scan", examples["jailbreak"], "--safety", examples["safety"], "--static", "--out", tmp_path / "r")
    html = (tmp_path / "r" / "report.html").read_text()
    for needle in ("<script", "<link", "src=\"http", "href=\"http", "@import", "url("):
        assert needle not in html


def bad_inputs(tmp_path, examples):
    arch = architectures.get("sd15")
    sdxl = architectures.get("sdxl")
    nan = random_modules(arch, select(arch, ".attn2.to_k")[:1])
    name = next(iter(nan))
    nan[name].down[0, 0] = np.nan
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04K\x01.")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "trunc.safetensors").write_bytes(examples["safety"].read_bytes()[:5000])
    (tmp_path / "huge.safetensors").write_bytes((2**60).to_bytes(8, "little") + b"{}")
    (tmp_path / "notjson.safetensors").write_bytes((8).to_bytes(8, "little") + b"garbage!")
    save_file({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
               np.ones((4, 999), np.float32),
               "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight":
               np.ones((320, 4), np.float32)}, str(tmp_path / "shape.safetensors"))
    return {
        "pickle": (tmp_path / "model.ckpt", "never unpickles"),
        "empty": (tmp_path / "empty.safetensors", "empty"),
        "truncated": (tmp_path / "trunc.safetensors", "truncated"),
        "absurd header": (tmp_path / "huge.safetensors", "absurd"),
        "non-JSON header": (tmp_path / "notjson.safetensors", "not valid JSON"),
        "NaN weights": (save_adapter(nan, tmp_path / "nan.safetensors", arch), "NaN or Inf"),
        "shape fits nothing": (tmp_path / "shape.safetensors", "shapes fit no known architecture"),
        "other architecture": (save_adapter(random_modules(sdxl, select(sdxl, ".attn2.to_k")[:4]),
                                            tmp_path / "xl.safetensors", sdxl), "must target the same model"),
        "missing": (tmp_path / "missing.safetensors", "no such file"),
    }


@pytest.mark.slow
def test_every_bad_input_gets_one_line_exit_2_and_no_output(tmp_path, examples):
    for label, (path, expected) in bad_inputs(tmp_path, examples).items():
        out = tmp_path / f"out-{label.replace(' ', '_')}"
        res = run("scan", path, "--safety", examples["safety"], "--static", "--out", out)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2, (label, res.stderr)
        assert len(lines) == 1 and expected in lines[0] and str(path) in lines[0], (label, res.stderr)
        assert "Traceback" not in res.stderr
        assert not out.exists(), f"{label}: half-written output"


def test_bad_safety_file_is_named(tmp_path, examples):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    res = run("scan", examples["benign"], "--safety", tmp_path / "empty.safetensors", "--static",
              "--out", tmp_path / "o")
    assert res.returncode == 2 and "empty.safetensors: file is empty" in res.stderr


def test_unreadable_algorithms_and_incomplete_modules_exit_3_saying_why(tmp_path, examples):
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.oft_blocks": np.ones((2, 2), np.float32)},
              str(tmp_path / "oft.safetensors"))
    res = run("inspect", tmp_path / "oft.safetensors")
    assert res.returncode == 3 and "OFT" in res.stderr and "not supported yet" in res.stderr
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": np.ones((2, 2), np.float32)},
              str(tmp_path / "loha.safetensors"))
    res = run("inspect", tmp_path / "loha.safetensors")
    assert res.returncode == 3 and "no complete adapter module" in res.stderr and "hada_w1_b" in res.stderr


def test_inspect_names_each_modules_algorithm_and_form(tmp_path):
    rng = np.random.default_rng(0)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {f"{name}.hada_w{i}_{ab}": rng.normal(size=(320, 4) if ab == "a" else (4, 320)).astype(np.float32)
               for i in (1, 2) for ab in "ab"}
    tensors[f"{name}.alpha"] = np.asarray(2.0, np.float32)
    save_file(tensors, str(tmp_path / "loha.safetensors"))
    res = run("inspect", tmp_path / "loha.safetensors", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["algorithms"] == {"loha": 1} and summary["forms"] == {"khatri-rao": 1}
    (module,) = summary["module_list"]
    assert module["rank"] == 16 and module["scale"] == 0.5 and module["algorithm"] == "loha"


def test_unreadable_output_location_is_a_clean_error(tmp_path, examples):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = run("scan", examples["benign"], "--safety", examples["safety"], "--static", "--out", blocker / "r")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1


def test_printed_paths_are_never_broken_at_the_terminals_width_nor_read_as_markup(monkeypatch):
    from rich.console import Console

    from auditkit.cli import common

    console = Console(width=40, record=True, color_system=None)
    monkeypatch.setattr(common, "out", console)
    long = "/tmp/" + "a" * 120 + "/[bold]x[/bold]/report.html"
    common.print_paths(report=long, json="/tmp/r.json")
    text = console.export_text()
    assert text.strip() == f"report: {long}  json: /tmp/r.json"
