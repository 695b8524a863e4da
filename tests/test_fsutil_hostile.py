"""The one bounded reader of untrusted JSON (fsutil.parse_json / read_json) and bounded file reads."""

import pytest
from conftest import assert_one_line_error

from auditkit.fsutil import json_depth, parse_json, read_bounded, read_json


def test_deep_nesting_is_refused_without_recursion(tmp_path):  # issue 26 M3
    deep = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert json_depth(deep) == 100_001
    assert_one_line_error(lambda: parse_json(deep, tmp_path / "h", "header", limit=1 << 20), tmp_path / "h",
                          "header is not valid JSON (nested deeper than 64 levels)")


def test_brackets_inside_strings_do_not_count_as_nesting():  # issue 26 M3
    text = '{"a": "' + "[{" * 500 + '\\"]", "b": [[1]]}'
    assert json_depth(text.encode()) == 3
    assert parse_json(text, "x", "file", limit=1 << 20)["b"] == [[1]]


@pytest.mark.parametrize("raw, message", [
    (b"x" * 10_001, "file is larger than 10000 bytes"),
    (b"\xff{}", "file is not valid JSON: not UTF-8 text"),
    (b"[" + b"9" * 5000 + b"]", "file is not valid JSON"),  # int() refuses 5000 digits: ValueError, not decode
    (b"{", "file is not valid JSON"),
])
def test_oversized_undecodable_or_malformed_json_is_one_line(tmp_path, raw, message):  # issue 26 M3
    assert_one_line_error(lambda: parse_json(raw, tmp_path / "f", "file", limit=10_000),
                          tmp_path / "f", message)


def test_duplicate_keys_are_refused_only_when_asked_and_named_by_level(tmp_path):  # issue 26 (real files)
    assert parse_json(b'{"a": 1, "a": 2}', "f", "header", limit=100) == {"a": 2}  # plain JSON keeps the last
    assert_one_line_error(lambda: parse_json(b'{"a": 1, "b": 0, "a": 2}', "f", "header", limit=100,
                                             unique="tensor name"), "f", "duplicate tensor name 'a' in the header")
    assert_one_line_error(lambda: parse_json(b'{"t": {"dtype": 1, "dtype": 2}}', "f", "header", limit=100,
                                             unique="tensor name"), "f", "duplicate key 'dtype' in the header")


def test_a_folder_is_not_a_regular_file(tmp_path):  # issue 26 M15
    (tmp_path / "m.json").mkdir()
    assert_one_line_error(lambda: read_bounded(tmp_path / "m.json", 100, "sidecar"), tmp_path / "m.json",
                          "the sidecar is not a regular file")
    assert_one_line_error(lambda: read_json(tmp_path / "m.json", "index", limit=100), tmp_path / "m.json",
                          "not a regular file")
