"""One home per constant and per callback type (issue 27): each is assigned at module level in one auditkit module,
the others import it, so two copies cannot drift apart (as PICKLE_SUFFIXES and MAX_SEED once did)."""

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "auditkit"


def assignments() -> dict[str, list[tuple[str, str]]]:
    """Module-level name -> [(module path, its value's source)] over the package."""
    out = defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for node in ast.parse(text).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                if isinstance(node, ast.AnnAssign) and node.value is not None else []
            for target in targets:
                if isinstance(target, ast.Name):
                    where = path.relative_to(PACKAGE.parent).as_posix()
                    out[target.id].append((where, ast.get_source_segment(text, node.value)))
    return out


@pytest.mark.parametrize("name", ["PICKLE_SUFFIXES", "MAX_HEADER_BYTES", "MAX_STEPS", "MAX_PROMPT_SEED",
                                  "MAX_TRAIN_SEED", "SAMPLING_STEPS", "SAMPLING_GUIDANCE",
                                  "StepProgress", "StageProgress", "BatchProgress"])
def test_a_shared_constant_has_one_home(name):
    homes = [where for where, _ in assignments()[name]]
    assert len(homes) == 1, f"{name} is assigned in {homes}: keep one, import it elsewhere"


def test_no_two_callback_types_have_the_same_signature():
    by_signature = defaultdict(list)
    for name, places in assignments().items():
        for where, value in places:
            if value and value.startswith("Callable["):
                by_signature[value].append(f"{where}:{name}")
    twins = {sig: names for sig, names in by_signature.items() if len(names) > 1}
    assert not twins, f"one callback type under several names: {twins}"
