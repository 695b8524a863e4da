"""``auditkit extract``: a full model's update (its difference to the base) written as a LoRA file."""

from __future__ import annotations

from pathlib import Path

import click

from auditkit.cli.common import escape, out, resolve_base_option
from auditkit.lab.bases import BASE_HELP


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--base", required=True, callback=resolve_base_option,
              help=f"The model it is compared with: {BASE_HELP}.")
@click.option("--out", "out_file", required=True, type=click.Path(path_type=Path),
              help="The LoRA to write (.safetensors).")
@click.option("--energy", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Share of each module's difference energy to keep (default 0.99; 1 = every direction, exact).")
@click.option("--rank", type=click.IntRange(min=1), default=None, help="Keep this rank per module instead of --energy.")
def extract(model: Path, base, out_file: Path, energy: float | None, rank: int | None) -> None:
    """Write MODEL's update, its difference to --base, as a kohya LoRA (truncated SVD per module).

    MODEL is a full model: an erased checkpoint (ESD, UCE, MACE, ...) or a full fine-tune, as a diffusers
    pipeline folder, a component folder (unet/, text_encoder/) or a single .safetensors file (diffusers
    or original LDM names). The LoRA's metadata records how it was made.
    """
    from auditkit.extract import extract as run_extract

    if energy is not None and rank is not None:
        raise click.UsageError("--energy and --rank are alternatives: give one")
    result = run_extract(model, base, out_file, energy=energy, rank=rank)
    kept = f"rank {rank}" if rank is not None else f"energy {energy if energy is not None else 0.99:g}"
    out.print(f"{result.modules} modules written ({kept}; ranks {min(result.ranks)}-{max(result.ranks)}; least energy "
              f"kept {result.min_energy_kept:.2%}); {result.unchanged} modules unchanged")
    if result.not_written:
        out.print(escape(f"not in the LoRA (a LoRA holds linear/conv weights only): {len(result.not_written)} changed "
                         f"tensors, e.g. {result.not_written[0]}"))
    out.print(f"LoRA: [bold]{escape(str(result.path))}[/bold]")
