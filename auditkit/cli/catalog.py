"""Looking at inputs without scanning: ``auditkit inspect`` (an adapter file), ``auditkit suites``
(probe suites) and ``auditkit detectors``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.panel import Panel
from rich.table import Table

from auditkit.cli.common import escape, out
from auditkit.errors import EXIT_INCONCLUSIVE
from auditkit.models.architectures import BUILTIN as BUILTIN_ARCHS


@click.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--arch", type=click.Choice(list(BUILTIN_ARCHS)), help="Force the architecture.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(file: Path, arch: str | None, as_json: bool) -> None:
    """Show an adapter's format, architecture, modules, ranks, scale, key coverage and metadata.

    Exits 3 (inconclusive) when too few of the file's keys map to any known architecture to name the one it
    adapts: the architecture shown is then only the best partial fit."""
    from auditkit.lora.adapter import read_adapter
    from auditkit.lora.metadata import summarize

    adapter = read_adapter(file, arch=arch)
    summary = adapter.summary()
    summary["metadata"] = summarize(adapter.metadata)
    summary["module_list"] = [
        {"name": m.name, "algorithm": m.algorithm, "form": m.form, "rank": m.rank, "scale": m.scale,
         "shape": [m.up.shape[0], m.down.shape[1]], "dora": m.magnitude is not None, "bias": m.bias is not None}
        for m in adapter.modules.values()
    ]
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_inspect(summary)
    if summary["architecture_certainty"] == "partial":  # fail closed: a partial read names no model for sure
        sys.exit(EXIT_INCONCLUSIVE)


# how the architecture line reads per Adapter.architecture_certainty ({0}: the candidates, {1}: the coverage)
_CERTAINTY = {"certain": "", "given": " [given]", "ambiguous": " [ambiguous: fits {0} alike]",
              "partial": " [uncertain: only {1} of the keys map to it]"}


def _print_inspect(s: dict) -> None:
    cov = s["coverage"]
    t = Table.grid(padding=(0, 2))
    t.add_row("file", s["path"])
    t.add_row("sha256", s["sha256"])
    t.add_row("format", s["format"])
    certainty = _CERTAINTY[s["architecture_certainty"]].format(", ".join(s["architecture_candidates"]),
                                                                f"{cov['fraction']:.0%}")
    t.add_row("architecture", escape(f"{s['architecture']} ({s['architecture_label']}){certainty}"))
    t.add_row("modules", ", ".join(f"{k}: {v}" for k, v in s["components"].items()))
    t.add_row("algorithms", ", ".join(f"{k}: {v}" for k, v in s["algorithms"].items())
              + (f" ({s['dora_modules']} DoRA)" if s["dora_modules"] else ""))
    t.add_row("held as", ", ".join(f"{k}: {v}" for k, v in s["forms"].items()))
    t.add_row("ranks", ", ".join(map(str, s["ranks"])))
    t.add_row("scales", ", ".join(f"{x:g}" for x in s["scales"][:8]) + (" …" if len(s["scales"]) > 8 else ""))
    t.add_row("key coverage", f"{cov['mapped']} mapped, {cov['unmapped']} unmapped, {cov['ignored']} ignored "
                              f"({cov['fraction']:.0%})")
    out.print(Panel(t, title="adapter", expand=False))
    for note in s["notes"]:
        out.print(f"[dim]note:[/dim] {escape(note)}")
    if cov["unmapped_keys"]:
        out.print("[yellow]unmapped keys[/yellow] (first ones): " + escape(", ".join(cov["unmapped_keys"][:10])))
    meta = s["metadata"]
    if meta["fields"]:
        mt = Table("metadata", "value", show_lines=False)
        for k, v in meta["fields"].items():
            mt.add_row(escape(k), escape(v[:200]))
        out.print(mt)
    if meta.get("training_tags"):
        tags = ", ".join(f"{t['tag']} ({t['count']})" for t in meta["training_tags"][:20])
        out.print("[bold]training tags[/bold]: " + escape(tags))


@click.group()
def suites() -> None:
    """Probe suites: versioned prompt sets (YAML) and prompt CSVs such as I2P's."""


@suites.command("ls")
@click.option("--dir", "folder", type=click.Path(path_type=Path), default=None,
              help="A folder of suites (default: the shipped probes/).")
def suites_ls(folder: Path | None) -> None:
    """List the suites with their concept, detector, role and prompt counts."""
    from auditkit.suites import list_suites

    table = Table("suite", "version", "role", "concept / neutral", "detector", "prompts", "categories")
    for s in list_suites(folder):
        cats = ", ".join(f"{k or '–'}: {v}" for k, v in sorted(s.categories.items()))
        table.add_row(s.name, str(s.version), s.role, f"{s.concept_word} / {s.neutral_word}", s.detector,
                      str(len(s.prompts)), escape(cats))
    out.print(table)


@suites.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
def suites_validate(files: tuple[Path, ...]) -> None:
    """Validate suite files (.yaml) or prompt CSVs; exit 2 at the first invalid one."""
    from auditkit.suites import load_suites

    for s in load_suites(files):
        out.print(f"ok  {escape(s.path)}: suite '{escape(s.name)}' v{s.version}, {len(s.prompts)} prompts")


@click.group()
def detectors() -> None:
    """Image detectors (NudeNet, CLIP zero-shot, the lab detector)."""


@detectors.command("ls")
def detectors_ls() -> None:
    """List the registered detectors and whether their packages are installed."""
    from auditkit.detectors import REGISTRY, available

    table = Table("detector", "installed", "what it scores")
    for name, entry in sorted(REGISTRY.items()):
        table.add_row(name, "yes" if available(name) else "no", entry.description)
    out.print(table)
