"""Safe reading: malformed, truncated, hostile or pickled files are refused with a precise message."""

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from auditkit.errors import BadInput
from auditkit.lora.io import open_safetensors


def raw_file(path, header: bytes, data: bytes = b"", length: int | None = None):
    n = len(header) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + header + data)
    return path


def test_reads_f32_f16_bf16_and_metadata(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    save_file({"a": a, "h": a.astype(np.float16)}, str(tmp_path / "x.safetensors"), metadata={"k": "v"})
    st = open_safetensors(tmp_path / "x.safetensors")
    np.testing.assert_array_equal(st.array("a"), a)
    np.testing.assert_array_equal(st.array("h"), a.astype(np.float16))
    assert st.metadata == {"k": "v"} and len(st.sha256) == 64
    # bfloat16: the top 16 bits of float32
    bf = (a.view(np.uint32) >> 16).astype(np.uint16)
    header = json.dumps({"b": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}}).encode()
    st = open_safetensors(raw_file(tmp_path / "bf.safetensors", header, bf.tobytes()))
    np.testing.assert_allclose(st.array("b"), a, rtol=1e-2)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle", ".PICKLE", ".Pt"])
def test_pickle_suffixes_are_refused_without_opening(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04\x95 anything: must never be unpickled")
    with pytest.raises(BadInput, match="never unpickles"):
        open_safetensors(path)


@pytest.mark.parametrize("head", [b"PK\x03\x04rest-of-zip", b"\x80\x02}q\x00."])
def test_pickle_content_behind_a_safetensors_name_is_refused(tmp_path, head):
    path = tmp_path / "disguised.safetensors"
    path.write_bytes(head + b"\x00" * 16)
    with pytest.raises(BadInput, match="pickle"):
        open_safetensors(path)


def test_header_length_starting_with_0x80_is_not_mistaken_for_pickle(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    header += b" " * (0x80 - len(header))  # header length 128 = 0x80 in the first byte
    st = open_safetensors(raw_file(tmp_path / "h.safetensors", header, b"\x00\x00\x80\x3f"))
    assert st.array("a")[0] == 1.0


BAD = {
    "empty": (lambda p: p.write_bytes(b""), "empty"),
    "too short": (lambda p: p.write_bytes(b"\x01\x02"), "too short"),
    "absurd header length": (lambda p: raw_file(p, b"{}", length=2**62), "absurd"),
    "header beyond end": (lambda p: raw_file(p, b"{}", length=1000), "truncated"),
    "non-JSON header": (lambda p: raw_file(p, b"\xff\xfenot json"), "not valid JSON"),
    "JSON list header": (lambda p: raw_file(p, b"[1, 2]"), "not a JSON object"),
    "bad metadata": (lambda p: raw_file(p, json.dumps({"__metadata__": {"a": 1}}).encode()), "__metadata__"),
    "bad dtype": (lambda p: raw_file(p, json.dumps({"t": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}})
                                      .encode(), b"\x00"), "unsupported dtype"),
    "size mismatch": (lambda p: raw_file(p, json.dumps({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}})
                                          .encode(), b"\x00" * 8), "needs 8"),
    "truncated data": (lambda p: raw_file(p, json.dumps({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})
                                           .encode(), b"\x00" * 8), "truncated"),
    "overlap": (lambda p: raw_file(p, json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                                  "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})
                                    .encode(), b"\x00" * 12), "overlap"),
    "negative shape": (lambda p: raw_file(p, json.dumps({"t": {"dtype": "F32", "shape": [-1],
                                                               "data_offsets": [0, 4]}}).encode(), b"\x00" * 4),
                       "invalid shape"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_files_name_the_problem(tmp_path, case):
    make, expected = BAD[case]
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(BadInput, match=expected) as info:
        open_safetensors(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused(tmp_path, value):
    a = np.ones((2, 2), np.float32)
    a[1, 1] = value
    save_file({"w": a}, str(tmp_path / "n.safetensors"))
    with pytest.raises(BadInput, match="NaN or Inf"):
        open_safetensors(tmp_path / "n.safetensors").float_array("w")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(BadInput, match="no such file"):
        open_safetensors(tmp_path / "nope.safetensors")
    with pytest.raises(BadInput, match="directory"):
        open_safetensors(tmp_path)


def test_serialized_files_are_deterministic_and_readable_by_the_reference_library(tmp_path):
    from safetensors.numpy import load

    from auditkit.lora.io import serialize

    tensors = {"b": np.ones((2, 3), np.float16), "a": np.arange(4, dtype=np.float32), "s": np.array(2.0, np.float32)}
    meta = {"z": "1", "a": "<b>"}
    blob = serialize(tensors, meta)
    assert blob == serialize(dict(reversed(list(tensors.items()))), dict(reversed(list(meta.items()))))
    loaded = load(blob)
    for k, v in tensors.items():
        np.testing.assert_array_equal(loaded[k], v)
    (tmp_path / "s.safetensors").write_bytes(blob)
    st = open_safetensors(tmp_path / "s.safetensors")
    assert st.metadata == meta and st.array("s") == 2.0


def test_a_deeply_nested_header_is_refused_in_one_line(tmp_path):  # issue 26 M3
    from conftest import assert_one_line_error

    path = raw_file(tmp_path / "d.safetensors", b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert_one_line_error(lambda: open_safetensors(path), path, "nested deeper than 64 levels")


def test_a_duplicate_tensor_name_is_refused(tmp_path):  # issue 26: real files (Python's JSON keeps the last)
    from conftest import assert_one_line_error

    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    path = raw_file(tmp_path / "dup.safetensors", f'{{"a.lora_up.weight": {entry}, "a.lora_up.weight": {entry}}}'
                    .encode(), b"\x00" * 4)
    assert_one_line_error(lambda: open_safetensors(path), path, "duplicate tensor name 'a.lora_up.weight'")
    path = raw_file(tmp_path / "dupkey.safetensors", b'{"t": {"dtype": "F32", "dtype": "F16", "shape": [1], '
                                                     b'"data_offsets": [0, 4]}}', b"\x00" * 4)
    assert_one_line_error(lambda: open_safetensors(path), path, "duplicate key 'dtype'")


@pytest.mark.parametrize("shape, needs", [([2**62, 64], 2**70), ([2**40, 2**40], 2**82)])
def test_huge_shapes_are_sized_without_overflow(tmp_path, shape, needs):  # issue 26 M7
    from conftest import assert_one_line_error

    header = json.dumps({"t": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}).encode()
    path = raw_file(tmp_path / "big.safetensors", header)
    assert_one_line_error(lambda: open_safetensors(path), path, f"spans 0 bytes but shape {shape} needs {needs}")
