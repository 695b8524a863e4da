"""The ``auditkit`` command line: parses, calls the library, prints. No scan logic lives here.

One module per command group: :mod:`~auditkit.cli.scan` (scan, report), :mod:`~auditkit.cli.batch`,
:mod:`~auditkit.cli.repair`,
:mod:`~auditkit.cli.extract`,
:mod:`~auditkit.cli.train` (align, finetune), :mod:`~auditkit.cli.catalog` (inspect, suites,
detectors), :mod:`~auditkit.cli.config` (init, config), :mod:`~auditkit.cli.lab`.
Exit codes: 0 pass, 1 risk, 2 error or bad input, 3 inconclusive / nothing scannable.
"""

from __future__ import annotations

import os
import sys

import click

from auditkit import __version__
from auditkit.cli import batch, catalog, config, extract, lab, repair, scan, train
from auditkit.cli.common import err
from auditkit.errors import EXIT_ERROR, AuditkitError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="auditkit")
def cli() -> None:
    """Audit LoRA adapters for text-to-image diffusion models: does an adapter undo a safety module?"""


for command in (catalog.inspect, scan.scan, batch.batch, scan.report_cmd, repair.repair, extract.extract, train.align,
                train.finetune, lab.lab, catalog.suites, catalog.detectors, config.init, config.config_cmd):
    cli.add_command(command)


def main() -> None:
    """Entry point: every auditkit error becomes one line on stderr and its exit code."""
    # Idle OpenMP threads sleep instead of spinning: on a busy CPU, spinning threads of a tiny
    # model's ops starved each other (a 0.1 s generation took 10.6 s). Set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module=r"peft\..*")  # auditkit reports coverage itself
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(EXIT_ERROR)
    except click.ClickException as exc:  # usage errors: one line too
        hint = f" (see `{exc.ctx.command_path} --help`)" if getattr(exc, "ctx", None) else ""
        print(f"auditkit: error: {' '.join(exc.format_message().split())}{hint}", file=sys.stderr)
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


