"""``auditkit lab``: the shipped laboratory (a tiny world and model where fine-tuning jailbreaking
reproduces on a CPU)."""

from __future__ import annotations

from pathlib import Path

import click

from auditkit.cli.common import out


@click.group()
def lab() -> None:
    """The shipped laboratory: a tiny world and model where fine-tuning jailbreaking reproduces on CPU."""


@lab.command("make-data")
@click.option("--domain", default="neon", show_default=True, help="World domain (e.g. neon, the benign one).")
@click.option("--n", "count", default=400, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
def lab_make_data(domain, count, seed, out_dir):
    """Render an image-caption folder from the lab world (fine-tuning data)."""
    from auditkit.lab import world
    from auditkit.train.data import write_folder

    if domain not in world.DOMAINS:
        raise click.BadParameter(f"unknown domain {domain!r}; known: {', '.join(world.DOMAINS)}")
    specs = world.sample_specs(seed, count, domain=domain)
    write_folder(out_dir, world.render_many(specs), [world.caption(s) for s in specs])
    out.print(f"{count} images from domain '{domain}' in [bold]{out_dir}[/bold]")
