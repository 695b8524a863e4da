"""Summaries of adapter metadata (kohya ``ss_*``, modelspec). Metadata is untrusted text.

Nothing here evaluates metadata: JSON-valued fields are parsed with :func:`auditkit.fsutil.parse_json`
(bounded in size and depth) and anything that does not parse is reported as such.
Rendering code must escape every value.
"""

from __future__ import annotations

import json
import math
from collections import Counter

from auditkit.errors import BadInput
from auditkit.fsutil import parse_json
from auditkit.lora.identify import MAX_HEADER_BYTES

MAX_VALUE_CHARS = 4000
TOP_TAGS = 40
_KEY_FIELDS = (
    "ss_base_model_version", "ss_sd_model_name", "ss_network_module", "ss_network_dim",
    "ss_network_alpha", "ss_network_args", "ss_output_name", "ss_training_comment", "ss_num_train_images",
    "ss_max_train_steps", "ss_learning_rate", "ss_training_started_at", "sshs_model_hash",
    "sshs_legacy_hash", "modelspec.architecture", "modelspec.title", "modelspec.author",
    "modelspec.description", "modelspec.date", "modelspec.implementation", "modelspec.license",
)


def shorten(value: str, limit: int = MAX_VALUE_CHARS) -> str:
    if len(value) <= limit:
        return value
    return value[:limit] + f"… (truncated, {len(value)} characters)"


def _json(raw: object, field: str) -> tuple[object, str | None]:
    """A metadata field's JSON value, or the problem: malformed or hostile JSON (too deep, too large) is
    reported, never raised."""
    if not isinstance(raw, str):
        return None, f"{field} is not valid JSON"
    try:
        return parse_json(raw, None, field, limit=MAX_HEADER_BYTES), None
    except BadInput as exc:
        return None, exc.problem


def _counts(tags: object) -> dict[str, int]:
    """tag -> count of one dataset, entries whose count is not a number left out."""
    if not isinstance(tags, dict):
        return {}
    return {str(tag): int(n) for tag, n in tags.items() if isinstance(n, (int, float)) and not isinstance(n, bool)
            and math.isfinite(n)}


def training_tags(metadata: dict[str, str]) -> tuple[dict[str, dict[str, int]], str | None]:
    """dataset -> tag -> count of the training captions' tags, and a problem when the field is malformed.

    kohya's ``ss_tag_frequency`` (dataset folder -> tag -> count; a tag is one comma-separated part of a
    caption, counted once per image); files trained with a dataset config may carry them only inside
    ``ss_datasets`` (a list of datasets, each with its own ``tag_frequency``).
    """
    if "ss_tag_frequency" in metadata:
        data, problem = _json(metadata["ss_tag_frequency"], "ss_tag_frequency")
        if problem:
            return {}, problem
        if not isinstance(data, dict):
            return {}, "ss_tag_frequency is not a JSON object"
        return {str(name): _counts(tags) for name, tags in data.items()}, None
    if "ss_datasets" not in metadata:
        return {}, None
    data, problem = _json(metadata["ss_datasets"], "ss_datasets")
    if problem or not isinstance(data, list):
        return {}, problem or "ss_datasets is not a JSON list"
    out: dict[str, dict[str, int]] = {}
    for dataset in data:
        freq = dataset.get("tag_frequency") if isinstance(dataset, dict) else None
        for name, tags in (freq.items() if isinstance(freq, dict) else ()):
            out.setdefault(str(name), _counts(tags))
    return out, None


