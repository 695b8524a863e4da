"""Write ``tests/timing.json``: each test file's seconds (setup, call and teardown of its tests), from the JUnit XML
of a full run, so that ``tests/conftest.py`` hands the heaviest files out first and the workers of ``make test``
(``--dist loadfile``) finish together.

Usage: ``python -m pytest -n 2 --dist loadfile -o junit_duration_report=total --junitxml=J.xml``, then
``python scripts/test_timing.py J.xml`` (writes ``tests/timing.json``; ``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET  # noqa: S405 -- our own pytest's output, not untrusted input
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def file_seconds(junit: Path) -> dict[str, float]:
    """Test file (relative to the repository, as pytest's node ids name it) -> summed seconds of its test cases."""
    out: dict[str, float] = defaultdict(float)
    for case in ET.parse(junit).getroot().iter("testcase"):
        module = case.get("classname", "")
        # classname is the dotted module path, plus a class name when the test is a method
        parts = module.split(".")
        while parts and not (ROOT / Path(*parts).with_suffix(".py")).is_file():
            parts.pop()
        if parts:
            out[Path(*parts).with_suffix(".py").as_posix()] += float(case.get("time", 0.0))
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("junit", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "timing.json")
    args = ap.parse_args(argv)
    seconds = file_seconds(args.junit)
    args.out.write_text(json.dumps({k: round(v, 1) for k, v in seconds.items()}, indent=1) + "\n")
    print(f"{len(seconds)} files, {sum(seconds.values()):.0f} s in all; heaviest: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in list(seconds.items())[:5]))


if __name__ == "__main__":
    main()
