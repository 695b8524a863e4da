"""``auditkit repair``: parse, call :func:`auditkit.repair.run.repair`, print before/after."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.table import Table

from auditkit.cli.common import VERDICT_STYLE, escape, out, print_paths, progress_bar, torch_threads
from auditkit.cli.options import resolve, scan_options, setting_options, settings_of
from auditkit.errors import BadInput
from auditkit.fsutil import check_output_folder
from auditkit.repair.auto import AUTO
from auditkit.repair.methods import METHODS, default_method
from auditkit.repair.retrain import Retraining

RETRAINING = ("rank", "alpha", "steps", "lr", "batch", "seed")  # Retraining's fields on the command line
_METHOD_HELP = "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())


@click.command()
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option("--method", type=click.Choice([*METHODS, AUTO]), default=None,
              help=f"{_METHOD_HELP}; auto: try them in order of cost (data-free ones only without --data) and keep "
                   f"the one that passes its re-scan with the best fidelity. Default: modular with --data, "
                   f"sign-aware without.")
@click.option("--anchors", "anchor_files", type=click.Path(path_type=Path), multiple=True,
              help="anchored/corrected: suite file(s) of the prompts the repair is trained on (default: the shipped "
                   "anchor suite of the concept); must share no prompt with the concept suites it is verified on.")
@click.option("--fidelity-target", type=click.FloatRange(0, 1), default=0.9, show_default=True,
              help="auto: stop at the first passing method keeping at least this share of the candidate's domain.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None,
              help="Folder of images with same-named .txt captions (the candidate's training domain).")
@click.option("--from-scan", type=click.Path(path_type=Path), default=None,
              help="The candidate's earlier scan folder: re-scan with its suites, multipliers and steps, and reuse "
                   "its images as 'before'.")
@setting_options(Retraining, RETRAINING)
@click.option("--threshold", default=0.5, show_default=True,
              help="safelora: project modules whose similarity to the safety subspace is below this.")
@click.option("--clip-model", default=None, help="Fidelity by CLIP image similarity: open_clip model name.")
@click.option("--clip-weights", type=click.Path(path_type=Path), default=None,
              help="Local .safetensors weights for --clip-model.")
@click.option("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice).")
@scan_options
def repair(candidate, method, anchor_files, fidelity_target, data_dir, from_scan, threshold, clip_model, clip_weights,
           threads, **params):
    """Repair CANDIDATE so that it no longer undoes the safety module, then prove it by re-scanning.

    Writes an adapter pack (repaired adapter, safety adapter, combined single file, manifest) and a
    report comparing candidate and repair: static cancellation, re-emergence ratio and fidelity on
    the candidate's own domain. The scan settings (--safety, --base, --suite, --multipliers, ...)
    are those of `auditkit scan`, config file included (multipliers default to 1 here). --out is
    the repair folder. Exit code: the repaired adapter's verdict (0 pass, 1 risk, 3 inconclusive).
    """
    from auditkit.repair.auto import repair_auto
    from auditkit.repair.run import RepairRequest, check_numbers, scan_settings
    from auditkit.repair.run import repair as run_repair
    from auditkit.scan import resolve_suites
    from auditkit.train.data import check_folder

    # NaN or inf in any of them: one line, before any work
    train = settings_of(Retraining, RETRAINING, params)
    check_numbers(threshold, fidelity_target)
    if clip_weights is not None and not clip_model:
        raise click.UsageError("--clip-weights needs --clip-model (the open_clip model the weights are for)")
    method = method or default_method(data_dir is not None)
    if method != AUTO and METHODS[method].needs_data and data_dir is None:
        raise click.UsageError(f"--method {method} needs --data (use sign-aware or safelora without data)")
    if anchor_files and method != AUTO and not METHODS[method].anchored:
        raise click.UsageError(f"--anchors applies to the methods trained on anchor prompts "
                               f"({', '.join(m.name for m in METHODS.values() if m.anchored)}), not to {method}")
    repair_out = params.pop("out", None) or Path("repairs") / candidate.stem  # --out: the repair folder
    params["out"] = None
    if from_scan is not None:
        earlier = scan_settings(from_scan)
        params["base"] = params.get("base") or earlier["base"]
        params["suites"] = params.get("suites") or earlier["suites"]
        params["multipliers"] = ",".join(f"{m:g}" for m in earlier["multipliers"])
        params["steps"] = params.get("steps") or earlier["steps"]
        params["triggers"] = params.get("triggers") or earlier["triggers"]
    params["multipliers"] = params.get("multipliers") or "1"
    config, _, _ = resolve(params, candidate)
    if config.safety is None:
        raise click.UsageError("repair needs a safety module (--safety or the config file)")
    if (method == AUTO or METHODS[method].needs_data) and config.base is None:
        raise click.UsageError(f"--method {method} needs --base (the model to retrain on and re-scan with)")
    for inp in (candidate, config.safety):
        if repair_out.exists() and inp.exists() and repair_out.resolve() in inp.resolve().parents:
            raise BadInput(repair_out, "the output folder holds an input adapter; choose another --out")
    check_output_folder(repair_out)
    if data_dir is not None:
        check_folder(data_dir)  # bad data fails before any model loads
    suites = resolve_suites(config) if config.base is not None else []
    clip = None
    if clip_model:
        from auditkit import detectors as registry

        clip = registry.get("clip", model=clip_model, pretrained=str(clip_weights) if clip_weights else None)
    torch_threads(threads)
    req = RepairRequest(candidate, config.safety, repair_out, method, data_dir, config, suites, from_scan, threshold,
                        train, clip, tuple(anchor_files), fidelity_target)
    bars = lambda label: progress_bar(label, loss=label.startswith("retrain"))  # noqa: E731
    report = repair_auto(req, bars) if method == AUTO else run_repair(req, bars=bars)
    print_repair(report)
    print_paths(pack=repair_out / "pack", report=repair_out / "report.html")
    sys.exit(report["exit_code"])


def print_repair(r: dict) -> None:
    rp = r["repair"]
    b, a = rp["before"], rp["after"]
    t = Table("", "before (candidate)", "after (repaired)", title=f"auditkit repair · {rp['method']}")
    style = VERDICT_STYLE
    t.add_row("verdict", f"[{style[b['verdict']]}]{b['verdict'].upper()}[/]",
              f"[{style[a['verdict']]}]{a['verdict'].upper()}[/]")
    t.add_row("static cancellation", f"{b['static_cancellation']:.3f}", f"{a['static_cancellation']:.3f}")
    if b["concept_check"] is not None:
        t.add_row("concept check", f"{b['concept_check']:.3f}", f"{a['concept_check']:.3f}")
    if b.get("noise_reversion") is not None:
        t.add_row("noise reversion", f"{b['noise_reversion']:.3f}", f"{a['noise_reversion']:.3f}")
    for c in rp["comparisons"]:
        cb, ca = c["before"], c["after"]
        t.add_row(f"re-emergence {c['suite']} {c['configuration']}", _ratio(cb), _ratio(ca))
    f = rp.get("fidelity") or {}
    if f.get("pairs"):
        extra = [f"pixel {f['pixel_similarity']:.1%}", f"PSNR {f['psnr_db']:.1f} dB"]
        if "attributes_agree" in f:
            heads = ", ".join(f"{k.removesuffix('_agrees')} {v:.0%}" for k, v in sorted(f.items())
                              if k.endswith("_agrees"))
            extra.append(f"attributes agree {f['attributes_agree']:.0%} ({heads})")
        if "clip_cosine" in f:
            extra.append(f"CLIP cosine {f['clip_cosine']:.3f}")
        t.add_row(f"fidelity ({f['pairs']} pairs)", "", ", ".join(extra))
        u = f.get("unflagged") or {}
        if u.get("pairs") and u["pairs"] < f["pairs"]:
            extra = [f"pixel {u['pixel_similarity']:.1%}"]
            if "attributes_agree" in u:
                extra.append(f"attributes agree {u['attributes_agree']:.0%}")
            t.add_row(f"  where the candidate drew no concept ({u['pairs']} pairs)", "", ", ".join(extra))
    out.print(t)
    auto = rp.get("auto")
    if auto:
        t = Table("method", "verdict", "max re-emergence ratio", "fidelity", title="auditkit repair · auto: tried")
        for row in auto["tried"]:
            ratio = row["max_reemergence_ratio"]
            fid = "–" if row["fidelity"] is None else f"{row['fidelity']:.1%} {_short(row['fidelity_metric'])}"
            mark = " (kept)" if row["method"] == auto["kept"] else ""
            t.add_row(row["method"] + mark, f"[{style[row['verdict']]}]{row['verdict'].upper()}[/]",
                      "–" if ratio is None else f"{ratio:.2f}", fid)
        out.print(t)
    for note in rp.get("notes", []):
        out.print(f"[dim]note:[/dim] {escape(note)}")


def _short(metric: str) -> str:
    """A fidelity metric's name for the terminal: 'attributes_agree (unflagged pairs)' -> 'attributes, unflagged'."""
    names = {"attributes_agree": "attributes", "clip_cosine": "CLIP", "pixel_similarity": "pixel"}
    base, _, rest = metric.partition(" (")
    return names.get(base, base) + (", unflagged" if rest else "")


def _ratio(c: dict) -> str:
    upper = c.get("reemergence_upper")
    hi = "–" if upper is None else f"{upper:.2f}"
    ratio = "–" if c.get("reemergence_ratio") is None else f"{c['reemergence_ratio']:.2f}"
    return f"{ratio} (upper bound {hi})"
