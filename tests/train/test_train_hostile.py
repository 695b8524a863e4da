"""Hostile data folders and training settings: every problem is a one-line BadInput before any training.

Folders are made by code (a few tiny files); only the two training-guard tests build the tiny pipeline.
"""

from __future__ import annotations

import math
import os
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest

from auditkit.errors import BadInput
from auditkit.lora.adapter import LoraModule


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def _png(path: Path, pixels: np.ndarray | None = None) -> Path:
    from PIL import Image

    Image.fromarray(np.full((8, 8, 3), 120, np.uint8) if pixels is None else pixels).save(path)
    return path


def _pair(folder: Path, stem: str = "a", caption: str = "a neon bar") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _png(folder / f"{stem}.png")
    (folder / f"{stem}.txt").write_text(caption, encoding="utf-8")
    return folder


# 1. symlinks out of the data folder, overlong captions


def test_caption_symlink_outside_the_folder_is_refused(tmp_path):
    from auditkit.train.data import check_folder

    secret = tmp_path / "secret.txt"
    secret.write_text("api_key=hunter2")
    data = tmp_path / "data"
    data.mkdir()
    _png(data / "a.png")
    (data / "a.txt").symlink_to(secret)
    with pytest.raises(BadInput) as exc:
        check_folder(data)
    msg = one_line(exc)
    assert str(data / "a.txt") in msg and "outside the data folder" in msg and "hunter2" not in msg


def test_image_symlink_outside_the_folder_is_refused(tmp_path):
    from auditkit.train.data import check_folder

    outside = _png(tmp_path / "elsewhere.png")
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").symlink_to(outside)
    (data / "a.txt").write_text("a neon bar")
    with pytest.raises(BadInput) as exc:
        check_folder(data)
    assert str(data / "a.png") in one_line(exc) and "outside the data folder" in one_line(exc)


def test_symlinks_inside_the_folder_are_accepted(tmp_path):
    from auditkit.train.data import check_folder

    data = _pair(tmp_path / "data")
    (data / "b.png").symlink_to(data / "a.png")
    (data / "b.txt").symlink_to("a.txt")  # relative link, inside the folder
    assert [c for _, c in check_folder(data)] == ["a neon bar", "a neon bar"]


def test_overlong_caption_is_refused(tmp_path):
    from auditkit.train.data import MAX_CAPTION_CHARS, check_folder

    data = _pair(tmp_path / "ok", caption="w" * MAX_CAPTION_CHARS)
    assert check_folder(data)[0][1] == "w" * MAX_CAPTION_CHARS
    data = _pair(tmp_path / "long", caption="w" * (MAX_CAPTION_CHARS + 1))
    with pytest.raises(BadInput) as exc:
        check_folder(data)
    assert str(data / "a.txt") in one_line(exc) and f"{MAX_CAPTION_CHARS:,}" in one_line(exc)
    (data / "a.txt").write_bytes(b"x" * 50_000_000)  # a huge file is not read whole
    with pytest.raises(BadInput, match="longer than"):
        check_folder(data)


# 2. decompression bombs are refused from the header


