"""``auditkit batch``: parse, call :func:`auditkit.batch.run_batch`, show progress and a summary."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.table import Table

from auditkit.cli.common import VERDICT_STYLE, err, escape, out, print_paths
from auditkit.cli.options import resolve, scan_options

VERDICT_STYLE_BATCH = {**VERDICT_STYLE, "error": "bold magenta"}


def _batch_options(func):
    return scan_options(func, skip=("out",))


@click.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Batch folder: one report folder per adapter, results.parquet/.csv, index.html, the state.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where the scans run: this machine, or a Ray cluster (pip install 'auditkit[ray]').")
@click.option("--address", default=None, help="Ray: the cluster to join ('auto': the one this machine is in); "
                                               "default: start a local Ray.")
@click.option("--workers", type=int, default=None,
              help="Scan workers, each with its pipeline loaded (local default 1; ray default one per GPU, "
                   "else one per CPU).")
@click.option("--triage-workers", type=int, default=None, help="Processes for the triage (default: every CPU).")
@_batch_options
def batch(input_path: Path, out_dir: Path, engine: str, address: str | None, workers: int | None,
          triage_workers: int | None, **params) -> None:
    """Scan every adapter INPUT names: a folder (searched recursively), a list file (one path per line)
    or a .csv/.parquet manifest (column path; optional id, safety, base, triggers).

    Every file is triaged (hash, format, static cancellation, metadata) in parallel, then scanned, most
    suspicious first, with the base and base+safety images rendered once for all. Writes a report folder per
    adapter (as `auditkit scan`), results.parquet, results.csv and index.html. Resumable: run it again with
    the same --out. Exit 1 if any adapter is a risk, else 3 if any is inconclusive or an error, else 0.
    """
    from auditkit.batch import BatchConfig, run_batch
    from auditkit.errors import BadInput

    config, _, _ = resolve(params, None)
    try:
        batch_config = BatchConfig(input_path, out_dir, config, engine, address, workers, triage_workers)
    except ValueError as exc:
        raise BadInput(None, str(exc)) from None
    display = _Display()
    try:
        result = run_batch(batch_config, display.update)
    finally:
        display.stop()
    _summary(result, out_dir)
    sys.exit(result.exit_code)


class _Display:
    """A rich progress bar per stage, with rows per verdict and an ETA; drawn once work starts."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[verdicts]}"), TimeRemainingColumn(), console=err)
        self.tasks: dict[str, int] = {}

    def update(self, stage: str, done: int, total: int, verdicts: dict) -> None:
        if not self.bar.live.is_started:
            self.bar.start()
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=total, verdicts="")
        text = " ".join(f"[{VERDICT_STYLE_BATCH.get(v, '')}]{v} {n}[/]" for v, n in verdicts.items() if n)
        self.bar.update(self.tasks[stage], completed=done, total=total, verdicts=text)

    def stop(self) -> None:
        self.bar.stop()


def _summary(result, out_dir: Path) -> None:
    t = Table("verdict", "adapters", title=f"auditkit batch · {len(result.rows)} files · {result.scanned} scanned now")
    for verdict, n in result.counts.items():
        t.add_row(f"[{VERDICT_STYLE_BATCH.get(verdict, '')}]{verdict}[/]", str(n))
    out.print(t)
    errors = [r for r in result.rows if r.get("verdict") == "error" and not r.get("duplicate_of")]
    for r in errors[:10]:
        out.print(f"[magenta]error[/magenta] {escape(r['id'])}: {escape(r.get('error') or '')}")
    if len(errors) > 10:
        out.print(f"… and {len(errors) - 10} more errors (results.csv)")
    print_paths(index=result.paths["index"], table=result.paths["parquet"], csv=result.paths["csv"])
