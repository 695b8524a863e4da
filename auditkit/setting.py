"""A setting: a dataclass field that carries its help text (and, for the command line, its flag and choices), so a
library default and its command-line option are one value. :func:`auditkit.cli.options.setting_options` turns the
fields of a settings dataclass (``FinetuneConfig``, ``ESDConfig``, ``Retraining``) into click options; the scan's
settings (:class:`auditkit.config.ScanConfig`) are generated the same way by ``scan_options``. No torch here.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Training:
    ...     steps: int = setting(400, "training steps", flag="train-steps")
    >>> Training().steps
    400
"""

from __future__ import annotations

from dataclasses import field


def setting(default, help: str, *, flag: str | None = None, choices: tuple[str, ...] | None = None):
    """A dataclass field with ``default`` and its ``help``; ``flag``: its command-line name when it is not the
    field's (``train-steps`` for ``steps``); ``choices``: the values it may take."""
    meta = {"help": help}
    if flag is not None:
        meta["flag"] = flag
    if choices is not None:
        meta["choices"] = tuple(choices)
    return field(default=default, metadata=meta)
