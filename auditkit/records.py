"""Field types of the JSON auditkit writes and reads back (the run log, report.json), checked on reading.

A run folder is input like any other: a tampered or corrupted ``run.jsonl`` or ``report.json`` must give
a one-line error naming the file and the field, never an internal error deep in the digest or the
report's template. A *shape* is a small function over a decoded JSON value that returns None when the
value fits and otherwise where it does not and what is there (``("", value)``: the value itself;
``(".flags.lab-cross", "yes")``: a field inside it). Shapes compose: :func:`fields` (an object with typed
fields), :func:`list_of`, :func:`map_of`, :func:`optional`.

    >>> check("run.jsonl", "line 2", {"flags": {"d": "yes"}}, fields({"flags": map_of(FLAG)}))
    Traceback (most recent call last):
    auditkit.errors.BadInput: run.jsonl: line 2: flags.d has the wrong type (str)
"""

from __future__ import annotations

import math
from collections.abc import Callable

from auditkit.errors import BadInput

Misfit = "tuple[str, object] | None"  # None: fits; else (where, the value found there)
Shape = Callable[[object], Misfit]
_MISSING = object()
MAX_INDEX = 2**63  # indices, counts and seeds: what a JSON reader elsewhere (and int64) can hold
_KEY_CHARS = 40  # a field name quoted in a message: untrusted, so cut


def kind(test: Callable[[object], bool]) -> Shape:
    """A value the predicate ``test`` accepts."""
    return lambda value: None if test(value) else ("", value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_INDEX


ANY: Shape = kind(lambda value: True)
TEXT: Shape = kind(lambda value: isinstance(value, str))
FLAG: Shape = kind(lambda value: isinstance(value, bool))
NUMBER: Shape = kind(_is_number)  # finite: report.json writes a non-finite float as null (see optional)
REAL: Shape = kind(lambda value: isinstance(value, (int, float)) and not isinstance(value, bool))  # NaN too
INDEX: Shape = kind(_is_index)  # a non-negative integer: an index, a count, a seed
INTEGER: Shape = kind(lambda value: isinstance(value, int) and not isinstance(value, bool)
                      and -MAX_INDEX < value < MAX_INDEX)
OBJECT: Shape = kind(lambda value: isinstance(value, dict))


def optional(shape: Shape) -> Shape:
    """``shape`` or null."""
    return lambda value: None if value is None else shape(value)


def list_of(shape: Shape) -> Shape:
    def check_list(value) -> Misfit:
        if not isinstance(value, list):
            return "", value
        for i, item in enumerate(value):
            misfit = shape(item)
            if misfit is not None:
                return f"[{i}]{misfit[0]}", misfit[1]
        return None

    return check_list


def map_of(shape: Shape) -> Shape:
    """An object with any (string) keys, each value of ``shape``."""
    def check_map(value) -> Misfit:
        if not isinstance(value, dict):
            return "", value
        for key, item in value.items():
            misfit = shape(item)
            if misfit is not None:
                return f".{key[:_KEY_CHARS]}{misfit[0]}", misfit[1]
        return None

    return check_map


def fields(spec: dict[str, Shape], required: tuple[str, ...] = ()) -> Shape:
    """An object whose fields named in ``spec`` are of their shape when present (``required`` ones must be);
    other fields are left alone (newer writers may add some)."""
    def check_fields(value) -> Misfit:
        if not isinstance(value, dict):
            return "", value
        for key in required:
            if key not in value:
                return f".{key}", _MISSING
        for key, shape in spec.items():
            if key in value:
                misfit = shape(value[key])
                if misfit is not None:
                    return f".{key}{misfit[0]}", misfit[1]
        return None

    return check_fields


def check(path, label: str, value, shape: Shape, hint: str = "") -> None:
    """Raise a one-line :class:`BadInput` naming ``path``, ``label`` and the field where ``value`` does not fit
    ``shape`` (``hint``: what to do about it)."""
    misfit = shape(value)
    if misfit is None:
        return
    where, found = misfit
    what = "is missing" if found is _MISSING else f"has the wrong type ({type(found).__name__})"
    raise BadInput(path, f"{label}: {where.lstrip('.') or 'the record'} {what}{hint}")
