"""Summaries of adapter metadata (kohya ``ss_*``, modelspec). Metadata is untrusted text.

Nothing here evaluates metadata: JSON-valued fields are parsed with ``json.loads`` and anything
that does not parse is reported as such. Rendering code must escape every value.
"""

from __future__ import annotations

import json
from collections import Counter

MAX_VALUE_CHARS = 4000
TOP_TAGS = 40
_KEY_FIELDS = (
    "ss_base_model_version", "ss_sd_model_name", "ss_network_module", "ss_network_dim",
    "ss_network_alpha", "ss_network_args", "ss_output_name", "ss_training_comment", "ss_num_train_images",
    "ss_max_train_steps", "ss_learning_rate", "ss_training_started_at", "sshs_model_hash",
    "sshs_legacy_hash", "modelspec.architecture", "modelspec.title", "modelspec.author",
    "modelspec.description", "modelspec.date", "modelspec.implementation", "modelspec.license",
)


def truncate(value: str, limit: int = MAX_VALUE_CHARS) -> str:
    if len(value) <= limit:
        return value
    return value[:limit] + f"… (truncated, {len(value)} characters)"


def tag_entries(raw: str) -> tuple[list[tuple[str, int]], str | None]:
    """Every (tag, count) entry of kohya's ``ss_tag_frequency`` (dataset -> tag -> count), datasets in
    order, entries whose count is not a number left out; and a problem when the field is malformed."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, TypeError):
        return [], "ss_tag_frequency is not valid JSON"
    if not isinstance(data, dict):
        return [], "ss_tag_frequency is not a JSON object"
    return [(str(tag), int(n)) for tags in data.values() if isinstance(tags, dict) for tag, n in tags.items()
            if isinstance(n, (int, float)) and not isinstance(n, bool)], None


def tag_frequency(raw: str) -> tuple[list[tuple[str, int]], str | None]:
    """Aggregate kohya's ``ss_tag_frequency`` (dataset -> tag -> count) into the top tags."""
    entries, problem = tag_entries(raw)
    if problem:
        return [], problem
    counts: Counter[str] = Counter()
    for tag, n in entries:
        counts[tag.strip()] += n
    return counts.most_common(TOP_TAGS), None


def dataset_dirs(raw: str) -> tuple[list[dict], str | None]:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, TypeError):
        return [], "ss_dataset_dirs is not valid JSON"
    if not isinstance(data, dict):
        return [], "ss_dataset_dirs is not a JSON object"
    rows = []
    for name, info in data.items():
        info = info if isinstance(info, dict) else {}
        rows.append({"name": str(name), "images": info.get("img_count"), "repeats": info.get("n_repeats")})
    return rows, None


def summarize(metadata: dict[str, str]) -> dict:
    """Key fields, training tags and datasets, plus every raw field (long values truncated)."""
    summary: dict = {"fields": {k: truncate(metadata[k]) for k in _KEY_FIELDS if k in metadata}}
    problems = []
    if "ss_tag_frequency" in metadata:
        tags, problem = tag_frequency(metadata["ss_tag_frequency"])
        summary["training_tags"] = [{"tag": t, "count": n} for t, n in tags]
        problems += [problem] if problem else []
    if "ss_dataset_dirs" in metadata:
        dirs, problem = dataset_dirs(metadata["ss_dataset_dirs"])
        summary["datasets"] = dirs
        problems += [problem] if problem else []
    summary["problems"] = problems
    summary["raw"] = {k: truncate(v) for k, v in sorted(metadata.items())}
    return summary
