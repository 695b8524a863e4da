"""Probe suites: versioned, declarative prompt sets (YAML), plus prompt CSVs such as I2P's.

A suite is data, never code: YAML is read with ``yaml.safe_load`` (tags such as ``!!python/object``
are refused), and every field is validated with a one-line error naming the file and the field.

Suite schema (``schema: auditkit.suite/1``)::

    name: lab-cross            # [a-z0-9-], unique
    version: 1                 # bump when prompts or settings change
    description: ...
    concept: {word: cross, neutral: square}   # what the safety module suppresses, and a neutral counterpart
    detector: lab-cross        # detector name (registry), with its pinned profile
    role: concept              # concept (re-emergence) | control (false positives, fidelity)
    sampling: {steps: 25, guidance: 5.0, seed: 1000000, images_per_prompt: 1}
    prompts:
      - text: a red cross
        category: explicit     # optional free label
        seed: 12               # optional: overrides the suite's seed for this prompt

Prompt CSVs need a ``prompt`` column; optional ``seed``/``sd_seed``, ``guidance``/``sd_guidance_scale``
and ``category``/``categories`` columns (I2P's names are accepted as they are).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from auditkit.errors import BadInput

SCHEMA = "auditkit.suite/1"
ROLES = ("concept", "control")
MAX_PROMPT_CHARS = 2000
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
_TOP_KEYS = {"schema", "name", "version", "description", "concept", "detector", "role", "sampling", "prompts"}
_SAMPLING_KEYS = {"steps": int, "guidance": float, "seed": int, "images_per_prompt": int}


@dataclass(frozen=True)
class Prompt:
    text: str
    seed: int
    guidance: float
    category: str = ""


@dataclass(frozen=True)
class Suite:
    name: str
    version: int
    description: str
    concept_word: str
    neutral_word: str
    detector: str
    role: str
    steps: int
    images_per_prompt: int
    prompts: tuple[Prompt, ...]
    path: str = ""
    categories: dict[str, int] = field(default_factory=dict)


def builtin_dir() -> Path:
    """The suites shipped with auditkit: the repository's ``probes/`` folder beside the package (source
    and editable installs), else the copy a wheel installs under ``<prefix>/share/auditkit/probes``."""
    beside = Path(str(resources.files("auditkit"))).parent / "probes"
    if beside.is_dir():
        return beside
    import sys
    import sysconfig

    for prefix in (sysconfig.get_path("data"), sys.prefix):
        shared = Path(prefix) / "share" / "auditkit" / "probes"
        if shared.is_dir():
            return shared
    return beside


def load_suite(path: str | Path) -> Suite:
    """Read and validate one suite file (``.yaml``/``.yml``) or prompt CSV (``.csv``)."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(path, "no such suite file")
    if path.suffix.lower() == ".csv":
        return load_csv(path)
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise BadInput(path, "a suite is a .yaml/.yml file or a prompt .csv")
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise BadInput(path, "suite is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise BadInput(path, f"not valid YAML{where} (only plain data is accepted, no tags)") from None
    return _validate(path, data)


def _validate(path: Path, data: object) -> Suite:
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise BadInput(path, what)

    need(isinstance(data, dict), "suite must be a mapping")
    unknown = set(data) - _TOP_KEYS
    need(not unknown, f"unknown field(s): {', '.join(sorted(map(str, unknown)))}")
    need(data.get("schema") == SCHEMA, f"schema must be {SCHEMA!r}")
    name = data.get("name")
    need(isinstance(name, str) and bool(_NAME.match(name)), "name must match [a-z0-9][a-z0-9-]*")
    version = data.get("version")
    need(isinstance(version, int) and not isinstance(version, bool) and version >= 1, "version must be an integer >= 1")
    concept = data.get("concept")
    need(isinstance(concept, dict) and isinstance(concept.get("word"), str) and isinstance(concept.get("neutral"), str),
         "concept must have string fields 'word' and 'neutral'")
    need(isinstance(data.get("detector"), str) and data["detector"] != "", "detector must be a detector name")
    role = data.get("role", "concept")
    need(role in ROLES, f"role must be one of {', '.join(ROLES)}")
    sampling = data.get("sampling") or {}
    need(isinstance(sampling, dict), "sampling must be a mapping")
    for key, value in sampling.items():
        need(key in _SAMPLING_KEYS, f"unknown sampling field {key!r}")
        kind = _SAMPLING_KEYS[key]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = number and (kind is float or isinstance(value, int))
        need(ok and value >= 0, f"sampling.{key} must be a non-negative {kind.__name__}")
    steps = int(sampling.get("steps", 25))
    guidance = float(sampling.get("guidance", 7.5))
    seed = int(sampling.get("seed", 0))
    per_prompt = int(sampling.get("images_per_prompt", 1))
    need(steps >= 1 and per_prompt >= 1, "sampling.steps and sampling.images_per_prompt must be >= 1")
    raw = data.get("prompts")
    need(isinstance(raw, list) and len(raw) > 0, "prompts must be a non-empty list")
    prompts = []
    for i, item in enumerate(raw):
        entry = {"text": item} if isinstance(item, str) else item
        need(isinstance(entry, dict), f"prompts[{i}] must be a string or a mapping")
        extra = set(entry) - {"text", "category", "seed", "guidance"}
        need(not extra, f"prompts[{i}] has unknown field(s): {', '.join(sorted(map(str, extra)))}")
        text = entry.get("text")
        need(isinstance(text, str) and text.strip() != "", f"prompts[{i}].text must be a non-empty string")
        need(len(text) <= MAX_PROMPT_CHARS, f"prompts[{i}].text is longer than {MAX_PROMPT_CHARS} characters")
        p_seed = entry.get("seed", seed + i)
        need(isinstance(p_seed, int) and not isinstance(p_seed, bool) and p_seed >= 0,
             f"prompts[{i}].seed must be a non-negative integer")
        p_guid = entry.get("guidance", guidance)
        need(isinstance(p_guid, (int, float)) and not isinstance(p_guid, bool),
             f"prompts[{i}].guidance must be a number")
        category = entry.get("category", "")
        need(isinstance(category, str), f"prompts[{i}].category must be a string")
        prompts.append(Prompt(" ".join(text.split()), p_seed, float(p_guid), category))
    return _suite(path, name, version, str(data.get("description", "")), concept["word"], concept["neutral"],
                  data["detector"], role, steps, per_prompt, prompts)


def _suite(path, name, version, description, word, neutral, detector, role, steps, per_prompt, prompts) -> Suite:
    categories: dict[str, int] = {}
    for p in prompts:
        categories[p.category] = categories.get(p.category, 0) + 1
    return Suite(name, version, description, word, neutral, detector, role, steps, per_prompt, tuple(prompts),
                 str(path), categories)


_CSV_COLUMNS = {"seed": ("seed", "sd_seed"), "guidance": ("guidance", "sd_guidance_scale"),
                "category": ("category", "categories")}


def load_csv(path: str | Path, detector: str = "nudenet-default", concept: str = "nudity",
             neutral: str = "clothing", steps: int = 25, guidance: float = 7.5, seed: int = 0) -> Suite:
    """A prompt CSV (e.g. a local copy of I2P) as a concept suite; seeds default to ``seed + row``."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "prompt" not in reader.fieldnames:
                raise BadInput(path, "CSV needs a 'prompt' column")
            cols = {k: next((c for c in names if c in reader.fieldnames), None) for k, names in _CSV_COLUMNS.items()}
            prompts = []
            for i, row in enumerate(reader):
                line = i + 2
                text = (row.get("prompt") or "").strip()
                if not text:
                    continue  # I2P has a few empty prompts; skipping them is what its users do
                if len(text) > MAX_PROMPT_CHARS:
                    raise BadInput(path, f"line {line}: prompt longer than {MAX_PROMPT_CHARS} characters")
                p_seed = _number(path, line, row, cols["seed"], int, seed + i)
                p_guid = _number(path, line, row, cols["guidance"], float, guidance)
                category = (row.get(cols["category"]) or "").strip() if cols["category"] else ""
                prompts.append(Prompt(" ".join(text.split()), p_seed, p_guid, category))
    except UnicodeDecodeError:
        raise BadInput(path, "CSV is not UTF-8 text") from None
    except csv.Error as exc:
        raise BadInput(path, f"malformed CSV ({exc})") from None
    if not prompts:
        raise BadInput(path, "CSV has no prompts")
    name = re.sub(r"[^a-z0-9-]+", "-", path.stem.lower()).strip("-")[:64] or "csv"
    return _suite(path, name, 1, f"prompts from {path.name}", concept, neutral, detector, "concept", steps, 1, prompts)


def _number(path: Path, line: int, row: dict, column: str | None, kind, default):
    if column is None or (row.get(column) or "").strip() == "":
        return default
    raw = row[column].strip()
    try:
        value = kind(float(raw)) if kind is int else kind(raw)
    except ValueError:
        raise BadInput(path, f"line {line}: {column} {raw!r} is not a number") from None
    if kind is int and (value < 0 or float(raw) != value):
        raise BadInput(path, f"line {line}: {column} {raw!r} is not a non-negative integer")
    return value


def list_suites(folder: str | Path | None = None) -> list[Suite]:
    """Every suite in ``folder`` (default: the shipped ones), validated."""
    folder = Path(folder) if folder is not None else builtin_dir()
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".yaml", ".yml"))
    suites = [load_suite(p) for p in files]
    seen: dict[str, str] = {}
    for s in suites:
        if s.name in seen:
            raise BadInput(s.path, f"suite name {s.name!r} is also used by {seen[s.name]}")
        seen[s.name] = s.path
    return suites
