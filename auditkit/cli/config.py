"""``auditkit init`` (write a project config) and ``auditkit config`` (what is in effect, and from where)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from rich.table import Table

from auditkit.cli.common import escape, out
from auditkit.cli.options import resolve, scan_options
from auditkit.errors import BadInput
from auditkit.lab.bases import BASE_HELP


@click.command()
@click.option("--base", default=None, help=f"Base pipeline: {BASE_HELP}.")
@click.option("--safety", default=None, type=click.Path(path_type=Path),
              help="The safety module: a Safety LoRA (.safetensors) or the erased model.")
@click.option("--suite", "suites", multiple=True, type=click.Path(path_type=Path), help="Probe suite; repeatable.")
@click.option("--device", default=None, help="torch device.")
@click.option("--path", "target", type=click.Path(path_type=Path), default=Path("auditkit.toml"), show_default=True,
              help="Where to write the config file.")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init(base, safety, suites, device, target: Path, force: bool) -> None:
    """Write a commented auditkit.toml: from the options, or by asking when on a terminal.

    Paths are taken relative to the working directory and written relative to the file's folder, as the
    file's readers take them."""
    from auditkit.config import ScanConfig
    from auditkit.configfile import NO_SAFETY, render
    from auditkit.fsutil import atomic_write_text, check_writable
    from auditkit.models.base import resolve_base

    if target.name == "pyproject.toml":
        raise BadInput(target, "init writes a file of its own (auditkit.toml); to keep the settings in "
                               "pyproject.toml, put them under [tool.auditkit] by hand")
    if target.exists() and not force:
        raise BadInput(target, "exists already (use --force to overwrite)")
    check_writable(target)  # a folder, a read-only place: one line now
    if sys.stdin.isatty() and base is None and safety is None:
        base = click.prompt(f"base model ({BASE_HELP}; empty: none)", default="", show_default=False)
        safety = click.prompt("safety module (a Safety LoRA or the erased model; empty: none)", default="",
                              show_default=False)
    given = resolve_base(base, check_case=True) if base else None
    folder = given is not None and given.lab is None  # a folder, written relative to the file's folder
    safety = Path(safety) if safety and str(safety) != NO_SAFETY else None
    local = [("base", Path(base))] if folder else []
    local += [("safety", safety)] if safety else []
    local += [("suite", Path(s)) for s in suites]
    values = {"base": str(_from_folder(Path(base), target.parent)) if folder else given,
              "safety": _from_folder(safety, target.parent) if safety else None,
              "suites": tuple(str(_from_folder(Path(s), target.parent)) for s in suites), "device": device or None}
    try:
        config = ScanConfig(**values)
        text = render(config)
    except ValueError as exc:
        raise BadInput(target, str(exc)) from None
    for label, path in local:
        if not path.exists():
            out.print(f"[yellow]note:[/yellow] {label} {escape(str(path))} does not exist (yet)")
    atomic_write_text(target, text)
    out.print(f"config: [bold]{escape(str(target))}[/bold] (paths in it are relative to its folder)")


def _from_folder(path: Path, folder: Path) -> Path:
    """``path`` (relative to the working directory) as seen from ``folder``: the way a config file's
    relative paths are read. Absolute paths stay; folders are compared after resolving their links."""
    if path.is_absolute() or Path(os.path.abspath(folder)) == Path.cwd():
        return path
    here = Path(os.path.realpath(path.parent)) / path.name
    return Path(os.path.relpath(here, os.path.realpath(folder)))


@click.command("config")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@scan_options
def config_cmd(as_json: bool, **params) -> None:
    """Print the resolved scan configuration and where each value came from."""
    import json

    config, sources, path = resolve(params)
    values = config.to_dict()
    values.pop("candidate", None)
    if as_json:
        click.echo(json.dumps({"config_file": str(path) if path else None, "values": values,
                               "sources": sources}, indent=2))
        return
    table = Table("setting", "value", "from", title=f"auditkit config · {escape(str(path) if path else 'no file')}")
    for name, value in values.items():
        if isinstance(value, dict) and name in ("static", "dynamic"):
            for k, v in value.items():
                table.add_row(f"{name}.{k}", escape(repr(v)), escape(sources.get(f"{name}.{k}", "default")))
            continue
        table.add_row(name, escape(repr(value)), escape(sources.get(name, "default")))
    out.print(table)
    mode = {"full": "full scan (static, data-free, dynamic)", "static": "static and data-free checks (no images)",
            "amplification": "amplification against the base (no safety module)",
            "metadata": "metadata and format only (no safety module, no base)"}[config.mode]
    out.print(f"`auditkit scan FILE` here runs: [bold]{mode}[/bold]")



