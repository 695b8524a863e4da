"""Command-line options generated from :class:`auditkit.config.ScanConfig` and its thresholds.

Every option defaults to None ("not given"), so the config file's value stands unless the command
line sets one (see :func:`auditkit.configfile.resolve`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from auditkit.config import CANDIDATE_FROM, DynamicThresholds, ScanConfig, StaticThresholds
from auditkit.models.architectures import BUILTIN as BUILTIN_ARCHS

FLAG_NAMES = {"static_only": "static", "suites": "suite", "detectors": "detector", "triggers": "trigger"}
SKIP = ("candidate", "static", "dynamic")


def _option_for(f: dataclasses.Field):
    flag = "--" + FLAG_NAMES.get(f.name, f.name).replace("_", "-")
    help_text = f.metadata["help"]
    if f.name == "static_only":
        return click.option(f"{flag}/--no-static", f.name, default=None, help=help_text)
    if f.name == "show_flagged":
        return click.option(f"{flag}/--blur-flagged", f.name, default=None, help=help_text)
    if f.name == "probe_triggers":
        return click.option(f"{flag}/--no-triggers", f.name, default=None, help=help_text)
    if f.name == "trigger_search":
        return click.option(f"{flag}/--no-trigger-search", f.name, default=None, help=help_text)
    if f.name == "triggers":
        return click.option(flag, f.name, multiple=True, metavar="WORD", help=help_text + "; repeatable")
    if f.name == "suites":
        return click.option(flag, f.name, multiple=True, type=click.Path(path_type=Path),
                            help=help_text + "; repeatable")
    if f.name == "detectors":
        return click.option(flag, f.name, multiple=True, metavar="SUITE=DETECTOR", help=help_text + "; repeatable")
    if f.name == "multipliers":
        return click.option(flag, f.name, default=None, metavar="M,M,...", help=help_text + " (default 0.5,1,1.5)")
    if f.name == "arch":
        return click.option(flag, f.name, default=None, type=click.Choice(list(BUILTIN_ARCHS)), help=help_text)
    if f.name in ("safety", "out"):
        return click.option(flag, f.name, default=None, type=click.Path(path_type=Path), help=help_text)
    if f.name == "trigger_search_placements":
        return click.option(flag, f.name, default=None, metavar="WHERE,WHERE,...", help=help_text)
    if f.name in ("steps", "batch_size") or f.name.startswith("trigger_search_"):
        return click.option(flag, f.name, default=None, type=int, help=help_text)
    if f.name == "energy":
        return click.option(flag, f.name, default=None, type=float, help=help_text + " (default 0.99)")
    if f.name == "candidate_from":
        return click.option(flag, f.name, default=None, type=click.Choice(list(CANDIDATE_FROM)),
                            help=help_text + " (default safety)")
    return click.option(flag, f.name, default=None, help=help_text)


TYPES = {"int": int, "float": float, "str": str}


def _kind(f: dataclasses.Field) -> type:
    """int, float or str of a field annotated ``T`` or ``T | None`` (as a string under postponed annotations)."""
    name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return TYPES[name.replace(" | None", "")]


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", f.name.replace("_", "-"))


def _param(f: dataclasses.Field) -> str:
    """The command's parameter name of a setting: its flag's (``train_steps`` for ``--train-steps``)."""
    return _flag(f).replace("-", "_")


def setting_options(cls, names: tuple[str, ...]):
    """A decorator adding one click option per field ``names`` of the settings dataclass ``cls``
    (:func:`auditkit.setting.setting`): ``--field-name`` (or the field's ``flag``), the field's type and choices, its
    help, and its default, shown: the library's default is the command line's. The command receives each as the
    flag's parameter (``train_steps`` for ``--train-steps``); :func:`settings_of` makes the dataclass of them."""
    fields = {f.name: f for f in dataclasses.fields(cls)}

    def decorate(func):
        for name in reversed(names):
            f = fields[name]
            kind = _kind(f)
            choices = f.metadata.get("choices")
            func = click.option("--" + _flag(f), _param(f), default=f.default,
                                show_default=f.default is not None,
                                type=click.Choice(list(choices)) if choices else kind, help=f.metadata["help"])(func)
        return func

    return decorate


def settings_of(cls, names: tuple[str, ...], params: dict):
    """``cls`` made of the command's parameters that :func:`setting_options` added for ``names`` (popped from
    ``params``); a bad value is the dataclass's own one-line error."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return cls(**{n: params.pop(_param(fields[n])) for n in names})


def scan_options(func, skip: tuple[str, ...] = ()):
    """Decorate a command with one option per ScanConfig field and threshold, plus --config/--no-config;
    ``skip``: fields the command sets itself (``auditkit batch`` has its own --out)."""
    for group, cls in reversed((("static", StaticThresholds), ("dynamic", DynamicThresholds))):
        for f in reversed(dataclasses.fields(cls)):
            func = click.option("--" + f.name.replace("_", "-"), f"{group}__{f.name}", type=float, default=None,
                                help=f"{f.metadata['help']} (default {f.default:g})")(func)
    for f in reversed([f for f in dataclasses.fields(ScanConfig) if f.name not in SKIP + skip]):
        func = _option_for(f)(func)
    func = click.option("--no-config", is_flag=True, help="Ignore auditkit.toml / [tool.auditkit].")(func)
    func = click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
                        help="Config file (default: auditkit.toml or pyproject.toml's [tool.auditkit], "
                             "found from the working directory upwards).")(func)
    return func


def overrides(params: dict) -> dict:
    """The command line's ScanConfig values (None where not given), from the decorated params."""
    from auditkit.cli.common import parse_multipliers

    out = {}
    for name, value in params.items():
        name = name.replace("__", ".")  # thresholds: static__risk_ratio -> static.risk_ratio
        if name == "multipliers":
            value = parse_multipliers(value)
        elif name == "detectors":
            pairs = []
            for item in value or ():
                suite, sep, det = item.partition("=")
                if not sep or not suite.strip() or not det.strip():
                    raise click.BadParameter(f"{item!r} is not SUITE=DETECTOR", param_hint="--detector")
                pairs.append((suite.strip(), det.strip()))
            value = tuple(pairs) or None
        elif name == "suites":
            value = tuple(str(p) for p in value) or None
        elif name == "triggers":
            value = tuple(value) or None
        elif name == "trigger_search_placements" and value is not None:
            value = tuple(w.strip() for w in value.split(","))
        out[name] = value
    return out


def resolve(params: dict, candidate: Path | None = None):
    """(ScanConfig, sources, config file) from a command's params (config file options popped)."""
    from auditkit.configfile import COMMAND_LINE
    from auditkit.configfile import resolve as resolve_config

    config_file, no_config = params.pop("config_file", None), params.pop("no_config", False)
    values = overrides(params)
    values["candidate"] = candidate
    config, sources, path = resolve_config(values, config_file=config_file, use_file=not no_config)
    if candidate is not None:
        sources["candidate"] = COMMAND_LINE
    return config, sources, path