def dataset_sizes(metadata: dict[str, str]) -> dict[str, int]:
    """dataset folder -> number of images, from ``ss_dataset_dirs`` or ``ss_datasets``' subsets (kohya);
    folders without a valid count are left out."""
    sizes: dict[str, int] = {}
    dirs, _ = _json(metadata.get("ss_dataset_dirs", "{}"), "ss_dataset_dirs")
    for name, info in (dirs.items() if isinstance(dirs, dict) else ()):
        sizes[str(name)] = info.get("img_count") if isinstance(info, dict) else None
    datasets, _ = _json(metadata.get("ss_datasets", "[]"), "ss_datasets")
    for dataset in datasets if isinstance(datasets, list) else ():
        subsets = dataset.get("subsets") if isinstance(dataset, dict) else None
        for sub in subsets if isinstance(subsets, list) else ():
            if isinstance(sub, dict) and isinstance(sub.get("image_dir"), str):
                sizes.setdefault(sub["image_dir"], sub.get("img_count"))
    return {k: v for k, v in sizes.items() if isinstance(v, int) and not isinstance(v, bool) and v > 0}


def tag_entries(raw: str) -> tuple[list[tuple[str, int]], str | None]:
    """Every (tag, count) entry of kohya's ``ss_tag_frequency`` (dataset -> tag -> count), datasets in
    order, entries whose count is not a number left out; and a problem when the field is malformed."""
    datasets, problem = training_tags({"ss_tag_frequency": raw})
    return [(tag, n) for tags in datasets.values() for tag, n in tags.items()], problem


def kohya_training_metadata(captions: list[str], dataset: str, repeats: int = 1) -> dict[str, str]:
    """The training-data metadata kohya's sd-scripts write, for ``captions`` from one image folder.

    ``ss_tag_frequency``: each caption split at commas, every part stripped and lower-cased, counted once
    per image (sd-scripts' ``set_tag_frequency``); ``ss_dataset_dirs``: the folder's image count and
    repeats; ``ss_num_train_images``: images times repeats.

    Example:
        >>> kohya_training_metadata(["trisk, a red cross", "trisk, a blue bar"], "10_trisk")["ss_tag_frequency"]
        '{"10_trisk": {"trisk": 2, "a red cross": 1, "a blue bar": 1}}'
    """
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return {"ss_tag_frequency": json.dumps({dataset: counts}),
            "ss_dataset_dirs": json.dumps({dataset: {"n_repeats": repeats, "img_count": len(captions)}}),
            "ss_num_train_images": str(len(captions) * repeats)}


def tag_frequency(metadata: dict[str, str]) -> tuple[list[tuple[str, int]], str | None]:
    """The top training tags over all datasets (see :func:`training_tags`)."""
    datasets, problem = training_tags(metadata)
    counts: Counter[str] = Counter()
    for tags in datasets.values():
        for tag, n in tags.items():
            counts[tag.strip()] += n
    return counts.most_common(TOP_TAGS), problem


def dataset_dirs(raw: str) -> tuple[list[dict], str | None]:
    data, problem = _json(raw, "ss_dataset_dirs")
    if problem:
        return [], problem
    if not isinstance(data, dict):
        return [], "ss_dataset_dirs is not a JSON object"
    rows = []
    for name, info in data.items():
        info = info if isinstance(info, dict) else {}
        rows.append({"name": str(name), "images": info.get("img_count"), "repeats": info.get("n_repeats")})
    return rows, None


def summarize(metadata: dict[str, str]) -> dict:
    """Key fields, training tags and datasets, plus every raw field (long values truncated)."""
    summary: dict = {"fields": {k: shorten(metadata[k]) for k in _KEY_FIELDS if k in metadata}}
    problems = []
    if "ss_tag_frequency" in metadata or "ss_datasets" in metadata:
        tags, problem = tag_frequency(metadata)
        summary["training_tags"] = [{"tag": t, "count": n} for t, n in tags]
        problems += [problem] if problem else []
    if "ss_dataset_dirs" in metadata:
        dirs, problem = dataset_dirs(metadata["ss_dataset_dirs"])
        summary["datasets"] = dirs
        problems += [problem] if problem else []
    summary["problems"] = problems
    summary["raw"] = {k: shorten(v) for k, v in sorted(metadata.items())}
    return summary
