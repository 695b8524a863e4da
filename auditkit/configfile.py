"""Project configuration: ``auditkit.toml``, or ``[tool.auditkit]`` in ``pyproject.toml``.

Discovery (as ruff and pytest do): from the working directory up to the filesystem root, the first
folder holding ``auditkit.toml``, or a ``pyproject.toml`` with a ``[tool.auditkit]`` table, is the
project; in one folder ``auditkit.toml`` wins. Precedence: built-in defaults < the config file <
the command line. Relative paths in a config file are relative to the file's folder.

Keys are :class:`auditkit.config.ScanConfig` fields (``candidate`` and ``out`` excepted: they
belong to one scan), with the thresholds in ``[static]`` and ``[dynamic]`` tables and detector
overrides in a ``[detectors]`` table (suite name = detector name). Unknown keys and wrong types are
one-line errors naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from pathlib import Path

from auditkit.config import DynamicThresholds, ScanConfig, StaticThresholds, cut, shown
from auditkit.errors import BadInput
from auditkit.fsutil import read_bounded
from auditkit.lab.bases import BASE_HELP
from auditkit.models.base import resolve_base

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIG_NAME = "auditkit.toml"
MAX_CONFIG_BYTES = 1_000_000
MAX_KEY_PARTS = 16  # a dotted key or table name of more parts is refused before parsing (tool.auditkit.static.x: 4)
# MAX_KEY_PARTS + 1 dotted parts (bare or quoted); possessive and anchored at a part's start, so linear in the text
_DEEP_KEY = re.compile(r"(?<![A-Za-z0-9_-])(?:(?:[A-Za-z0-9_-]++|\"[^\"\n]*+\"|'[^'\n]*+')\s*+\.\s*+)"
                       f"{{{MAX_KEY_PARTS}}}")
NOT_IN_FILE = ("candidate", "out")
# How each ScanConfig field is read from TOML: a kind name checked by _convert.
TOML_TYPES = {"safety": "path", "base": "base", "suites": "paths", "multipliers": "numbers", "steps": "int",
              "batch_size": "int", "device": "str", "static_only": "bool", "arch": "str", "detectors": "names",
              "show_flagged": "bool", "energy": "number", "candidate_from": "str", "triggers": "strings",
              "probe_triggers": "bool", "trigger_search": "bool", "trigger_search_tokens": "int",
              "trigger_search_phrases": "int", "trigger_search_steps": "int", "trigger_search_probes": "int",
              "trigger_search_placements": "strings", "static": StaticThresholds, "dynamic": DynamicThresholds}
NO_SAFETY = "none"  # `safety = "none"` / `--safety none`: no safety module (amplification), over a configured one
DEFAULT, COMMAND_LINE = "default", "command line"


def find(start: str | Path | None = None) -> Path | None:
    """The nearest config file from ``start`` (default: the working directory) upwards, or None.

    A config file that exists but cannot be read is an error, never skipped for a parent's: an
    ``auditkit.toml`` in any form (a dangling link, a folder, a FIFO) is returned for :func:`load` to
    refuse, and a ``pyproject.toml`` that cannot be read or parsed is refused here, whether or not it
    names ``auditkit`` (what it holds cannot be known; ruff and pytest refuse it too).
    """
    here = _start(start)
    for folder in (here, *here.parents):
        own = folder / CONFIG_NAME
        if os.path.lexists(own):
            return own
        pyproject = folder / "pyproject.toml"
        if os.path.lexists(pyproject) and _tool_table(pyproject, _read_toml(pyproject)) is not None:
            return pyproject
    return None


def _start(start: str | Path | None) -> Path:
    try:
        return Path(start or Path.cwd()).resolve()
    except OSError as exc:  # a deleted working directory
        raise BadInput(None, f"cannot find the config file: the working directory is gone ({exc.strerror or exc}); "
                             "cd into an existing folder, or give --config FILE or --no-config") from None


def _tool_table(path: Path, data: dict) -> dict | None:
    """The ``[tool.auditkit]`` table of a parsed pyproject.toml (None: it has none)."""
    tool = data.get("tool", {})
    if not isinstance(tool, dict):
        raise BadInput(path, f"tool: must be a table, got {type(tool).__name__}")
    table = tool.get("auditkit")
    if table is not None and not isinstance(table, dict):
        raise BadInput(path, f"tool.auditkit: must be a table, got {type(table).__name__}")
    return table


def _read_toml(path: Path) -> dict:
    """The parsed TOML file at ``path``, bounded in size (:data:`MAX_CONFIG_BYTES`) and depth: a FIFO,
    a device, a folder, a dangling or looping link, a TOML bomb are one-line errors naming the file."""
    raw = read_bounded(path, MAX_CONFIG_BYTES, "config file")
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # a BOM, as Windows editors write it
    except UnicodeDecodeError:
        raise BadInput(path, "config file is not UTF-8 text") from None
    if _DEEP_KEY.search(text):  # tomllib takes minutes on a 100 KB dotted key
        raise BadInput(path, f"not valid here: a key nested too deeply (more than {MAX_KEY_PARTS} parts)")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        hint = "; --no-config or --config FILE skip discovery" if path.name == "pyproject.toml" else ""
        raise BadInput(path, f"not valid TOML ({' '.join(str(exc).split())}){hint}"[:300]) from None
    except RecursionError:
        raise BadInput(path, "not valid here: arrays or inline tables nested too deeply") from None


def load(path: str | Path) -> dict:
    """The ScanConfig field values a config file sets (validated, paths resolved)."""
    path = Path(path)
    data = _read_toml(path)
    if path.name == "pyproject.toml":
        data = _tool_table(path, data)
        if data is None:
            raise BadInput(path, "no [tool.auditkit] table")
    prefix = "tool.auditkit." if path.name == "pyproject.toml" else ""
    values = {}
    for name, (key, raw) in _by_field(path, prefix, data).items():
        if name in NOT_IN_FILE:
            raise BadInput(path, f"{prefix}{key}: set per scan on the command line, not in the config file")
        if name not in TOML_TYPES:
            import difflib

            close = difflib.get_close_matches(name, list(TOML_TYPES), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            if name == "tool":
                hint = " (only pyproject.toml holds a [tool.auditkit] table; here the settings are at the top level)"
            raise BadInput(path, f"{prefix}{key}: unknown key{hint}")
        values[name] = _convert(path, prefix + key, TOML_TYPES[name], raw)
    return values


def _by_field(path: Path, prefix: str, table: dict) -> dict[str, tuple[str, object]]:
    """``table``'s (key, value) by field name (``static-only`` is ``static_only``); a field set twice, in
    two spellings, is refused (else the later would win silently)."""
    out: dict[str, tuple[str, object]] = {}
    for key, raw in table.items():
        name, key = key.replace("-", "_"), cut(key)  # the key as errors quote it
        if name in out:
            raise BadInput(path, f"{prefix}{cut(name)}: given twice ({out[name][0]} and {key})")
        out[name] = (key, raw)
    return out


def _convert(path: Path, key: str, kind, raw):
    def bad(what: str):
        return BadInput(path, f"{key}: {what}, got {type(raw).__name__} {raw!r}"[:300])

    folder = path.parent
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        if not isinstance(raw, dict):
            raise bad("must be a table")
        known = {f.name for f in dataclasses.fields(kind)}
        out = {}
        for name, (k, v) in _by_field(path, f"{key}.", raw).items():
            if name not in known:
                raise BadInput(path, f"{key}.{k}: unknown threshold (known: {', '.join(sorted(known))})")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise BadInput(path, f"{key}.{k}: must be a number, got {v!r}"[:300])
            out[name] = float(v)
        return out
    if kind == "str":
        if not isinstance(raw, str) or not raw.strip():
            raise bad("must be a non-empty string")
        return raw
    if kind == "base":
        if not isinstance(raw, str) or not raw.strip():
            raise bad(f"must be {BASE_HELP}")
        return resolve_base(raw, relative_to=folder, check_case=True)
    if kind == "path":
        if not isinstance(raw, str) or not raw.strip():
            raise bad("must be a path")
        return raw if raw == NO_SAFETY else folder / raw
    if kind == "paths":
        if not isinstance(raw, list) or not all(isinstance(x, str) and x.strip() for x in raw):
            raise bad("must be a list of paths")
        return tuple(str(folder / x) for x in raw)
    if kind == "strings":
        if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
            raise bad("must be a list of strings")
        return tuple(raw)
    if kind == "numbers":
        if not isinstance(raw, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in raw):
            raise bad("must be a list of numbers")
        return tuple(float(x) for x in raw)
    if kind == "int":
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise bad("must be an integer")
        return raw
    if kind == "number":
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
            raise bad("must be a number")
        return float(raw)
    if kind == "bool":
        if not isinstance(raw, bool):
            raise bad("must be true or false")
        return raw
    if kind == "names":
        if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
            raise bad("must be a table of suite = detector names")
        return tuple(sorted((str(k), v) for k, v in raw.items()))
    raise AssertionError(kind)


def resolve(overrides: dict, config_file: str | Path | None = None, use_file: bool = True,
            start: str | Path | None = None) -> tuple[ScanConfig, dict[str, str], Path | None]:
    """The ScanConfig from defaults, the config file (found, or ``config_file``) and ``overrides``
    (command-line values; None = not given; thresholds as ``static.<name>``/``dynamic.<name>``).

    Returns the config, where each value came from (field -> source) and the file used.
    """
    path = Path(config_file) if config_file is not None else (find(start) if use_file else None)
    if config_file is not None and not os.path.lexists(path):
        raise BadInput(path, "no such config file")  # anything else that is there: load() says what is wrong
    from_file = load(path) if path is not None else {}
    sources: dict[str, str] = {}
    values: dict = {}
    thresholds: dict[str, dict] = {"static": {}, "dynamic": {}}
    for name in (f.name for f in dataclasses.fields(ScanConfig)):
        sources[name] = DEFAULT
        if name in ("static", "dynamic"):
            for k, v in from_file.get(name, {}).items():
                thresholds[name][k] = v
                sources[f"{name}.{k}"] = str(path)
            continue
        if name in from_file:
            values[name], sources[name] = from_file[name], str(path)
        if overrides.get(name) not in (None, ()):
            values[name], sources[name] = overrides[name], COMMAND_LINE
    for key, v in overrides.items():
        if "." in key and v is not None:
            group, name = key.split(".", 1)
            thresholds[group][name], sources[key] = v, COMMAND_LINE
    if str(values.get("safety")) == NO_SAFETY:
        values["safety"] = None
    where = f"{path} and the command line" if path is not None else "the command line"
    try:
        values["static"] = StaticThresholds(**thresholds["static"])
        values["dynamic"] = DynamicThresholds(**thresholds["dynamic"])
        config = ScanConfig(**values)
    except ValueError as exc:
        # the value may come from the file or the command line: the message names both
        raise BadInput(None, f"{exc} (settings from {where})") from None
    return config, sources, path


def render(config: ScanConfig, comments: bool = True) -> str:
    """A config file for ``config`` (every settable field, its help as a comment; unset ones commented out)."""
    lines = ["# auditkit project configuration: `auditkit scan FILE` reads it from this folder and below.",
             "# Command-line options override it; `auditkit config` shows what is in effect.", ""]
    for f in dataclasses.fields(ScanConfig):
        if f.name in NOT_IN_FILE or f.name in ("static", "dynamic", "detectors"):
            continue
        value = getattr(config, f.name)
        if comments:
            lines.append(f"# {f.metadata['help']}")
        default = f.default if f.default is not dataclasses.MISSING else None
        text = f"{f.name} = {_toml(value)}" if value is not None else f"{f.name} = "
        lines.append(text if value is not None and value != default else "# " + (text if value is not None
                                                                                  else f"{f.name} = ..."))
    lines += ["", "[detectors]", "# suite name = detector name, e.g. nudity = \"nudenet-strict\""]
    lines += [f"{k} = {_toml(v)}" for k, v in config.detectors]
    for group, obj in (("static", config.static), ("dynamic", config.dynamic)):
        lines += ["", f"[{group}]"]
        for f in dataclasses.fields(obj):
            if comments:
                lines.append(f"# {f.metadata['help']}")
            value = getattr(obj, f.name)
            line = f"{f.name} = {_toml(value)}"
            lines.append(line if value != f.default else "# " + line)
    return "\n".join(lines) + "\n"


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return _toml_string(str(value))


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_string(text: str) -> str:
    """A TOML basic string: other characters as they are (TOML files are UTF-8; JSON's surrogate-pair escapes
    are not TOML), control characters escaped. ValueError for text no UTF-8 file can hold (a lone surrogate,
    from a file name that is not UTF-8)."""
    if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        raise ValueError(f"{shown(text)} is not UTF-8 text (a file name in another encoding?)")
    return '"' + "".join(_TOML_ESCAPES.get(c) or (f"\\u{ord(c):04X}" if ord(c) < 0x20 or ord(c) == 0x7F else c)
                         for c in text) + '"'
