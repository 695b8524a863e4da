"""Batch inputs: folders, list files and CSV/Parquet manifests, and hostile ones (one-line errors, bounded reads)."""

from pathlib import Path

import pytest
from conftest import assert_one_line_error

from auditkit.batch import inputs
from auditkit.batch.inputs import Entry, read_entries


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_a_folder_is_searched_recursively_for_adapter_files_pickles_included(tmp_path):
    for name in ("a.safetensors", "sub/b.safetensors", "sub/deep/c.ckpt", "notes.txt", "a.civitai.info",
                 ".hidden.safetensors", ".git/x.safetensors", "out/old.safetensors"):
        touch(tmp_path / "in" / name)
    entries = read_entries(tmp_path / "in", exclude=tmp_path / "in" / "out")
    assert [e.id for e in entries] == ["a.safetensors", "sub/b.safetensors", "sub/deep/c.ckpt"]
    assert entries[1].path == tmp_path / "in" / "sub" / "b.safetensors"


def test_a_list_file_names_paths_relative_to_its_folder(tmp_path):
    touch(tmp_path / "a.safetensors")
    (tmp_path / "list.txt").write_text(f"# adapters\na.safetensors\n\n{tmp_path / 'b.safetensors'}\na.safetensors\n")
    entries = read_entries(tmp_path / "list.txt")
    assert [e.id for e in entries] == ["a.safetensors", str(tmp_path / "b.safetensors"), "a.safetensors#2"]
    assert entries[0].path == tmp_path / "a.safetensors"


def test_a_csv_manifest_gives_ids_and_row_settings(tmp_path):
    (tmp_path / "m.csv").write_text("path,id,safety,base,triggers\n"
                                    "x/a.safetensors,first,,,\n"
                                    "b.safetensors,,none,lab,zxq style; neon\n"
                                    "c.safetensors,third,s.safetensors,,\n")
    a, b, c = read_entries(tmp_path / "m.csv")
    assert (a.id, a.path, a.safety, a.base, a.triggers) == ("first", tmp_path / "x" / "a.safetensors", "", None, ())
    assert (b.id, b.safety, b.base.name, b.triggers) == ("b.safetensors", "none", "lab", ("zxq style", "neon"))
    assert c.safety == str(tmp_path / "s.safetensors")


def test_a_parquet_manifest_reads_like_a_csv(tmp_path):
    import pandas as pd

    pd.DataFrame({"path": ["a.safetensors", "b.safetensors"], "id": ["one", None]}).to_parquet(tmp_path / "m.parquet")
    assert [e.id for e in read_entries(tmp_path / "m.parquet")] == ["one", "b.safetensors"]


@pytest.mark.parametrize("text, message", [
    ("file,id\na.safetensors,x\n", "no 'path' column"),
    ("path,colour\na.safetensors,red\n", "unknown column(s) 'colour'"),
    ("path,id\na.safetensors,x\nb.safetensors,x\n", "id 'x' is used twice"),
    ("path\n../outside.safetensors\n", "leads out of the manifest's folder"),
    ("path\nsub/../../outside.safetensors\n", "leads out of the manifest's folder"),
    ('path,id\n"a.safetensors,x\n', "cannot read the CSV manifest"),
    ("path\n\n", "names no adapter files"),
])
def test_a_bad_manifest_is_a_one_line_error_naming_it(tmp_path, text, message):
    (tmp_path / "m.csv").write_text(text)
    path = tmp_path / "m.csv"
    assert_one_line_error(lambda: read_entries(path), path, message)


def test_bad_inputs_are_one_line_errors(tmp_path):
    assert_one_line_error(lambda: read_entries(tmp_path / "gone"), tmp_path / "gone", "no such file or folder")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(lambda: read_entries(tmp_path / "empty"), tmp_path / "empty", "names no adapter files")
    touch(tmp_path / "bin.txt", b"\x00\x01binary")
    assert_one_line_error(lambda: read_entries(tmp_path / "bin.txt"), tmp_path / "bin.txt", "binary content")
    touch(tmp_path / "latin.txt", "caf\xe9.safetensors".encode("latin-1"))
    assert_one_line_error(lambda: read_entries(tmp_path / "latin.txt"), tmp_path / "latin.txt", "not UTF-8")
    touch(tmp_path / "m.parquet", b"PAR1 not really parquet")
    assert_one_line_error(lambda: read_entries(tmp_path / "m.parquet"), tmp_path / "m.parquet",
                          "cannot read the PARQUET manifest")


