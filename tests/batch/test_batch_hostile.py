"""`auditkit batch` on hostile inputs (issue 26): nothing read from an input file reaches the results, sidecars are
part of an input's identity, every file found is a row, and every bad setting is refused before anything is
written. Static-only batches on the lab's safety adapter: no model loads, each test well under a second or two."""

import os
from importlib import resources
from pathlib import Path

import pytest

from auditkit.batch import BatchConfig, run_batch
from auditkit.config import ScanConfig

SAFETY = Path(str(resources.files("auditkit.lab").joinpath("assets", "adapters",
                                                           "safety-esd-u-destructive.safetensors")))
SECRET = "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI"


@pytest.fixture(scope="module")
def candidate(tmp_path_factory) -> Path:
    """A weak copy of the safety adapter (1e-3 of its update): a valid lab adapter."""
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("candidate") / "q.safetensors"
    save_file({k: v if k.endswith("alpha") else v * 1e-3 for k, v in load_file(SAFETY).items()}, path)
    return path


def static_batch(source: Path, out: Path, **scan) -> object:
    config = ScanConfig(safety=SAFETY, static_only=True, **scan)
    return run_batch(BatchConfig(source, out, config, triage_workers=1))


def by_id(result) -> dict:
    return {r["id"]: r for r in result.rows}


def written_text(out: Path) -> str:
    return "".join((out / n).read_text(errors="replace") for n in ("results.csv", "results.jsonl", "index.html"))


# issue 26 H4: a link to a host file in a batch folder neither leaks its content nor is followed out of the folder
def test_a_link_leaving_the_batch_folder_is_refused_and_no_file_content_is_quoted(tmp_path, candidate):
    (tmp_path / "s.env").write_text(SECRET + "\n")
    folder = tmp_path / "y"
    folder.mkdir()
    (folder / "q.safetensors").write_bytes(candidate.read_bytes())
    (folder / "m.safetensors").symlink_to(tmp_path / "s.env")
    result = static_batch(folder, tmp_path / "o")
    row = by_id(result)["m.safetensors"]
    assert row["verdict"] == "error" and "leads out of the batch folder" in row["error"]
    assert "wJalr" not in written_text(tmp_path / "o") and "wJalr" not in str(result.rows)


# issue 26 H4: an absolute path in a manifest (or its safety column) to a text file is named, never quoted
def test_a_text_file_named_by_a_manifest_is_an_error_row_that_quotes_nothing(tmp_path, candidate):
    (tmp_path / "s.env").write_text(SECRET + "\n")
    (tmp_path / "m.csv").write_text(f"path,id,safety\n{tmp_path / 's.env'},env,\n{candidate},q,{tmp_path / 's.env'}\n")
    result = static_batch(tmp_path / "m.csv", tmp_path / "o")
    rows = by_id(result)
    assert rows["env"]["verdict"] == "error" and "a text file" in rows["env"]["error"]
    assert "wJalr" not in written_text(tmp_path / "o") and "wJalr" not in str(result.rows)


# issue 26 H2: a copy with other sidecars is not a duplicate of the file without them
def test_files_with_other_sidecars_are_not_duplicates(tmp_path, candidate):
    folder = tmp_path / "d"
    folder.mkdir()
    for name in "abc":
        (folder / f"{name}.safetensors").write_bytes(candidate.read_bytes())
    (folder / "b.civitai.info").write_text('{"trainedWords": ["ohwx"]}')
    (folder / "c.json").write_text("{")
    rows = by_id(static_batch(folder, tmp_path / "o"))
    assert [rows[f"{n}.safetensors"].get("duplicate_of") for n in "abc"] == [None, None, None]
    assert rows["b.safetensors"]["sidecars_sha256"] not in (None, rows["c.safetensors"]["sidecars_sha256"])


# issue 26 H2: a sidecar added (or changed) after a file was scanned makes a resumed batch scan it again
def test_a_resumed_batch_scans_again_a_file_whose_sidecar_changed(tmp_path, candidate):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "a.safetensors").write_bytes(candidate.read_bytes())
    assert static_batch(folder, tmp_path / "o").scanned == 1
    assert static_batch(folder, tmp_path / "o").scanned == 0
    (folder / "a.civitai.info").write_text('{"trainedWords": ["ohwx"]}')
    assert static_batch(folder, tmp_path / "o").scanned == 1


# issue 26 M14: a FIFO, a dangling link and a link to a folder are error rows, read by nothing (no hang)
def test_files_a_folder_holds_but_cannot_be_read_are_error_rows(tmp_path, candidate):
    folder = tmp_path / "n"
    folder.mkdir()
    (folder / "q.safetensors").write_bytes(candidate.read_bytes())
    (folder / "g.safetensors").symlink_to("x")
    os.mkfifo(folder / "f.safetensors")
    result = static_batch(folder, tmp_path / "o")
    rows = by_id(result)
    assert sorted(rows) == ["f.safetensors", "g.safetensors", "q.safetensors"]
    assert [rows[n]["verdict"] for n in ("f.safetensors", "g.safetensors")] == ["error", "error"]
    assert "dangling link" in rows["g.safetensors"]["error"] and result.scanned == 1


