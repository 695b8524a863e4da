"""Sidecars beside an adapter (civitai ``.civitai.info``, AUTOMATIC1111 ``.json``): untrusted input."""

import json
import os

import pytest
from conftest import assert_one_line_error

from auditkit.errors import BadInput
from auditkit.lora.sidecar import MAX_SIDECAR_BYTES, read_sidecar, read_sidecars, sidecar_paths


def test_civitai_and_a1111_sidecars_give_their_words(tmp_path):
    adapter = tmp_path / "style.v2.safetensors"
    (tmp_path / "style.v2.civitai.info").write_text(json.dumps(
        {"id": 1, "trainedWords": ["ohwx, glowing", "neonize"], "images": [{"meta": {"prompt": "x"}}]}))
    (tmp_path / "style.v2.json").write_text("\ufeff" + json.dumps({"activation text": "ohwx,\nsparkle",
                                                                  "preferred weight": 0.8}))
    (tmp_path / "style.json").write_text("not a sidecar of this adapter")
    found = read_sidecars(adapter)
    assert [s.path.name for s in found] == ["style.v2.civitai.info", "style.v2.json"]
    assert found[0].words == {"trainedWords": ["ohwx", " glowing", "neonize"]}
    assert found[1].words == {"activation text": ["ohwx", "sparkle"]}


def test_no_sidecar_and_sidecars_without_words(tmp_path):
    assert read_sidecars(tmp_path / "a.safetensors") == []
    (tmp_path / "a.json").write_text(json.dumps({"description": "x", "trainedWords": []}))
    assert read_sidecars(tmp_path / "a.safetensors")[0].words == {}


@pytest.mark.parametrize("content, message", [
    (b"{", "not valid JSON"),
    (b"[" * 200_000, "not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[1, 2]", "not a JSON object"),
    (json.dumps({"trainedWords": 5}).encode(), "'trainedWords' must be a string or a list of strings"),
    (json.dumps({"trainedWords": ["a", {"b": 1}]}).encode(), "must be a string or a list of strings"),
    (json.dumps({"trainedWords": ["a"] * 1001}).encode(), "more than 1000 entries"),
    (b" " * (MAX_SIDECAR_BYTES + 1), "larger than 4 MiB"),
])
def test_malformed_sidecars_are_one_line_errors_naming_the_file(tmp_path, content, message):
    path = tmp_path / "a.civitai.info"
    path.write_bytes(content)
    assert_one_line_error(lambda: read_sidecar(path), path, message)


def test_a_fifo_or_a_dangling_link_is_refused_not_waited_for(tmp_path):
    os.mkfifo(tmp_path / "a.json")
    (tmp_path / "b.json").symlink_to(tmp_path / "missing.json")
    for name in ("a", "b"):
        assert sidecar_paths(tmp_path / f"{name}.safetensors") == [tmp_path / f"{name}.json"]
        with pytest.raises(BadInput, match="not a regular file|cannot read"):
            read_sidecars(tmp_path / f"{name}.safetensors")


def test_a_folder_named_like_a_sidecar_is_refused_in_one_line(tmp_path):  # issue 26 M15: was IsADirectoryError
    (tmp_path / "m.json").mkdir()
    assert_one_line_error(lambda: read_sidecars(tmp_path / "m.safetensors"), tmp_path / "m.json",
                          "the sidecar is not a regular file")