def test_a_huge_list_file_is_refused_without_reading_it_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "MAX_LIST_BYTES", 1000)
    (tmp_path / "list.txt").write_text("a.safetensors\n" * 500)
    assert_one_line_error(lambda: read_entries(tmp_path / "list.txt"), tmp_path / "list.txt", "larger than 1000 bytes")
    (tmp_path / "m.csv").write_text("path\n" + "a.safetensors\n" * 500)
    assert_one_line_error(lambda: read_entries(tmp_path / "m.csv"), tmp_path / "m.csv", "larger than 1000 bytes")


def test_report_folders_are_safe_names_whatever_the_id():
    names = {Entry(i, Path("x")).folder for i in ("../../etc/passwd", "<script>alert(1)</script>", "a/b", "a_b", "..")}
    assert len(names) == 5
    assert all("/" not in n and not n.startswith(".") and n.replace("-", "").replace("_", "").replace(".", "").isalnum()
               for n in names)


@pytest.mark.parametrize("make", ["missing", "bad-column", "escaping"])
def test_a_bad_batch_input_is_one_line_exit_2_and_nothing_written(tmp_path, make):
    from conftest import run_cli

    source = {"missing": tmp_path / "gone", "bad-column": tmp_path / "m.csv", "escaping": tmp_path / "list.txt"}[make]
    if make == "bad-column":
        source.write_text("file\na.safetensors\n")
    elif make == "escaping":
        source.write_text("../../etc/passwd.safetensors\n")
    res = run_cli("batch", source, "--out", tmp_path / "out", "--no-config", "--static")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert str(source) in res.stderr and not (tmp_path / "out").exists()


def test_the_ray_engine_without_ray_is_one_line(tmp_path, monkeypatch):
    import sys

    from auditkit.batch.ray_engine import import_ray
    from auditkit.errors import BadInput

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as where it is not installed
    with pytest.raises(BadInput, match=r"--engine ray needs Ray: pip install 'auditkit\[ray\]'"):
        import_ray()


# issue 26 M14: an unreadable subfolder, a dangling link, a FIFO and a link to a folder are rows, never skipped
def test_what_a_folder_holds_but_cannot_be_read_safely_is_an_entry_with_its_problem(tmp_path, monkeypatch):
    import os

    folder = tmp_path / "n"
    touch(folder / "q.safetensors")
    (folder / "g.safetensors").symlink_to("missing-annex-object")
    os.mkfifo(folder / "f.safetensors")
    touch(folder / "locked" / "x.safetensors")
    touch(tmp_path / "elsewhere" / "y.safetensors")
    (folder / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    scandir = os.scandir

    def refuse_locked(path="."):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse_locked)  # as a folder without read permission (the tests run as root)
    problems = {e.id: e.problem for e in read_entries(folder)}
    assert problems["q.safetensors"] == ""
    assert "dangling link" in problems["g.safetensors"]
    assert "not a regular file" in problems["f.safetensors"]
    assert "cannot read the folder (Permission denied)" in problems["locked"]
    assert "a link to a folder, not followed" in problems["linked"]


# issue 26 H4: a link in a batch folder that leads out of it is refused (one inside it is an ordinary file)
def test_a_link_out_of_a_batch_folder_is_refused_and_one_inside_is_read(tmp_path):
    touch(tmp_path / "secret.env", b"KEY=1")
    touch(tmp_path / "in" / "a.safetensors")
    (tmp_path / "in" / "out.safetensors").symlink_to(tmp_path / "secret.env")
    (tmp_path / "in" / "same.safetensors").symlink_to(tmp_path / "in" / "a.safetensors")
    problems = {e.id: e.problem for e in read_entries(tmp_path / "in")}
    assert "leads out of the batch folder" in problems["out.safetensors"] and problems["same.safetensors"] == ""


