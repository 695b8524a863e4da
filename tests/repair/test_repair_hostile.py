"""`auditkit repair` on hostile and careless inputs (issue 26): every one a one-line error (exit 2) before any
work, nothing unpickled, no pack left that looks verified when it is not. In-process and data-free: fast."""

from importlib import resources
from pathlib import Path

import pytest

pytest.importorskip("torch")

from auditkit.errors import BadInput  # noqa: E402

SAFETY = Path(str(resources.files("auditkit.lab").joinpath("assets", "adapters",
                                                           "safety-esd-u-destructive.safetensors")))


def repair(*args):
    """``auditkit repair ARGS`` in this process: its BadInput is raised, not printed."""
    from auditkit.cli import cli

    cli.main(["repair", *map(str, args)], standalone_mode=False)


@pytest.fixture()
def candidate(tmp_path):
    from auditkit.lora.adapter import LoraModule, read_adapter
    from auditkit.lora.write import save_adapter
    from auditkit.models import architectures

    s = read_adapter(SAFETY)
    mods = {n: LoraModule(n, m.down, -0.7 * m.up, m.scale) for n, m in s.modules.items()}
    return save_adapter(mods, tmp_path / "cand.safetensors", architectures.get("lab"))


@pytest.fixture()
def no_open_clip(no_unpickling, monkeypatch):
    import open_clip

    monkeypatch.setattr(open_clip, "create_model_and_transforms", no_unpickling)


@pytest.mark.parametrize("name", ["e.PT", "e.pickle", "e.Ckpt", "weights"])
def test_clip_weights_that_are_not_safetensors_are_refused_before_open_clip(tmp_path, candidate, no_open_clip, name):
    # issue 26 H5: `--clip-weights e.PT` was unpickled by open_clip (torch.load)
    import torch

    weights = tmp_path / name
    torch.serialization.save({"x": torch.zeros(2)}, str(weights))
    with pytest.raises(BadInput) as exc:
        repair(candidate, "--no-config", "--safety", SAFETY, "--method", "sign-aware", "--clip-model", "ViT-B-32",
               "--clip-weights", weights, "--out", tmp_path / "o")
    assert str(weights) in str(exc.value)
    assert not (tmp_path / "o" / "pack").exists()


def test_clip_weights_without_a_clip_model_are_refused(tmp_path, candidate):
    import click

    with pytest.raises(click.UsageError, match="--clip-weights needs --clip-model"):
        repair(candidate, "--no-config", "--safety", SAFETY, "--clip-weights", tmp_path / "w.safetensors")