# issue 26 M3: a file whose reading raises anything unexpected in triage is an error row; the batch goes on
def test_an_unexpected_exception_in_triage_is_an_error_row(tmp_path, candidate, monkeypatch):
    import struct

    from auditkit.batch import triage

    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "q.safetensors").write_bytes(candidate.read_bytes())
    deep = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    (folder / "d.safetensors").write_bytes(struct.pack("<Q", len(deep)) + deep)
    look = triage._look

    def recursing(entry, settings, row):
        if entry.path.name == "d.safetensors":
            raise RecursionError("maximum recursion depth exceeded")
        return look(entry, settings, row)

    monkeypatch.setattr(triage, "_look", recursing)  # whatever the parsers do about depth, triage must survive
    rows = by_id(static_batch(folder, tmp_path / "o"))
    assert rows["d.safetensors"]["verdict"] == "error" and rows["q.safetensors"]["verdict"] != "error"


# issue 26 L6: a duplicate of a file that could not be scanned does not repeat its twin's message and path
def test_a_duplicate_error_row_names_its_twin_not_its_twins_message(tmp_path):
    folder = tmp_path / "e"
    folder.mkdir()
    for name in ("a", "b"):
        (folder / f"{name}.safetensors").write_text("not weights\n")
    rows = by_id(static_batch(folder, tmp_path / "o"))
    b = rows["b.safetensors"]
    assert b["duplicate_of"] == "a.safetensors" and b["verdict"] == "error"
    assert str(folder / "a.safetensors") not in b["error"] and "a.safetensors" in b["error"]


# issue 26 L5: --out on a folder that is not a batch folder is refused before anything in it is overwritten
def test_an_out_folder_that_is_not_a_batch_is_refused(tmp_path, candidate):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "index.html").write_text("mine")
    from auditkit.errors import BadInput

    with pytest.raises(BadInput, match="not a batch folder"):
        static_batch(candidate, tmp_path / "o")
    assert (tmp_path / "o" / "index.html").read_text() == "mine" and not (tmp_path / "o" / "results.csv").exists()


# issue 26 M2, L14: a lab name stays a lab name; a base that is no pipeline is refused before batch.json pins it
@pytest.mark.parametrize("base, message", [("LAB", "not a diffusers pipeline folder"),
                                           ("/nonexistent", "not a diffusers pipeline folder"),
                                           ("folder", "not a diffusers pipeline folder")])
def test_a_base_that_is_no_pipeline_is_refused_before_anything_is_written(tmp_path, candidate, base, message):
    from auditkit.errors import BadInput

    (tmp_path / "folder").mkdir()
    (tmp_path / "m.csv").write_text(f"path,base\n{candidate},{base}\n")
    with pytest.raises(BadInput, match=message):
        static_batch(tmp_path / "m.csv", tmp_path / "o")
    with pytest.raises(BadInput, match=message):
        static_batch(candidate, tmp_path / "o2", base=str(tmp_path / base.lstrip("/")))
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


def test_a_lab_base_name_is_never_made_a_path():
    from auditkit.batch.run import _absolute  # issue 26 M2

    for base in ("lab", "lab-dit"):
        assert _absolute(BatchConfig(Path("x"), Path("o"), ScanConfig(base=base))).scan.base.name == base


# issue 26 M6: a row's trigger words added to the batch's must still be a valid setting, checked before any work
def test_too_many_trigger_words_for_a_row_are_refused_before_anything_is_written(tmp_path, candidate):
    from auditkit.errors import BadInput

    (tmp_path / "t.csv").write_text(f"path,triggers\n{candidate},e;f;g;h\n")
    with pytest.raises(BadInput, match=r"t\.csv: .*at most 8 trigger words"):
        static_batch(tmp_path / "t.csv", tmp_path / "o", triggers=("a", "b", "c", "d", "z"))
    assert not (tmp_path / "o").exists()


# issue 26 M16: an unreachable Ray cluster is one line, before triage and before anything is written
def test_an_unreachable_ray_cluster_is_refused_before_any_work(tmp_path, candidate, monkeypatch):
    import sys
    import types

    from auditkit.batch import triage
    from auditkit.errors import BadInput

    def refuse(**kwargs):
        raise ConnectionError(f"could not reach {kwargs.get('address')}")

    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: False, init=refuse))
    monkeypatch.setattr(triage, "triage_one", lambda *a: pytest.fail("triaged before connecting"))
    config = BatchConfig(candidate, tmp_path / "o", ScanConfig(safety=SAFETY, static_only=True), engine="ray",
                         address="10.255.255.1:6379", triage_workers=1)
    with pytest.raises(BadInput, match=r"cannot start or reach the Ray cluster at 10\.255\.255\.1:6379"):
        run_batch(config)
    assert not (tmp_path / "o").exists()
