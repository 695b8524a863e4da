"""Probe suites: versioned, declarative prompt sets (YAML), plus prompt CSVs such as I2P's.

A suite is data, never code, and is read as hostile input: YAML goes through a ``SafeLoader`` (tags such
as ``!!python/object`` are refused) that also refuses aliases (``*name``: billion-laughs and merge-key
bombs) and nesting deeper than ``MAX_YAML_DEPTH``; every field is type- and range-checked. Every problem
is a one-line ``BadInput`` naming the file and the field, raised before any model loads.

Suite schema (``schema: auditkit.suite/1``)::

    name: lab-cross            # [a-z0-9][a-z0-9-]*, at most 64 characters, unique among the suites of a run
    version: 1                 # integer in [1, MAX_VERSION]; bump when prompts or settings change
    description: ...           # optional string, at most MAX_DESCRIPTION_CHARS
    concept: {word: cross, neutral: square}   # what the safety module suppresses, and a neutral counterpart;
                               # optional terms: [..] words naming it in training tags and trigger words
    detector: lab-cross        # a name in auditkit.detectors.REGISTRY, with its pinned profile
    role: concept              # concept (re-emergence) | control (false positives, fidelity) | anchor (prompts a
                               # repair is trained on, never probed: see auditkit.repair.anchors)
    sampling: {steps: 25, guidance: 5.0, seed: 1000000, images_per_prompt: 1}
    input_image: {path: room.png}   # optional, for edit pipelines (Flux.1 Kontext): the image every prompt
                               # edits; a path relative to the suite file, or {lab_seed: SEED}: a lab-world image
    prompts:
      - text: a red cross      # at most MAX_PROMPT_CHARS; whitespace is normalised
        category: explicit     # optional free label
        seed: 12               # optional: overrides sampling.seed + the prompt's index
        guidance: 7.5          # optional: overrides sampling.guidance

Limits (module constants):

- ``steps`` in [1, MAX_STEPS]; ``images_per_prompt`` in [1, MAX_IMAGES_PER_PROMPT];
- seeds in [0, MAX_PROMPT_SEED]: image k of a prompt uses seed ``prompt.seed * 1000 + k`` (k < 1000), which must
  stay below 2**53, so it is exact as a float or a JSON number and within ``torch.manual_seed``'s range;
- ``guidance`` a finite number in [0, MAX_GUIDANCE] (NaN or a negative value would silently switch
  classifier-free guidance off);
- at most MAX_PROMPTS prompts and MAX_SUITE_IMAGES images (prompts x images_per_prompt) per suite;
- texts are strings without control characters (NUL, escape sequences...); words, labels and the
  detector name at most MAX_LABEL_CHARS;
- files at most MAX_YAML_BYTES (YAML) or MAX_CSV_BYTES (CSV), checked before parsing; a YAML document
  at most MAX_YAML_NODES values (scalars, lists and mappings), counted while parsing.

Prompt CSVs (UTF-8, with or without a BOM) need a ``prompt`` column; optional ``seed``/``sd_seed``,
``guidance``/``sd_guidance_scale`` and ``category``/``categories`` columns (I2P's names are accepted as
they are). The same limits apply, with the line number in the message; NUL bytes and malformed quoting
are refused.

``Suite.path`` is the file's resolved absolute path and ``Suite.sha256`` the SHA-256 of its bytes, so a run
log can tell a suite edited in place; ``load_suites`` loads several files at once, once per file, and
refuses two files that define the same suite name.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import functools
import hashlib
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from auditkit.detectors import REGISTRY
from auditkit.errors import BadInput
from auditkit.fsutil import read_bounded
from auditkit.placement import START, place

SCHEMA = "auditkit.suite/1"
ROLES = ("concept", "control", "anchor")
MAX_PROMPT_CHARS = 2000
MAX_DESCRIPTION_CHARS = 2000
MAX_TERMS = 100  # concept.terms: words that name the concept (metadata evidence)
MAX_LABEL_CHARS = 200  # concept word and neutral, detector name, category
MAX_VERSION = 2**31 - 1
MAX_STEPS = 1000
MAX_IMAGES_PER_PROMPT = 1000  # image k of a prompt uses seed prompt.seed * 1000 + k, so k < 1000
# a prompt's seed (the training seed's limit is auditkit.train.lora.MAX_TRAIN_SEED): MAX_PROMPT_SEED * 1000 + 999
# < 2**53, so every image seed is exact as a float / JSON number
MAX_PROMPT_SEED = 2**53 // 1000 - 1
MAX_GUIDANCE = 100.0
MAX_PROMPTS = 10_000
MAX_SUITE_IMAGES = 100_000
MAX_YAML_BYTES = 5 * 2**20
MAX_INPUT_IMAGE_BYTES = 64 * 2**20  # an edit suite's input image (its pixels are bounded by the decoder)
MAX_CSV_BYTES = 16 * 2**20  # prompt tables (I2P: about 5,000 rows with many columns) are larger than suites
MAX_YAML_DEPTH = 16  # a suite needs 4 (suite > prompts > prompt > text); deep nesting overflows the stack
# PyYAML's pure-Python composer takes ~700 bytes and ~20 us per value: 5 MB of "{}," would take 1.8 GB and
# a minute. A suite at MAX_PROMPTS needs at most 9 values per prompt (a mapping, 4 keys and 4 values).
MAX_YAML_NODES = 10 * MAX_PROMPTS + 1000
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
# Control characters other than tab and line breaks: NUL, terminal escape sequences, C1 controls.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_TOP_KEYS = {"schema", "name", "version", "description", "concept", "detector", "role", "sampling", "input_image",
             "prompts"}
_PROMPT_KEYS = {"text", "category", "seed", "guidance"}
# sampling field: (type, minimum, maximum, default)
_SAMPLING = {"steps": (int, 1, MAX_STEPS, 25), "guidance": (float, 0.0, MAX_GUIDANCE, 7.5),
             "seed": (int, 0, MAX_PROMPT_SEED, 0), "images_per_prompt": (int, 1, MAX_IMAGES_PER_PROMPT, 1)}


@dataclass(frozen=True)
class Prompt:
    text: str
    seed: int
    guidance: float
    category: str = ""


@dataclass(frozen=True)
class InputImage:
    """The image an edit pipeline's prompts edit (a suite's ``input_image``): a file (``path``, resolved, with
    its bytes' SHA-256) or a lab-world image drawn from ``lab_seed``. Checked when the suite loads."""

    path: str = ""
    sha256: str = ""
    lab_seed: int | None = None

    def describe(self) -> str:
        """What the run log's header records of it."""
        return f"lab:{self.lab_seed}" if self.lab_seed is not None else f"{self.path} (sha256 {self.sha256})"

    def pixels(self):
        """The image, uint8 H × W × 3."""
        import numpy as np

        if self.lab_seed is not None:
            from auditkit.lab import world

            return world.render(world.sample_specs(self.lab_seed, 1)[0])
        from auditkit.images import read_image

        return np.asarray(read_image(Path(self.path)), dtype=np.uint8)


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
    path: str = ""  # resolved absolute path of the file
    categories: dict[str, int] = field(default_factory=dict)
    sha256: str = ""  # SHA-256 of the file's bytes: tells a suite edited in place between runs
    concept_terms: tuple[str, ...] = ()  # words naming the concept in training tags / trigger words
    variant_of: str = ""  # a derived variant (see trigger_variant): the suite it was made from
    phrase: str = ""  # ... the phrase it puts in that suite's prompts
    placement: str = START  # ... and where (auditkit.placement)
    input_image: InputImage | None = None  # the image an edit pipeline's prompts edit

    @property
    def prefix(self) -> str:
        """What a variant placed at the start prepends to each prompt ("w1, w2, "; "" for other variants)."""
        return f"{self.phrase}, " if self.phrase and self.placement == START else ""

    def variant_info(self) -> dict[str, str]:
        """What the run log and the report record of a variant: the suite it was made from and its ``prefix``
        (placed at the start, as every run has recorded it), or its ``phrase`` and ``placement``."""
        if not self.variant_of:
            return {}
        if self.placement == START:
            return {"variant_of": self.variant_of, "prefix": self.prefix}
        return {"variant_of": self.variant_of, "phrase": self.phrase, "placement": self.placement}


TRIGGER_VARIANT = "+triggers"  # suffix of a trigger variant's name ('+' is never in a suite file's name)
FOUND_VARIANT = "+found"  # ... of a variant probing a phrase the trigger search found: +found1, +found2, ...


def normalised(text: str) -> str:
    """A prompt as compared for overlap between suites: lower case, punctuation dropped, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def trigger_variant(suite: Suite, phrase: str, suffix: str = TRIGGER_VARIANT, placement: str = START) -> Suite:
    """``suite`` with ``phrase`` (the candidate's trigger words, "w1, w2") put in every prompt at ``placement``
    (:mod:`auditkit.placement`; the start, as users prompt an adapter, unless told). Same prompt indices, seeds,
    guidance and steps, so its images pair with the suite's own image for image; its name is the suite's with
    ``suffix`` (:data:`TRIGGER_VARIANT`) appended."""
    prompts = tuple(dataclasses.replace(p, text=place(p.text, phrase, placement, suite.concept_word))
                    for p in suite.prompts)
    return dataclasses.replace(suite, name=suite.name + suffix, prompts=prompts, variant_of=suite.name,
                               phrase=phrase, placement=placement)


def with_trigger_variants(suites: Iterable[Suite], phrase: str) -> list[Suite]:
    """Every suite, each concept suite followed by its trigger variant (none without a phrase)."""
    out = []
    for s in suites:
        out.append(s)
        if phrase and s.role == "concept" and not s.variant_of:
            out.append(trigger_variant(s, phrase))
    return out


def with_found_variants(suites: Iterable[Suite], found: dict[str, list[tuple[str, str]]]) -> list[Suite]:
    """Every suite, each concept suite's variants followed by one variant per (phrase, placement) the trigger
    search found for it (``found``: suite name -> probes; :mod:`auditkit.discovery`), named ``NAME+found1``, ..."""
    out = []
    for s in suites:
        out.append(s)
        if s.role == "concept" and not s.variant_of:
            out += [trigger_variant(s, phrase, f"{FOUND_VARIANT}{i}", placement)
                    for i, (phrase, placement) in enumerate(found.get(s.name, ()), 1)]
    return out


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


# ---------------------------------------------------------------------------------------------- files


def load_suite(path: str | Path) -> Suite:
    """Read and validate one suite file (``.yaml``/``.yml``) or prompt CSV (``.csv``)."""
    path = _existing(path)
    if path.suffix.lower() == ".csv":
        return load_csv(path)
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise BadInput(path, "a suite is a .yaml/.yml file or a prompt .csv")
    raw = _read(path, MAX_YAML_BYTES)
    data = _parse_yaml(path, _decode(path, raw, "suite"))
    return _validate(path, data, hashlib.sha256(raw).hexdigest())


def load_suites(paths: Iterable[str | Path]) -> list[Suite]:
    """Several suites, in order. A file named twice (relative and absolute, via ``..`` or a symlink) is loaded
    once; two files defining the same suite name are refused, as the second's images would overwrite the
    first's."""
    suites: list[Suite] = []
    seen_files: set[Path] = set()
    by_name: dict[str, Suite] = {}
    for given in paths:
        resolved = Path(given).resolve()
        if resolved in seen_files:
            continue
        seen_files.add(resolved)
        suite = load_suite(given)
        if suite.name in by_name:
            raise BadInput(suite.path, f"suite name {suite.name!r} is also defined by {by_name[suite.name].path}")
        by_name[suite.name] = suite
        suites.append(suite)
    return suites


def list_suites(folder: str | Path | None = None) -> list[Suite]:
    """Every suite in ``folder`` (default: the shipped ones), validated."""
    folder = Path(folder) if folder is not None else builtin_dir()
    return load_suites(sorted(p for p in folder.glob("*") if p.suffix.lower() in (".yaml", ".yml")))


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise BadInput(path, "no such suite file")
    return path.resolve()


def _read(path: Path, limit: int) -> bytes:
    """The file's bytes; reading stops past ``limit``, so a huge (or growing) file never fills memory."""
    return read_bounded(path, limit)


def _decode(path: Path, raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8-sig")  # Excel and Notepad write a BOM
    except UnicodeDecodeError:
        raise BadInput(path, f"{what} is not UTF-8 text") from None


# ----------------------------------------------------------------------------------------------- YAML


class _Refused(Exception):
    """A YAML construct refused while composing, before any Python object is built."""


@functools.cache
def _loader() -> type:
    import yaml

    class SuiteLoader(yaml.SafeLoader):
        """Refuses aliases, deep nesting and too many values while composing. Counting aliases is not enough:
        each merge key (``<<: [*a, *a]``) copies the merged pairs, so a few dozen can still grow exponentially."""

        def __init__(self, stream: str):
            super().__init__(stream)
            self.depth = 0
            self.nodes = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                line = self.peek_event().start_mark.line + 1
                raise _Refused(f"YAML aliases (*name) are not accepted in a suite (line {line}); write the value out")
            self.nodes += 1
            if self.nodes > MAX_YAML_NODES:
                raise _Refused(f"YAML document has more than {MAX_YAML_NODES} values")
            self.depth += 1
            try:
                if self.depth > MAX_YAML_DEPTH:
                    raise _Refused(f"YAML nested deeper than {MAX_YAML_DEPTH} levels")
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return SuiteLoader


def _parse_yaml(path: Path, text: str) -> object:
    import yaml

    try:
        return yaml.load(text, Loader=_loader())  # noqa: S506 - a SafeLoader subclass
    except _Refused as exc:
        raise BadInput(path, str(exc)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise BadInput(path, f"not valid YAML{where} (only plain data is accepted, no tags)") from None
    except (ValueError, OverflowError, RecursionError) as exc:
        # Values Python cannot build: integers over 4300 digits, impossible dates.
        raise BadInput(path, f"not valid YAML ({type(exc).__name__}: {str(exc)[:120]})") from None


# ------------------------------------------------------------------------------------------ validation


def _need(path: Path, cond: bool, problem: str) -> None:
    if not cond:
        raise BadInput(path, problem)


def _show(keys: Iterable[object]) -> str:
    """Unknown keys for a message, each cut short: they come from the file."""
    return ", ".join(sorted(str(k)[:40] for k in keys))


def _text(path: Path, value: object, what: str, limit: int, empty: bool = False) -> str:
    """A string field: non-empty (unless ``empty``), at most ``limit`` characters, no control characters."""
    kind = "a string" if empty else "a non-empty string"
    _need(path, isinstance(value, str) and (empty or value.strip() != ""), f"{what} must be {kind}")
    _need(path, len(value) <= limit, f"{what} is longer than {limit} characters")
    _need(path, not _CONTROL.search(value), f"{what} contains a control character")
    return value


def _in_range(value: object, kind: type, lo: float, hi: float) -> bool:
    """``value`` is a ``kind`` (an int also counts as a float) within [lo, hi]; NaN fails the comparison."""
    if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
        return False
    return lo <= value <= hi


def _range_text(kind: type, lo: float, hi: float) -> str:
    if kind is float:
        return f"a finite number in [{lo:g}, {hi:g}]"
    return f"a non-negative integer <= {hi}" if lo == 0 else f"an integer in [{lo}, {hi}]"


_SEED_TEXT = _range_text(int, 0, MAX_PROMPT_SEED)
_GUIDANCE_TEXT = _range_text(float, 0.0, MAX_GUIDANCE)


def _validate(path: Path, data: object, sha256: str = "") -> Suite:
    _need(path, isinstance(data, dict), "suite must be a mapping")
    unknown = set(data) - _TOP_KEYS
    _need(path, not unknown, f"unknown field(s): {_show(unknown)}")
    _need(path, data.get("schema") == SCHEMA, f"schema must be {SCHEMA!r}")
    name = data.get("name")
    _need(path, isinstance(name, str) and bool(_NAME.fullmatch(name)), "name must match [a-z0-9][a-z0-9-]*")
    version = data.get("version")
    _need(path, _in_range(version, int, 1, MAX_VERSION), f"version must be {_range_text(int, 1, MAX_VERSION)}")
    description = _text(path, data.get("description", ""), "description", MAX_DESCRIPTION_CHARS, empty=True)
    word, neutral, terms = _concept(path, data.get("concept"))
    detector = _detector(path, data.get("detector"))
    role = data.get("role", "concept")
    _need(path, isinstance(role, str) and role in ROLES, f"role must be one of {', '.join(ROLES)}")
    sampling = _sampling(path, data.get("sampling"))
    prompts = _prompts(path, data.get("prompts"), sampling)
    suite = _suite(path, name, version, description, word, neutral, detector, role, sampling["steps"],
                   sampling["images_per_prompt"], prompts, sha256)
    return dataclasses.replace(suite, concept_terms=terms, input_image=_input_image(path, data.get("input_image")))


def _input_image(path: Path, raw: object) -> InputImage | None:
    """``input_image``: ``{path: FILE}`` (relative to the suite file; it must exist and decode as an image) or
    ``{lab_seed: SEED}``; None when absent."""
    if raw is None:
        return None
    _need(path, isinstance(raw, dict) and len(raw) == 1 and set(raw) <= {"path", "lab_seed"},
          "input_image must be {path: FILE} or {lab_seed: SEED}")
    if "lab_seed" in raw:
        _need(path, _in_range(raw["lab_seed"], int, 0, MAX_PROMPT_SEED), f"input_image.lab_seed must be {_SEED_TEXT}")
        return InputImage(lab_seed=int(raw["lab_seed"]))
    given = _text(path, raw["path"], "input_image.path", MAX_DESCRIPTION_CHARS)
    image = (path.parent / given).resolve()
    _need(path, image.is_file(), f"input_image.path {given[:80]!r}: no such file ({image})")
    from auditkit.images import read_image

    read_image(image)  # decodes, or one line naming the image file
    return InputImage(str(image), hashlib.sha256(_read(image, MAX_INPUT_IMAGE_BYTES)).hexdigest())


def _concept(path: Path, concept: object) -> tuple[str, str, tuple[str, ...]]:
    _need(path, isinstance(concept, dict) and isinstance(concept.get("word"), str)
          and isinstance(concept.get("neutral"), str), "concept must have string fields 'word' and 'neutral'")
    extra = set(concept) - {"word", "neutral", "terms"}
    _need(path, not extra, f"concept has unknown field(s): {_show(extra)}")
    terms = concept.get("terms", [])
    _need(path, isinstance(terms, list) and len(terms) <= MAX_TERMS, f"concept.terms must be a list of at most "
                                                                      f"{MAX_TERMS} words")
    return (_text(path, concept["word"], "concept.word", MAX_LABEL_CHARS),
            _text(path, concept["neutral"], "concept.neutral", MAX_LABEL_CHARS),
            tuple(_text(path, t, f"concept.terms[{i}]", MAX_LABEL_CHARS) for i, t in enumerate(terms)))


def _detector(path: Path, name: object) -> str:
    """A registered detector name; checked here so a typo fails before the model loads, not after.
    ``REGISTRY`` holds "module:attr" strings, so this imports no detector."""
    name = _text(path, name, "detector", MAX_LABEL_CHARS)
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(sorted(REGISTRY))}"
        raise BadInput(path, f"unknown detector '{name}'; {hint}")
    return name


def _sampling(path: Path, sampling: object) -> dict:
    sampling = {} if sampling is None else sampling
    _need(path, isinstance(sampling, dict), "sampling must be a mapping")
    unknown = set(sampling) - set(_SAMPLING)
    _need(path, not unknown, f"unknown sampling field(s): {_show(unknown)}")
    values = {}
    for key, (kind, lo, hi, default) in _SAMPLING.items():
        value = sampling.get(key, default)
        _need(path, _in_range(value, kind, lo, hi), f"sampling.{key} must be {_range_text(kind, lo, hi)}")
        values[key] = kind(value)
    return values


def _prompts(path: Path, raw: object, sampling: dict) -> list[Prompt]:
    _need(path, isinstance(raw, list) and len(raw) > 0, "prompts must be a non-empty list")
    _need(path, len(raw) <= MAX_PROMPTS, f"more than {MAX_PROMPTS} prompts")
    per_prompt = sampling["images_per_prompt"]
    _need(path, len(raw) * per_prompt <= MAX_SUITE_IMAGES,
          f"{len(raw)} prompts x {per_prompt} images per prompt is more than {MAX_SUITE_IMAGES} images")
    return [_prompt(path, i, item, sampling) for i, item in enumerate(raw)]


def _prompt(path: Path, i: int, item: object, sampling: dict) -> Prompt:
    where = f"prompts[{i}]"
    entry = {"text": item} if isinstance(item, str) else item
    _need(path, isinstance(entry, dict), f"{where} must be a string or a mapping")
    extra = set(entry) - _PROMPT_KEYS
    _need(path, not extra, f"{where} has unknown field(s): {_show(extra)}")
    text = _text(path, entry.get("text"), f"{where}.text", MAX_PROMPT_CHARS)
    seed = entry.get("seed", sampling["seed"] + i)
    default = "" if "seed" in entry else f" (it defaults to sampling.seed + {i})"
    _need(path, _in_range(seed, int, 0, MAX_PROMPT_SEED), f"{where}.seed must be {_SEED_TEXT}{default}")
    guidance = entry.get("guidance", sampling["guidance"])
    _need(path, _in_range(guidance, float, 0.0, MAX_GUIDANCE), f"{where}.guidance must be {_GUIDANCE_TEXT}")
    category = _text(path, entry.get("category", ""), f"{where}.category", MAX_LABEL_CHARS, empty=True)
    return Prompt(" ".join(text.split()), seed, float(guidance), category)


def _suite(path, name, version, description, word, neutral, detector, role, steps, per_prompt, prompts,
           sha256: str = "") -> Suite:
    categories: dict[str, int] = {}
    for p in prompts:
        categories[p.category] = categories.get(p.category, 0) + 1
    return Suite(name, version, description, word, neutral, detector, role, steps, per_prompt, tuple(prompts),
                 str(path), categories, sha256)


# ------------------------------------------------------------------------------------------------ CSV


_CSV_COLUMNS = {"seed": ("seed", "sd_seed"), "guidance": ("guidance", "sd_guidance_scale"),
                "category": ("category", "categories")}


def load_csv(path: str | Path, detector: str = "nudenet-default", concept: str = "nudity",
             neutral: str = "clothing", steps: int = 25, guidance: float = 7.5, seed: int = 0) -> Suite:
    """A prompt CSV (e.g. a local copy of I2P) as a concept suite; seeds default to ``seed + row``."""
    path = _existing(path)
    _check_csv_settings(path, detector, concept, neutral, steps, guidance, seed)
    raw = _read(path, MAX_CSV_BYTES)
    text = _decode(path, raw, "CSV")
    if "\x00" in text:  # Python >= 3.11's csv module accepts NUL bytes silently
        raise BadInput(path, f"CSV contains a NUL byte (line {text.count(chr(10), 0, text.index(chr(0))) + 1})")
    prompts = _csv_prompts(path, text, seed, guidance)
    _need(path, len(prompts) > 0, "CSV has no prompts")
    name = re.sub(r"[^a-z0-9-]+", "-", path.stem.lower()).strip("-")[:64] or "csv"
    return _suite(path, name, 1, f"prompts from {path.name}", concept, neutral, detector, "concept", steps, 1,
                  prompts, hashlib.sha256(raw).hexdigest())


def _check_csv_settings(path: Path, detector: str, concept: str, neutral: str, steps: int, guidance: float,
                        seed: int) -> None:
    """The caller's settings for a CSV get the checks a YAML suite's fields get."""
    _detector(path, detector)
    _text(path, concept, "concept", MAX_LABEL_CHARS)
    _text(path, neutral, "neutral", MAX_LABEL_CHARS)
    for key, value in (("steps", steps), ("guidance", guidance), ("seed", seed)):
        kind, lo, hi, _ = _SAMPLING[key]
        _need(path, _in_range(value, kind, lo, hi), f"{key} must be {_range_text(kind, lo, hi)}")


def _csv_prompts(path: Path, text: str, seed: int, guidance: float) -> list[Prompt]:
    # strict: an unterminated quote or a stray one inside a field is an error, not silently merged rows.
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    try:
        if not reader.fieldnames or "prompt" not in reader.fieldnames:
            raise BadInput(path, "CSV needs a 'prompt' column")
        cols = {k: next((c for c in names if c in reader.fieldnames), None) for k, names in _CSV_COLUMNS.items()}
        prompts = []
        for i, row in enumerate(reader):
            prompt = _csv_prompt(path, reader.line_num, row, cols, seed + i, guidance)
            if prompt is not None:
                prompts.append(prompt)
                _need(path, len(prompts) <= MAX_PROMPTS, f"more than {MAX_PROMPTS} prompts")
    except csv.Error as exc:
        hint = "; a quote left open?" if "end of data" in str(exc) else ""
        # DictReader.line_num is updated only after a good row: the csv reader's counts the failing line too.
        raise BadInput(path, f"malformed CSV at line {reader.reader.line_num} ({exc}{hint})") from None
    return prompts


def _csv_prompt(path: Path, line: int, row: dict, cols: dict, seed: int, guidance: float) -> Prompt | None:
    text = (row.get("prompt") or "").strip()
    if not text:
        return None  # I2P has a few empty prompts; skipping them is what its users do
    if len(text) > MAX_PROMPT_CHARS:
        raise BadInput(path, f"line {line}: prompt longer than {MAX_PROMPT_CHARS} characters")
    p_seed = _csv_seed(path, line, row, cols["seed"], seed)
    p_guid = _csv_guidance(path, line, row, cols["guidance"], guidance)
    category = (row.get(cols["category"]) or "").strip() if cols["category"] else ""
    if len(category) > MAX_LABEL_CHARS:
        raise BadInput(path, f"line {line}: {cols['category']} longer than {MAX_LABEL_CHARS} characters")
    return Prompt(" ".join(text.split()), p_seed, p_guid, category)


def _cell(row: dict, column: str | None) -> str:
    return (row.get(column) or "").strip() if column is not None else ""


def _csv_seed(path: Path, line: int, row: dict, column: str | None, default: int) -> int:
    raw = _cell(row, column)
    if raw == "":
        _need(path, default <= MAX_PROMPT_SEED,
              f"line {line}: seed {default} (seed + row) is more than {MAX_PROMPT_SEED}")
        return default
    try:
        value = int(raw)  # exact, where float() would round seeds past 2**53
    except ValueError:
        number = _csv_float(path, line, column, raw)
        value = int(number) if number.is_integer() else None  # "42.0" from spreadsheets; inf/nan are not
    _need(path, value is not None and 0 <= value <= MAX_PROMPT_SEED,
          f"line {line}: {column} {raw!r} is not {_SEED_TEXT}")
    return value


def _csv_guidance(path: Path, line: int, row: dict, column: str | None, default: float) -> float:
    raw = _cell(row, column)
    if raw == "":
        return default
    value = _csv_float(path, line, column, raw)
    _need(path, 0.0 <= value <= MAX_GUIDANCE, f"line {line}: {column} {raw!r} is not {_GUIDANCE_TEXT}")
    return value


def _csv_float(path: Path, line: int, column: str | None, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise BadInput(path, f"line {line}: {column} {raw!r} is not a number") from None
