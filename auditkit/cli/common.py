"""What every command shares: the consoles (the CLI is the only code that prints), escaping of
untrusted text, progress bars and small option helpers."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from auditkit.errors import BadInput
from auditkit.lab.bases import BASE_HELP, DEFAULT_BASE

out = Console()
err = Console(stderr=True)
VERDICT_STYLE = {"pass": "bold green", "risk": "bold red", "inconclusive": "bold yellow", "clear": "green"}


def escape(text: str) -> str:
    """Untrusted text must not be read as rich markup."""
    from rich.markup import escape as _escape

    return _escape(str(text))


def print_paths(**paths) -> None:
    """One line "name: path  name: path" (the first bold), escaped, and never broken at the terminal's width, so a
    path is copied whole."""
    parts = [f"{name}: " + (f"[bold]{escape(str(p))}[/bold]" if i == 0 else escape(str(p)))
             for i, (name, p) in enumerate(paths.items())]
    out.print("  ".join(parts), soft_wrap=True)


def progress_bar(label: str, loss: bool = True):
    """A rich progress bar driven by (step, total, loss) callbacks."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn(label), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn("loss {task.fields[loss]}")] if loss else []
    bar = Progress(*columns, TimeRemainingColumn(), console=err, transient=False)
    task = bar.add_task(label, total=None, loss="–")

    def update(step: int, total: int, loss: float = 0.0) -> None:
        bar.update(task, completed=step, total=total, loss=f"{loss:.4f}")

    return bar, update


def parse_multipliers(text: str | None) -> tuple[float, ...] | None:
    """"0.5,1,1.5" -> (0.5, 1.0, 1.5); None stays None. Range checks are ScanConfig's."""
    if text is None:
        return None
    try:
        values = tuple(float(m) for m in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers",
                                 param_hint="--multipliers") from None
    return values


def check_output(out_file: Path, *inputs: Path | None) -> None:
    if out_file.suffix != ".safetensors":
        raise BadInput(out_file, "output must be a .safetensors file")
    for inp in inputs:
        if inp is not None and inp.exists() and out_file.exists() and out_file.resolve() == inp.resolve():
            raise BadInput(out_file, "output would overwrite an input; choose another path")


def resolve_base_option(ctx, param, value):
    """``--base`` as a :class:`auditkit.models.base.Base` (resolved once, here, for the command)."""
    from auditkit.models.base import resolve_base

    return resolve_base(value) if value is not None else None


def base_option(func):
    return click.option("--base", default=DEFAULT_BASE, show_default=True, callback=resolve_base_option,
                        help=f"Base pipeline: {BASE_HELP}.")(func)


def _check_device(ctx, param, value):
    from auditkit.config import _valid_device

    if value is not None and not _valid_device(value):
        raise click.BadParameter(f"{value!r} is not a torch device (cpu, cuda, cuda:N, mps)")
    return value


def device_option(func):
    return click.option("--device", default=None, callback=_check_device,
                        help="torch device (default: cuda if available, else cpu). On a GPU the frozen model is "
                             "bf16 and a LoRA trains in float32; full-weight training is float32.")(func)


def torch_threads(threads: int | None) -> None:
    if threads is not None and not 1 <= threads <= 1024:
        raise click.BadParameter(f"{threads} is not a thread count in [1, 1024]", param_hint="--threads")
    if threads:
        import torch

        torch.set_num_threads(threads)


def read_prompts(path: Path | None) -> list[str]:
    if path is None:
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        raise BadInput(path, "cannot read the prompt file as UTF-8 text") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise BadInput(path, "prompt file has no prompts")
    return prompts
