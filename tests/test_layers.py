"""The package's rooms stand in layers (issue 27): no two of auditkit's top-level modules or subpackages import
each other, lazily or not, so none imports up a layer. Read from the source (every ``import`` of auditkit, at
module level or inside a function), nothing imported."""

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "auditkit"

# Pairs still to part, each with why. lora reads the architecture tables (models/architectures.py) that the
# family modules declare, and models applies, writes and reads adapters (lora): parting them needs the
# torch-free family knowledge (architectures, families, family/, tables) as a package of its own below lora.
KNOWN = {frozenset({"lora", "models"})}


def room(module: str) -> str | None:
    """auditkit.<room>[.…] -> room (a top-level module or subpackage); None for the package itself."""
    parts = module.split(".")
    return parts[1] if parts[0] == "auditkit" and len(parts) > 1 else None


def imports() -> dict[str, set[str]]:
    """room -> the other rooms its files import."""
    out = defaultdict(set)
    for path in sorted(PACKAGE.rglob("*.py")):
        here = room(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            for name in names:
                there = room(name)
                if here and there and there != here:
                    out[here].add(there)
    return out


def test_the_reader_sees_imports_inside_functions():
    assert "suites" in imports()["train"]  # align.py imports it inside a function


def test_no_two_rooms_import_each_other():
    graph = imports()
    mutual = {frozenset({a, b}) for a, used in graph.items() for b in used if a in graph.get(b, set())}
    new = sorted(sorted(pair) for pair in mutual - KNOWN)
    assert not new, f"rooms importing each other (one of them imports up a layer): {new}"
    assert KNOWN <= mutual, f"a known pair has parted: drop it from KNOWN ({sorted(map(sorted, KNOWN - mutual))})"