# issue 26 M14: a list or manifest naming a FIFO or a dangling link gives an entry that nothing will read
def test_a_listed_fifo_or_dangling_link_is_an_entry_with_its_problem(tmp_path):
    import os

    os.mkfifo(tmp_path / "f.safetensors")
    (tmp_path / "g.safetensors").symlink_to("gone")
    (tmp_path / "list.txt").write_text("f.safetensors\ng.safetensors\n")
    f, g = read_entries(tmp_path / "list.txt")
    assert "not a regular file" in f.problem and "dangling link" in g.problem


# issue 26 L7: a repeated line's id never clashes with a line that is literally that id
def test_list_file_ids_stay_unique_when_a_line_looks_like_a_repeat(tmp_path):
    (tmp_path / "list.txt").write_text("a.safetensors\na.safetensors\na.safetensors#2\n")
    ids = [e.id for e in read_entries(tmp_path / "list.txt")]
    assert len(set(ids)) == 3 and ids[2] == "a.safetensors#2"


# issue 26 L13: a linked subfolder cannot lead a manifest's relative path out of its folder; '~' is not a shortcut
@pytest.mark.parametrize("row, message", [
    ("link/x.safetensors", "leads out of the manifest's folder"),
    ("~/x.safetensors", "'~' is not expanded"),
])
def test_a_manifest_path_cannot_leave_its_folder_by_a_link_or_a_tilde(tmp_path, row, message):
    touch(tmp_path / "outside" / "x.safetensors")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    (tmp_path / "m" / "m.csv").write_text(f"path\n{row}\n")
    assert_one_line_error(lambda: read_entries(tmp_path / "m" / "m.csv"), tmp_path / "m" / "m.csv", message)


# issue 26 M6: a manifest's trigger words are checked as the scan checks them, naming the row
@pytest.mark.parametrize("cell, message", [
    ("a;b;c;d;e;f;g;h;i", "at most 8 trigger words"),
    ("x" * 101, "is not a trigger word"),
    ("ohwx\u200b", "is not a trigger word"),
])
def test_bad_manifest_trigger_words_are_refused_naming_the_row(tmp_path, cell, message):
    (tmp_path / "t.csv").write_text(f"path,triggers\nq.safetensors,{cell}\n", encoding="utf-8")
    assert_one_line_error(lambda: read_entries(tmp_path / "t.csv"), tmp_path / "t.csv", "row 2: triggers: ")
    assert_one_line_error(lambda: read_entries(tmp_path / "t.csv"), tmp_path / "t.csv", message)


# issue 26 M2: a lab name in a manifest's base column is a lab name, never a path
@pytest.mark.parametrize("base", ["lab", "lab-dit"])
def test_a_lab_base_in_a_manifest_stays_a_lab_name(tmp_path, base):
    (tmp_path / "m.csv").write_text(f"path,base\nq.safetensors,{base}\n")
    (entry,) = read_entries(tmp_path / "m.csv")
    assert entry.base.name == base and entry.base.lab is not None


# issue 26 M8: a Parquet manifest that would decompress past the limit is refused from its metadata
def test_a_parquet_decompression_bomb_is_refused_before_it_is_read(tmp_path, monkeypatch):
    import pandas as pd

    monkeypatch.setattr(inputs, "MAX_LIST_BYTES", 10_000)
    pd.DataFrame({"path": ["q.safetensors"], "id": ["x" * 200_000]}).to_parquet(tmp_path / "b.parquet",
                                                                                compression="gzip")
    assert (tmp_path / "b.parquet").stat().st_size < 10_000
    read = []
    monkeypatch.setattr(pd, "read_parquet", lambda *a, **k: read.append(1))
    assert_one_line_error(lambda: read_entries(tmp_path / "b.parquet"), tmp_path / "b.parquet",
                          "the manifest decompresses to more than")
    assert not read


# issue 26 M14: a FIFO given as the batch's input is an entry nothing reads (hashing it would wait forever)
def test_a_fifo_given_as_the_input_is_an_entry_with_its_problem(tmp_path):
    import os

    os.mkfifo(tmp_path / "f.safetensors")
    (entry,) = read_entries(tmp_path / "f.safetensors")
    assert "not a regular file" in entry.problem