def _grey_png(path: Path, width: int, height: int) -> Path:
    """A valid all-black 8-bit greyscale PNG of any size, written without holding its pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    comp = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_huge_image_is_refused_from_its_header_without_a_pillow_warning(tmp_path):
    from PIL import Image

    from auditkit.images import MAX_PIXELS
    from auditkit.train.data import check_folder

    data = tmp_path / "data"
    data.mkdir()
    _grey_png(data / "bomb.png", 9500, 9500)  # 90 Mpx: over MAX_PIXELS, under Pillow's own error threshold
    assert 9500 * 9500 > MAX_PIXELS and (data / "bomb.png").stat().st_size < 200_000
    (data / "bomb.txt").write_text("a neon bar")
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        start = time.perf_counter()
        with pytest.raises(BadInput) as exc:
            check_folder(data)
        elapsed = time.perf_counter() - start
    assert str(data / "bomb.png") in one_line(exc) and "9500×9500" in one_line(exc) and "64 Mpx limit" in one_line(exc)
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    assert elapsed < 0.5, "the image was decoded"
    assert Image.MAX_IMAGE_PIXELS == limit, "Pillow's process-wide limit was changed"


def test_huge_image_over_pillows_own_limit_is_a_one_line_size_error(tmp_path):
    from auditkit.train.data import check_folder

    data = tmp_path / "data"
    data.mkdir()
    _grey_png(data / "bomb.png", 20000, 10000)  # 200 Mpx: Pillow itself refuses it at open
    (data / "bomb.txt").write_text("a neon bar")
    with pytest.raises(BadInput) as exc:
        check_folder(data)
    assert str(data / "bomb.png") in one_line(exc) and "64 Mpx limit" in one_line(exc)


def test_no_pillow_warning_reaches_the_terminal(tmp_path):
    """The CLI path: a 90-Mpx image gives exactly one line on stderr."""
    data = tmp_path / "data"
    data.mkdir()
    _grey_png(data / "bomb.png", 9500, 9500)
    (data / "bomb.txt").write_text("a neon bar")
    code = ("import sys; from auditkit.train.data import check_folder; from auditkit.errors import BadInput\n"
            "try:\n check_folder(sys.argv[1])\nexcept BadInput as e:\n print(e, file=sys.stderr)")
    res = subprocess.run([sys.executable, "-W", "default", "-c", code, str(data)], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).parents[1])
    assert len(res.stderr.strip().splitlines()) == 1 and "DecompressionBomb" not in res.stderr, res.stderr


# 3. 16-bit images and dangling symlinks


def test_16_bit_png_keeps_its_grey_levels(tmp_path):
    from PIL import Image

    from auditkit.train.data import load_folder

    data = tmp_path / "data"
    data.mkdir()
    levels = np.array([[0, 32768, 65535, 257]], np.uint16).repeat(4, axis=0)
    Image.fromarray(levels).save(data / "a.png")
    assert Image.open(data / "a.png").mode in ("I;16", "I")
    (data / "a.txt").write_text("a grey bar")
    img = load_folder(data, 4).images[0]
    assert img.shape == (4, 4, 3)
    np.testing.assert_array_equal(img[0, :, 0], [0, 128, 255, 1])
    assert (img == img[..., :1]).all()  # grey stays grey


def test_32_bit_integer_images_are_scaled_like_16_bit():
    """Older Pillows open 16-bit PNGs as mode I (32-bit): the same 65535 -> 255 scale applies."""
    from PIL import Image

    from auditkit.images import _to_rgb

    im = Image.fromarray(np.array([[0, 32768, 65535, 70000, -5]], np.int32))
    assert im.mode == "I"
    np.testing.assert_array_equal(np.asarray(_to_rgb(im))[0, :, 1], [0, 128, 255, 255, 0])


def test_dangling_symlink_image_is_an_error_not_skipped(tmp_path):
    from auditkit.train.data import check_folder

    data = _pair(tmp_path / "data")
    (data / "b.png").symlink_to(tmp_path / "gone.png")
    (data / "b.txt").write_text("a neon dash")
    with pytest.raises(BadInput) as exc:
        check_folder(data)
    assert str(data / "b.png") in one_line(exc) and "dangling" in one_line(exc)


def test_dangling_symlink_caption_is_named(tmp_path):
    from auditkit.train.data import check_folder

    data = tmp_path / "data"
    data.mkdir()
    _png(data / "a.png")
    (data / "a.txt").symlink_to(data / "gone.txt")
    with pytest.raises(BadInput) as exc:
        check_folder(data)
    assert str(data / "a.txt") in one_line(exc) and "dangling" in one_line(exc)


# 4. training settings and the adapter writer


BAD_SETTINGS = [
    ("steps", -1), ("steps", 0), ("rank", 0), ("lr", math.nan), ("lr", 0.0), ("lr", -1e-3), ("lr", math.inf),
    ("alpha", 0.0), ("alpha", math.nan), ("alpha", -1.0), ("batch", 0), ("seed", -1),
]


@pytest.mark.parametrize(("field", "value"), BAD_SETTINGS + [("eta", math.nan), ("eta", math.inf), ("method", "("),
                                                             ("ddim_steps", 0), ("guidance", math.nan)])
def test_bad_esd_settings_are_refused_on_construction(field, value):
    from auditkit.train.esd import ESDConfig

    with pytest.raises(BadInput) as exc:
        ESDConfig(**{field: value})
    assert field in one_line(exc)


@pytest.mark.parametrize(("field", "value"), BAD_SETTINGS + [("targets", "("), ("mode", "sideways"),
                                                             ("extract_rank", 0), ("anchor_weight", math.nan)])
def test_bad_finetune_settings_are_refused_on_construction(field, value):
    from auditkit.train.finetune import FinetuneConfig

    with pytest.raises(BadInput) as exc:
        FinetuneConfig(**{field: value})
    assert field in one_line(exc)


def test_good_settings_pass():
    from auditkit.train.esd import ESDConfig
    from auditkit.train.finetune import FinetuneConfig

    ESDConfig(method="esd-u", alpha=2.0, eta=-0.5).validate()
    FinetuneConfig(targets=r".*\.attn2\.to_k", alpha=None, steps=1, batch=1).validate()


def test_targets_that_select_nothing_are_bad_input():
    torch = pytest.importorskip("torch")
    from auditkit.train.lora import target_modules

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert target_modules(model, "0") == ["0"]
    with pytest.raises(BadInput) as exc:
        target_modules(model, r".*attn9.*")
    assert "attn9" in one_line(exc) and "selects no" in one_line(exc)


def _modules(up_value: float = 0.1, scale: float = 1.0) -> dict[str, LoraModule]:
    from auditkit.models import architectures

    arch = architectures.get("lab")
    name = next(n for n in arch.modules if n.startswith("unet.") and ".attn2.to_k" in n)
    s = arch.modules[name]
    down = np.full((2, s.flat_in), 0.1, np.float32)
    return {name: LoraModule(name, down, np.full((s.out_features, 2), up_value, np.float32), scale)}


@pytest.mark.parametrize(("label", "mods", "expected"), [
    ("nan", lambda: _modules(math.nan), "non-finite"),
    ("inf scale", lambda: _modules(scale=math.inf), "non-finite"),
    ("zero up", lambda: _modules(0.0), "zero"),
    ("zero scale", lambda: _modules(scale=0.0), "zero"),
])
def test_writer_refuses_untrained_or_non_finite_adapters(tmp_path, label, mods, expected):
    from auditkit.lora.write import check_trained, save_adapter
    from auditkit.models import architectures

    out = tmp_path / "x.safetensors"
    with pytest.raises(BadInput) as exc:
        save_adapter(mods(), out, architectures.get("lab"), require_trained=True)
    assert expected in one_line(exc) and str(out) in one_line(exc)
    assert not list(tmp_path.iterdir()), "nothing may be written"
    with pytest.raises(BadInput):
        check_trained(mods())
    check_trained(_modules())  # a real update passes


@pytest.fixture(scope="module")
def pipe():
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from auditkit.lab.model import assemble_pipeline, build_components

    c = build_components(seed=0)
    return assemble_pipeline(c["unet"], c["vae"], c["text_encoder"], c["tokenizer"])


def test_training_that_changes_nothing_or_diverges_returns_no_adapter(pipe):
    from auditkit.train.esd import ESDConfig, train_esd
    from auditkit.train.finetune import FinetuneConfig, finetune
    from auditkit.train.lora import lora_from_delta, target_modules

    # a learning rate below float32's smallest step: valid settings, yet B never leaves its zero init
    with pytest.raises(BadInput, match="zero"):
        train_esd(pipe, ["a red cross"], ESDConfig(rank=2, steps=2, batch=2, ddim_steps=2, lr=1e-50))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    names = target_modules(pipe.unet, "cross-kv")
    safety = {f"unet.{n}": lora_from_delta(f"unet.{n}", rng.normal(0, 0.05, tuple(
        pipe.unet.get_submodule(n).weight.shape)), 2) for n in names}
    for mode in ("modular", "full"):  # full: the NaN update must not reach the SVD
        with pytest.raises(BadInput, match="diverged"):
            finetune(pipe, images, ["a bar", "a tee"], FinetuneConfig(mode=mode, targets="cross-kv", steps=3, batch=2,
                                                                       lr=1e30), safety=safety)


def test_targets_are_checked_before_training(pipe):
    from auditkit.train.finetune import FinetuneConfig, finetune

    seen = []
    images = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(BadInput, match="selects no"):
        finetune(pipe, images, ["a", "b"], FinetuneConfig(mode="modular", targets=r"nothing\.here", steps=1, batch=1),
                 progress=lambda *a: seen.append(a))
    assert not seen


# 5. lab make-data counts


@pytest.mark.parametrize("count", [-1, 0])
def test_make_data_refuses_non_positive_counts(tmp_path, count):
    from auditkit.lab import world
    from auditkit.train.data import write_folder

    out = tmp_path / "data"
    with pytest.raises(BadInput) as exc:
        specs = world.sample_specs(0, count, domain="neon")
        write_folder(out, world.render_many(specs), [world.caption(s) for s in specs])
    assert "at least 1" in one_line(exc) or "negative" in one_line(exc)
    assert not out.exists()


# 6. output checks before training


def test_check_writable_accepts_new_and_existing_outputs(tmp_path):
    from auditkit.fsutil import check_writable

    check_writable(tmp_path / "x.safetensors")
    check_writable(tmp_path / "new" / "deeper" / "x.safetensors")
    assert not (tmp_path / "new").exists(), "the check creates nothing"
    (tmp_path / "y.safetensors").write_bytes(b"old")
    check_writable(tmp_path / "y.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["y.safetensors"], "the probe file was left behind"


def test_check_writable_refuses_a_directory(tmp_path):
    from auditkit.fsutil import check_writable

    (tmp_path / "x.safetensors").mkdir()
    with pytest.raises(BadInput) as exc:
        check_writable(tmp_path / "x.safetensors")
    assert "folder" in one_line(exc)


def test_check_writable_refuses_a_file_as_parent(tmp_path):
    from auditkit.fsutil import check_writable

    (tmp_path / "file").write_text("x")
    with pytest.raises(BadInput) as exc:
        check_writable(tmp_path / "file" / "sub" / "x.safetensors")
    assert str(tmp_path / "file") in one_line(exc) and "not a folder" in one_line(exc)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_writable_refuses_a_read_only_folder(tmp_path):
    from auditkit.fsutil import check_writable

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(BadInput, match="not writable"):
            check_writable(ro / "x.safetensors")
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("place", ["/sys", "/proc"])
def test_check_writable_refuses_a_read_only_filesystem(place):
    import tempfile

    from auditkit.fsutil import check_writable

    try:
        fd, probe = tempfile.mkstemp(dir=place)
    except OSError:
        pass
    else:
        os.close(fd)
        os.unlink(probe)
        pytest.skip(f"{place} is writable here")
    with pytest.raises(BadInput, match="not writable"):
        check_writable(Path(place) / "auditkit-out" / "x.safetensors")


@pytest.mark.parametrize("command", [["align", "--concept", "a cross"], ["finetune", "--data", "data", "--mode",
                                                                         "modular"]])
def test_a_bad_device_is_a_usage_error_before_any_model_loads(tmp_path, command):
    out = tmp_path / "out.safetensors"
    res = subprocess.run([sys.executable, "-m", "auditkit", *command, "--device", "gpu0", "--out", str(out)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "'gpu0' is not a torch device" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not out.exists()
