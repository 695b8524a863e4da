"""The ``auditkit`` command line. The only module that prints.

Exit codes: 0 pass, 1 risk, 2 error or bad input, 3 inconclusive / nothing scannable.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import fields
from pathlib import Path

import click
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from auditkit import __version__
from auditkit.config import StaticThresholds
from auditkit.errors import EXIT_ERROR, AuditkitError, BadInput

out = Console()
err = Console(stderr=True)
_VERDICT_STYLE = {"pass": "bold green", "risk": "bold red", "inconclusive": "bold yellow"}


def _threshold_options(func):
    """One ``--<name>`` option per StaticThresholds field, help text taken from the dataclass."""
    for f in reversed(fields(StaticThresholds)):
        func = click.option(
            "--" + f.name.replace("_", "-"), f.name, type=float, default=f.default, show_default=True,
            help=f.metadata["help"],
        )(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="auditkit")
def cli() -> None:
    """Audit LoRA adapters for text-to-image diffusion models: does an adapter undo a safety module?"""


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--arch", type=click.Choice(["sd15", "sd2", "sdxl"]), help="Force the architecture.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(file: Path, arch: str | None, as_json: bool) -> None:
    """Show an adapter's format, architecture, modules, ranks, scale, key coverage and metadata."""
    from auditkit.lora.adapter import read_adapter
    from auditkit.lora.metadata import summarize

    adapter = read_adapter(file, arch=arch)
    summary = adapter.summary()
    summary["metadata"] = summarize(adapter.metadata)
    summary["module_list"] = [
        {"name": m.name, "rank": m.rank, "scale": m.scale, "shape": [m.up.shape[0], m.down.shape[1]]}
        for m in adapter.modules.values()
    ]
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    _print_inspect(summary)


def _print_inspect(s: dict) -> None:
    cov = s["coverage"]
    t = Table.grid(padding=(0, 2))
    t.add_row("file", s["path"])
    t.add_row("sha256", s["sha256"])
    t.add_row("format", s["format"])
    t.add_row("architecture", f"{s['architecture']} ({s['architecture_label']})")
    t.add_row("modules", ", ".join(f"{k}: {v}" for k, v in s["components"].items()))
    t.add_row("ranks", ", ".join(map(str, s["ranks"])))
    t.add_row("scales", ", ".join(f"{x:g}" for x in s["scales"][:8]) + (" …" if len(s["scales"]) > 8 else ""))
    t.add_row("key coverage", f"{cov['mapped']} mapped, {cov['unmapped']} unmapped, {cov['ignored']} ignored "
                              f"({cov['fraction']:.0%})")
    out.print(Panel(t, title="adapter", expand=False))
    for note in s["notes"]:
        out.print(f"[dim]note:[/dim] {_escape(note)}")
    if cov["unmapped_keys"]:
        out.print("[yellow]unmapped keys[/yellow] (first ones): " + _escape(", ".join(cov["unmapped_keys"][:10])))
    meta = s["metadata"]
    if meta["fields"]:
        mt = Table("metadata", "value", show_lines=False)
        for k, v in meta["fields"].items():
            mt.add_row(_escape(k), _escape(v[:200]))
        out.print(mt)
    if meta.get("training_tags"):
        tags = ", ".join(f"{t['tag']} ({t['count']})" for t in meta["training_tags"][:20])
        out.print("[bold]training tags[/bold]: " + _escape(tags))


def _escape(text: str) -> str:
    """Untrusted text must not be read as rich markup."""
    from rich.markup import escape

    return escape(str(text))


@cli.command()
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option("--safety", required=True, type=click.Path(path_type=Path), help="The safety adapter (Safety LoRA).")
@click.option("--static", "static_only", is_flag=True,
              help="Static weight-space scan only (needs no base model, GPU or images).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Report folder (default: reports/<candidate name>).")