@pytest.mark.parametrize("option, value", [
    ("--threshold", "nan"), ("--threshold", "inf"), ("--fidelity-target", "nan"), ("--lr", "nan"),
    ("--lr", "-inf"), ("--alpha", "nan"), ("--alpha", "inf"), ("--rank", "0"), ("--train-steps", "0"),
    ("--train-batch", "0"), ("--seed", "-1"),
])
def test_non_finite_or_out_of_range_numbers_are_refused_before_any_work(tmp_path, candidate, option, value):
    # issue 26 L16: `repair --method safelora --threshold nan` ran, projecting nothing
    with pytest.raises(BadInput, match=f"{option} must be"):
        repair(candidate, "--no-config", "--safety", SAFETY, "--method", "safelora", option, value,
               "--out", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_a_request_with_a_nan_threshold_is_refused_by_the_library_too(tmp_path, candidate):
    # issue 26 L16
    from auditkit.repair.run import RepairRequest

    with pytest.raises(BadInput, match="--threshold must be a finite number"):
        RepairRequest(candidate, SAFETY, tmp_path / "o", "safelora", threshold=float("nan"))


def _scan_header(**change) -> dict:
    header = {"base": "lab", "multipliers": [1.0], "steps_override": 2, "adapters": {"safety": "0" * 64},
              "suites": {"tiny-cross": {"detector": "lab-cross", "role": "concept", "path": "/x/tiny-cross.yaml"}}}
    return {k: v for k, v in {**header, **change}.items() if v is not None}


@pytest.mark.parametrize("change, field", [
    ({"suites": ["x"]}, "suites has the wrong type (list)"),
    ({"base": None}, "base is missing"),
    ({"base": 5}, "base has the wrong type (int)"),
    ({"triggers": "ohwx"}, "triggers has the wrong type (str)"),
    ({"multipliers": None}, "multipliers is missing"),
    ({"multipliers": ["1"]}, "multipliers[0] has the wrong type (str)"),
    ({"steps_override": "2"}, "steps_override has the wrong type (str)"),
    ({"suites": {"tiny-cross": {"detector": "lab-cross", "path": 5}}}, "suites.tiny-cross.path has the wrong type"),
    # well typed, out of range: named as the run log's, not as the command line's
    ({"steps_override": 5000}, "steps: must be an integer"), ({"multipliers": [99.0]}, "multipliers: 99.0"),
    ({"triggers": ["a\x1bb"]}, "is not a trigger word"),
])
def test_a_tampered_run_log_header_in_from_scan_is_one_line_naming_it(tmp_path, candidate, change, field):
    # issue 26 M10: `suites` a list, no `base`: internal errors; `triggers: "ohwx"` became o, h, w, x
    from auditkit.runlog import RunLog

    RunLog(tmp_path / "scan").start(_scan_header(**change))
    with pytest.raises(BadInput) as exc:
        repair(candidate, "--no-config", "--safety", SAFETY, "--base", "lab", "--method", "sign-aware",
               "--from-scan", tmp_path / "scan", "--out", tmp_path / "o")
    text = str(exc.value)
    assert text.startswith(str(tmp_path / "scan" / "run.jsonl")) and field in text and "\n" not in text, text
    assert not (tmp_path / "o").exists()


def _request(candidate, out):
    from auditkit.config import ScanConfig
    from auditkit.repair.run import RepairRequest

    return RepairRequest(candidate, SAFETY, out, "sign-aware", scan=ScanConfig(multipliers=(1.0,)))


def test_a_failed_verifying_rescan_leaves_no_pack_that_looks_verified(tmp_path, candidate, monkeypatch):
    # issue 26 M13: the pack was written before the re-scan; a re-scan that failed (exit 3) or was killed left
    # pack/*.safetensors and manifest.json, unmarked
    import auditkit.scan
    from auditkit.errors import Unscannable
    from auditkit.repair.run import UNVERIFIED_PACK, repair

    real = auditkit.scan.scan

    def failing_after(config, **kwargs):
        if "scan-after" in str(config.out):
            raise Unscannable(config.candidate, "diffusers cannot load it (the re-scan failed)")
        return real(config, **kwargs)

    monkeypatch.setattr(auditkit.scan, "scan", failing_after)
    with pytest.raises(Unscannable):
        repair(_request(candidate, tmp_path / "o"))
    assert not (tmp_path / "o" / "pack").exists()
    assert (tmp_path / "o" / UNVERIFIED_PACK / "manifest.json").is_file()  # kept, and named for what it is
    # once the re-scan runs, the pack is moved in, and its manifest and report name where it now is
    monkeypatch.setattr(auditkit.scan, "scan", real)
    report = repair(_request(candidate, tmp_path / "o"))
    pack = tmp_path / "o" / "pack"
    assert not (tmp_path / "o" / UNVERIFIED_PACK).exists()
    assert {p.name for p in pack.iterdir()} >= {"finetune.safetensors", "manifest.json"}
    assert str(pack) in report["repair"]["pack"]["diffusers"] and UNVERIFIED_PACK not in report["repair"]["pack"][
        "diffusers"]
    assert report["candidate"]["path"] == str(pack / "finetune.safetensors")


def test_a_failed_rescan_keeps_the_earlier_verified_pack_as_it_was(tmp_path, candidate, monkeypatch):
    # issue 26 M13: a second repair into the same folder replaces pack/ only once its own re-scan has run
    import auditkit.scan
    from auditkit.repair.run import repair

    repair(_request(candidate, tmp_path / "o"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "o" / "pack").iterdir()}
    real = auditkit.scan.scan

    def failing_after(config, **kwargs):
        if "scan-after" in str(config.out):
            raise KeyboardInterrupt  # a kill during the re-scan
        return real(config, **kwargs)

    monkeypatch.setattr(auditkit.scan, "scan", failing_after)
    request = _request(candidate, tmp_path / "o")
    request.method = "safelora"
    with pytest.raises(KeyboardInterrupt):
        repair(request)
    assert {p.name: p.read_bytes() for p in (tmp_path / "o" / "pack").iterdir()} == before
