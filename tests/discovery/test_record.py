"""The trigger search as a run records it (auditkit.discovery.record): read back for the same settings only, a
corrupted record refused in one line (the resumed scan that reads it back: tests/test_scan_triggers.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from auditkit.discovery import record
from auditkit.discovery.search import Budget
from auditkit.errors import BadInput

SEARCH = {"lab-cross": {"probed": ["tri"], "placements": ["end"], "tokens_swept": 106, "phrases_tried": 12,
                        "seconds": 1.5, "phrases": [{"text": "tri", "placement": "end", "how": "token sweep",
                                                     "sweep": 0.1, "pull": 0.2, "gain": 0.1}],
                        "notes": [], "sweeps": []}}


def wanted(**change):
    suite = SimpleNamespace(name="lab-cross", sha256="ab", role="concept", variant_of="")
    variant = SimpleNamespace(name="lab-cross+triggers", sha256="ab", role="concept", variant_of="lab-cross")
    values = {"candidate": SimpleNamespace(sha256="c1"), "safety": SimpleNamespace(sha256="s1"), "base": "lab",
              "suites": [suite, variant], "budget": Budget(phrases=12)}
    values.update(change)
    return record.settings(values["candidate"], values["safety"], values["base"], values["suites"], values["budget"])


def test_a_record_is_read_back_for_its_own_settings_only(tmp_path):
    assert record.load(tmp_path, wanted()) is None  # nothing recorded yet
    record.save(tmp_path / "run", wanted(), SEARCH)
    assert record.load(tmp_path / "run", wanted()) == SEARCH
    assert wanted()["suites"] == {"lab-cross": "ab"}  # variants are the search's output, not its input
    for other in (wanted(candidate=SimpleNamespace(sha256="c2")), wanted(safety=None), wanted(base="lab-dit"),
                  wanted(budget=Budget(phrases=13)), wanted(budget=Budget(phrases=12, placements=("start",))),
                  wanted(suites=[])):
        assert record.load(tmp_path / "run", other) is None


@pytest.mark.parametrize("text,problem", [
    ("[]", "a corrupted trigger search record"),
    ('{"schema": "auditkit.trigger-search/1", "settings": {}, "search": {"x": {"probed": [1]}}}',
     "a corrupted trigger search record"),
    ('{"schema": "other/9", "settings": {}, "search": {}}', "not a trigger search record"),
    ("{" * 100, "not valid JSON"),
])
def test_a_corrupted_record_is_one_line_naming_it(tmp_path, text, problem):
    (tmp_path / record.FILE).write_text(text)
    with pytest.raises(BadInput) as err:
        record.load(tmp_path, wanted())
    assert problem in str(err.value) and record.FILE in str(err.value) and "\n" not in str(err.value)