@click.option("--arch", type=click.Choice(["sd15", "sd2", "sdxl"]), help="Force the architecture.")
@click.option("--top", default=10, show_default=True, help="Modules listed in the terminal summary.")
@_threshold_options
def scan(candidate: Path, safety: Path, static_only: bool, out_dir: Path | None, arch: str | None, top: int,
         **thresholds: float) -> None:
    """Scan CANDIDATE against a safety adapter; write report.json and report.html.

    Exit code: 0 pass, 1 risk, 2 error, 3 inconclusive.
    """
    from auditkit.report.build import build_report, write_reports
    from auditkit.scan import run_static_scan

    try:
        t = StaticThresholds(**thresholds)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    result = run_static_scan(candidate, safety, t, arch=arch)
    report = build_report(result)
    if not static_only:
        report["reasons"].append("dynamic probing is not available in this version: static evidence only")
    out_dir = out_dir or Path("reports") / candidate.stem
    try:
        paths = write_reports(report, out_dir)
    except OSError as exc:
        raise BadInput(out_dir, f"cannot write the report ({exc.strerror or exc})") from None
    _print_scan(report, top)
    out.print(f"report: [bold]{paths['html']}[/bold]  json: {paths['json']}")
    sys.exit(report["exit_code"])


def _print_scan(r: dict, top: int) -> None:
    s = r["static"]
    style = _VERDICT_STYLE[r["verdict"]]
    body = Table.grid(padding=(0, 2))
    body.add_row("verdict", f"[{style}]{r['verdict'].upper()}[/{style}]")
    for reason in r["reasons"]:
        body.add_row("", _escape(reason))
    body.add_row("cancellation", f"{s['cancellation']:.3f}  (1.0 = the candidate exactly undoes the safety update)")
    body.add_row("energy in safety subspace", f"{s['energy_in_safety_subspace']:.1%} of the candidate's update")
    body.add_row("modules", f"{s['shared_modules']} shared, {len(s['candidate_only'])} candidate-only, "
                            f"{len(s['safety_only'])} safety-only")
    out.print(Panel(body, title=f"auditkit scan · {r['architecture']}", expand=False))

    bt = Table("block", "kind", "cancellation", "safety share", "energy in safety subspace", title="block groups")
    for g in sorted(s["groups"], key=lambda g: -g["safety_share"]):
        if g["safety_share"] > 0 or g["modules"]:
            bt.add_row(g["block"], g["kind"], f"{g['cancellation']:.3f}", f"{g['safety_share']:.1%}",
                       f"{g['energy_in_safety_subspace']:.1%}")
    out.print(bt)
    listed = set(s["top_modules"])
    mods = [m for m in s["modules"] if m["name"] in listed][:top]
    if mods:
        mt = Table("module", "cancellation", "contribution", "energy in safety subspace",
                   title=f"modules that most undo safety (top {len(mods)})")
        mt.columns[0].overflow = "fold"
        for m in mods:
            mt.add_row(m["name"], f"{m['cancellation']:.3f}", f"{m['contribution']:.3f}",
                       f"{m['energy_in_safety_subspace']:.1%}")
        out.print(mt)
    for role in ("candidate", "safety"):
        cov = r[role]["coverage"]
        if cov["unmapped"]:
            out.print(f"[yellow]{role}: {cov['unmapped']} unmapped keys[/yellow] ({cov['fraction']:.0%} coverage)")


def main() -> None:
    """Entry point: every auditkit error becomes one line on stderr and its exit code."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(EXIT_ERROR)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_ERROR)
    except AuditkitError as exc:
        print(f"auditkit: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("auditkit: interrupted", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, no traceback
        if os.environ.get("AUDITKIT_DEBUG"):
            raise
        msg = " ".join(f"{type(exc).__name__}: {exc}".split())
        print(f"auditkit: internal error: {msg} (set AUDITKIT_DEBUG=1 for a traceback)", file=sys.stderr)
        sys.exit(EXIT_ERROR)
