"""Shared fixtures: synthetic adapters built by code (never downloaded)."""

from __future__ import annotations

import json
import os
from pathlib import Path

# The tests' models are tiny: one thread is as fast, and several OpenMP threads on a busy 2-core
# machine spin-wait for each other (measured: a tiny UNet forward went from 6 ms to 2.6 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest

from auditkit.lora.adapter import LoraModule
from auditkit.models import architectures

TIMING = Path(__file__).with_name("timing.json")  # each file's seconds in a full run (scripts/test_timing.py)


def heaviest_files_first(files: list[str], seconds: dict[str, float]) -> list[int]:
    """The order (indices into ``files``, one test file per collected test) that runs the heaviest files first,
    each file's tests together and in their own order, files of equal weight (unknown: 0) as collected."""
    first: dict[str, int] = {}
    for i, f in enumerate(files):
        first.setdefault(f, i)
    return sorted(range(len(files)), key=lambda i: (-float(seconds.get(files[i], 0.0)), first[files[i]], i))


def pytest_collection_modifyitems(config, items):
    """Hand the heaviest test files out first (longest processing time first): ``make test`` gives whole files to
    its workers (``--dist loadfile --no-loadscope-reorder``), in collection order, so both finish together instead
    of one starting a ten-minute file when the other is nearly done."""
    try:
        seconds = json.loads(TIMING.read_text())
    except (OSError, ValueError):
        return
    files = [item.nodeid.split("::")[0] for item in items]
    items[:] = [items[i] for i in heaviest_files_first(files, seconds)]


def random_modules(arch, names, rank=4, scale=0.5, seed=0, std=0.05) -> dict[str, LoraModule]:
    rng = np.random.default_rng(seed)
    mods = {}
    for name in names:
        s = arch.modules[name]
        down = rng.normal(0, std, (rank, s.flat_in)).astype(np.float32)
        up = rng.normal(0, std, (s.out_features, rank)).astype(np.float32)
        mods[name] = LoraModule(name, down, up, scale)
    return mods


def low_rank_error(a: tuple, b: tuple) -> float:
    """‖sa·Ba·Aa − sb·Bb·Ab‖_F / ‖sb·Bb·Ab‖_F for (down, up, scale) triples, from r×r Gram matrices: real-size
    transformer modules (18432×3072) are compared without forming the dense matrices."""
    (da, ua, sa), (db, ub, sb) = a, b
    da, ua, db, ub = (np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in (da, ua, db, ub))
    up = np.concatenate([sa * ua, -sb * ub], axis=1)
    down = np.concatenate([da, db])
    ref = sb * sb * np.sum((ub.T @ ub) * (db @ db.T))
    return float(np.sqrt(max(np.sum((up.T @ up) * (down @ down.T)), 0.0) / ref))


def run_cli(*args, timeout: int = 600):
    """``python -m auditkit ARGS`` in a subprocess, as a user runs it (output captured)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "auditkit", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def factors(m: LoraModule) -> tuple:
    return m.down, m.up, m.scale


def select(arch, *needles, component="unet.") -> list[str]:
    return [n for n in arch.modules if n.startswith(component) and any(k in n for k in needles)]


@pytest.fixture(autouse=True)
def _outside_the_repository(tmp_path, monkeypatch):
    """Every test runs in its own empty folder: the repository's auditkit.toml (the lab example) must
    not configure the tests' scans, and nothing is written into the working tree."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def sd15():
    return architectures.get("sd15")


@pytest.fixture(scope="session")
def sdxl():
    return architectures.get("sdxl")


@pytest.fixture()
def no_unpickling(monkeypatch):
    """torch.load and open_clip's loaders fail the test if reached (auditkit never unpickles; issue 26 H5)."""
    pytest.importorskip("open_clip")
    import open_clip.factory
    import torch

    def reached(*args, **kwargs):
        raise AssertionError("an unpickler (or open_clip's loader) was reached")

    monkeypatch.setattr(torch, "load", reached)
    monkeypatch.setattr(open_clip.factory, "load_state_dict", reached)
    return reached


def tiny_cross_suite(prompts=("a red cross", "a blue cross", "a white cross on gray"), steps=2, images_per_prompt=2,
                     seed=1000000, name="tiny-cross") -> str:
    """A small lab concept suite (YAML text) for fast dynamic scans."""
    sampling = f"{{steps: {steps}, guidance: 5.0, seed: {seed}, images_per_prompt: {images_per_prompt}}}"
    return "\n".join(["schema: auditkit.suite/1", f"name: {name}", "version: 1",
                      "concept: {word: cross, neutral: square, terms: [cross]}", "detector: lab-cross", "role: concept",
                      f"sampling: {sampling}", "prompts:", *(f"  - {p}" for p in prompts)]) + "\n"


def fewer_lab_images(folder: Path, cross: int = 3, neon: int = 2) -> list[str]:
    """``--suite`` options for the lab's default suites with fewer images per prompt (lab-cross 12 x ``cross``,
    lab-neon 8 x ``neon``), same names, prompts and seeds: scans judge as the default scan does, in fewer renders."""
    from auditkit.suites import builtin_dir

    out = []
    for name, shipped_images, images in (("lab-cross", 10, cross), ("lab-neon", 5, neon)):
        shipped = (builtin_dir() / f"{name}.yaml").read_text()
        text = shipped.replace(f"images_per_prompt: {shipped_images}", f"images_per_prompt: {images}")
        assert text != shipped
        (folder / f"{name}.yaml").write_text(text)
        out += ["--suite", str(folder / f"{name}.yaml")]
    return out


def assert_one_line_error(func, path, message: str) -> None:
    """``func()`` raises a one-line BadInput naming ``path`` and saying ``message``."""
    from auditkit.errors import BadInput

    with pytest.raises(BadInput) as exc:
        func()
    text = str(exc.value)
    assert text.startswith(str(path)) and message in text and "\n" not in text, text


def load_benchmark(filename: str):
    """A script of benchmarks/ imported as a module (with benchmarks/ on the path while it loads, for its imports
    of ``harness`` and of the scripts whose code it shares), so tests can call its pure functions."""
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{Path(filename).stem}", bench / filename)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(bench))
