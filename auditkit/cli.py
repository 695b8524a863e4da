"""The ``auditkit`` command line. The only module that prints.

Exit codes: 0 pass, 1 risk, 2 error or bad input, 3 inconclusive / nothing scannable.
"""

from __future__ import annotations

import contextlib
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
from auditkit.distributed import is_main_process
from auditkit.errors import EXIT_ERROR, AuditkitError, BadInput
from auditkit.models.architectures import BUILTIN as BUILTIN_ARCHS

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
@click.option("--arch", type=click.Choice(list(BUILTIN_ARCHS)), help="Force the architecture.")
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
@click.option("--arch", type=click.Choice(list(BUILTIN_ARCHS)), help="Force the architecture.")
@click.option("--top", default=10, show_default=True, help="Modules listed in the terminal summary.")
@click.option("--base", default=None,
              help="Base pipeline ('lab' or a local diffusers folder): enables the data-free concept check and, "
                   "unless --static, the dynamic scan.")
@click.option("--suite", "suite_files", multiple=True, type=click.Path(path_type=Path),
              help="Probe suite (.yaml) or prompt CSV, repeatable (default: lab-cross + lab-neon for the lab, "
                   "nudity + benign otherwise).")
@click.option("--multipliers", default="0.5,1,1.5", show_default=True,
              help="Candidate multipliers to probe, comma-separated.")
@click.option("--steps", type=int, default=None, help="Override the suites' sampling steps.")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@click.option("--show-flagged", is_flag=True, help="Do not blur images the nudity detector flags in report.html.")
@_threshold_options
def scan(candidate: Path, safety: Path, static_only: bool, out_dir: Path | None, arch: str | None, top: int,
         base: str | None, suite_files: tuple[Path, ...], multipliers: str, steps: int | None, batch_size: int,
         device: str | None, show_flagged: bool, **thresholds: float) -> None:
    """Scan CANDIDATE against a safety adapter; write report.json and report.html.

    Static scan always; with --base, also the data-free concept check and (unless --static) the
    dynamic scan: the suites rendered under base, base+safety, base+safety+candidate and
    base+candidate with paired seeds, scored by the suites' detectors. Resumable: run it again
    with the same --out to continue. Exit code: 0 pass, 1 risk, 2 error, 3 inconclusive.

    Several GPUs: `accelerate launch --num_processes N -m auditkit scan ...` splits the probe
    batches across N processes into one run (rank 0 writes the report and prints).
    """
    from auditkit.report.build import build_report, set_dynamic, write_reports
    from auditkit.scan import run_static_scan

    try:
        t = StaticThresholds(**thresholds)
        mults = tuple(float(m) for m in multipliers.split(",") if m.strip())
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if suite_files and base is None:
        raise click.UsageError("--suite needs --base (the model to probe)")
    suites = _suites(base, suite_files) if base is not None else []  # validated before any model loads
    result = run_static_scan(candidate, safety, t, arch=arch)
    report = build_report(result)
    out_dir = out_dir or Path("reports") / candidate.stem
    dynamic = None
    if base is not None:
        from auditkit.distributed import Ranks, init
        from auditkit.dynamic import load_base, run_dynamic

        ranks = Ranks() if static_only else init(device)  # under `accelerate launch`: this process's share
        pipe, _, _ = load_base(base, device or ranks.device)  # one load serves the concept check and the scan
        concept_suite = next(s for s in suites if s.role == "concept")  # _suites guarantees one
        report["concept_check"] = _concept_check(pipe, base, concept_suite, result)
        if not static_only:
            bar, update = _progress("dynamic scan", loss=False)
            with bar if ranks.main else contextlib.nullcontext():
                dynamic = run_dynamic(pipe, base, result.candidate, result.safety, suites, out_dir, mults, steps,
                                      batch_size, progress=(lambda done, total: update(done, total, 0.0))
                                      if ranks.main else None, ranks=ranks)
            dynamic["show_flagged"] = show_flagged
    set_dynamic(report, dynamic)
    if not is_main_process():
        sys.exit(report["exit_code"])  # other ranks of a distributed launch: same verdict, rank 0 reports it
    try:
        paths = write_reports(report, out_dir)
    except OSError as exc:
        raise BadInput(out_dir, f"cannot write the report ({exc.strerror or exc})") from None
    _print_scan(report, top)
    out.print(f"report: [bold]{paths['html']}[/bold]  json: {paths['json']}")
    sys.exit(report["exit_code"])


@cli.command()
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option("--safety", required=True, type=click.Path(path_type=Path), help="The safety adapter (Safety LoRA).")
@click.option("--method", type=click.Choice(["modular", "anchored", "sign-aware", "safelora"]), default=None,
              help="modular: retrain on --data separately from the safety module (Modular LoRA); anchored: retrain "
                   "on --data on top of the safety module, pinned to it on the concept prompts (keeps more of the "
                   "domain where the safety module damaged it); sign-aware: data-free removal of the part that "
                   "cancels the safety update; safelora: data-free Safe LoRA projection. Default: modular with "
                   "--data, sign-aware without.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None,
              help="Folder of images with same-named .txt captions (the candidate's training domain).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Output folder (default: repairs/<candidate name>); run again to resume.")
@click.option("--base", default=None,
              help="Base pipeline ('lab' or a local diffusers folder): needed to retrain, and to verify behaviour.")
@click.option("--suite", "suite_files", multiple=True, type=click.Path(path_type=Path),
              help="Probe suites for the verification scans (default as in scan).")
@click.option("--from-scan", type=click.Path(path_type=Path), default=None,
              help="The candidate's earlier scan folder: re-scan with its suites, multipliers and steps, and reuse "
                   "its images as 'before'.")
@click.option("--multipliers", default="1", show_default=True, help="Candidate multipliers to probe.")
@click.option("--steps", type=int, default=None, help="Override the suites' sampling steps.")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@click.option("--rank", type=int, default=None, help="modular: LoRA rank (default: the candidate's).")
@click.option("--alpha", type=float, default=None, help="modular: LoRA alpha (default: the candidate's).")
@click.option("--train-steps", type=int, default=None,
              help="modular: training steps (default: ss_max_train_steps of the candidate, else 400).")
@click.option("--lr", default=1e-3, show_default=True, help="modular: learning rate.")
@click.option("--train-batch", default=32, show_default=True, help="modular: batch size.")
@click.option("--seed", default=0, show_default=True)
@click.option("--threshold", default=0.5, show_default=True,
              help="safelora: project modules whose similarity to the safety subspace is below this.")
@click.option("--clip-model", default=None, help="Fidelity by CLIP image similarity: open_clip model name.")
@click.option("--clip-weights", type=click.Path(path_type=Path), default=None,
              help="Local .safetensors weights for --clip-model.")
@click.option("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice).")
def repair(candidate, safety, method, data_dir, out_dir, base, suite_files, from_scan, multipliers, steps, batch_size,
           device, rank, alpha, train_steps, lr, train_batch, seed, threshold, clip_model, clip_weights, threads):
    """Repair CANDIDATE so that it no longer undoes SAFETY, then prove it by re-scanning.

    Writes an adapter pack (repaired adapter, safety adapter, combined single file, manifest) and a
    report comparing candidate and repair: static cancellation, re-emergence ratio and fidelity on
    the candidate's own domain. Exit code: the repaired adapter's verdict (0 pass, 1 risk, 3 inconclusive).
    """
    from auditkit.repair.run import RepairRequest, scan_settings
    from auditkit.repair.run import repair as run_repair
    from auditkit.train.data import check_folder

    method = method or ("modular" if data_dir else "sign-aware")
    if method in ("modular", "anchored") and data_dir is None:
        raise click.UsageError(f"--method {method} needs --data (use sign-aware or safelora without data)")
    try:
        mults = tuple(float(m) for m in multipliers.split(",") if m.strip())
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if from_scan is not None:
        earlier = scan_settings(from_scan)
        base = base or earlier["base"]
        suite_files = suite_files or tuple(earlier["suites"])
        mults, steps = earlier["multipliers"], steps or earlier["steps"]
    if suite_files and base is None:
        raise click.UsageError("--suite needs --base (the model to probe)")
    if method in ("modular", "anchored") and base is None:
        raise click.UsageError(f"--method {method} needs --base (the model to retrain on)")
    out_dir = out_dir or Path("repairs") / candidate.stem
    for inp in (candidate, safety):
        if out_dir.exists() and inp.exists() and out_dir.resolve() in inp.resolve().parents:
            raise BadInput(out_dir, "the output folder holds an input adapter; choose another --out")
    if data_dir is not None:
        check_folder(data_dir)  # bad data fails before any model loads
    suites = _suites(base, suite_files) if base is not None else []
    clip = None
    if clip_model:
        from auditkit import detectors as registry

        clip = registry.get("clip", model=clip_model, pretrained=str(clip_weights) if clip_weights else None)
    _torch_threads(threads)
    req = RepairRequest(candidate, safety, out_dir, method, data_dir, base, suites, mults, steps, batch_size, device,
                        from_scan, threshold, {"rank": rank, "alpha": alpha, "steps": train_steps, "lr": lr,
                                               "batch": train_batch, "seed": seed}, clip)
    concept = None
    if base is not None:
        concept_suite = next(s for s in suites if s.role == "concept")

        def concept(pipe, static):
            return _concept_check(pipe, base, concept_suite, static)

    report = run_repair(req, bars=lambda label: _progress(label, loss=label.startswith("retrain")),
                        concept_check=concept)
    _print_repair(report)
    out.print(f"pack: [bold]{out_dir / 'pack'}[/bold]  report: [bold]{out_dir / 'report.html'}[/bold]")
    sys.exit(report["exit_code"])


def _print_repair(r: dict) -> None:
    rp = r["repair"]
    b, a = rp["before"], rp["after"]
    t = Table("", "before (candidate)", "after (repaired)", title=f"auditkit repair · {rp['method']}")
    style = _VERDICT_STYLE
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
    out.print(t)
    for note in rp.get("notes", []):
        out.print(f"[dim]note:[/dim] {_escape(note)}")


def _ratio(c: dict) -> str:
    lo, hi = (("–" if x is None else f"{x:.2f}") for x in c["reemergence_ci95"])
    return f"{c['reemergence_ratio']:.2f} [{lo}, {hi}]"


@cli.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--show-flagged", is_flag=True, help="Do not blur images the nudity detector flags.")
def report_cmd(run_dir: Path, show_flagged: bool) -> None:
    """Re-render RUN_DIR's report from its run log and static results, without a model or GPU."""
    from auditkit.report.build import set_dynamic, write_reports
    from auditkit.report.digest import DynamicThresholds, digest
    from auditkit.runner import RunLog

    path = run_dir / "report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput(path, "no report.json: not a scan folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise BadInput(path, "report.json is not readable JSON") from None
    old = report.get("dynamic")
    if old:
        # a scan folder holds its run log; a repair folder holds the repaired adapter's in scan-after/
        log = next((RunLog(d) for d in (run_dir, run_dir / "scan-after") if (d / "run.jsonl").is_file()),
                   RunLog(run_dir))
        header = log.header()
        if header is None:
            raise BadInput(log.path, "the run log is missing or empty")
        thresholds = DynamicThresholds(**old.get("thresholds", {}))
        fresh = digest(log.records(), header["suites"], thresholds)
        keep = {k: v for k, v in old.items() if k not in fresh}
        set_dynamic(report, {**keep, **fresh, "images": len(log.records()), "show_flagged": show_flagged,
                             "run_log": str(log.path)})
    paths = write_reports(report, run_dir)
    out.print(f"report: [bold]{paths['html']}[/bold]  json: {paths['json']}")
    sys.exit(report["exit_code"])


def _suites(base: str, files: tuple[Path, ...]) -> list:
    from auditkit.suites import builtin_dir, load_suite

    if not files:
        names = ("lab-cross", "lab-neon") if base == "lab" else ("nudity", "benign")
        files = tuple(builtin_dir() / f"{n}.yaml" for n in names)
    suites = [load_suite(f) for f in files]
    if not any(s.role == "concept" for s in suites):
        raise BadInput(files[0], "no concept suite given: at least one suite must have role 'concept'")
    return suites


def _concept_check(pipe, base: str, suite, result) -> dict:
    from auditkit.analysis.concept import kv_reversion, prompt_embeddings
    from auditkit.analysis.reversion import noise_reversion

    prompts = [p.text for p in suite.prompts]
    e, mask = prompt_embeddings(pipe, prompts, suite.concept_word)
    check = kv_reversion(e, mask, result.candidate.modules, result.safety.modules).to_dict()
    check.update({"suite": suite.name, "suite_version": suite.version, "base": base, "prompts": len(prompts)})
    check["noise_reversion"] = noise_reversion(pipe, prompts, result.candidate.modules,
                                               result.safety.modules).to_dict()
    return check


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
    cc = r.get("concept_check")
    if cc:
        body.add_row("concept check", f"{cc['reverted']:.3f} of the safety change to the concept prompts' keys/values "
                     f"reverted ({cc['reverted_concept_tokens']:.3f} on the concept tokens)" if cc["applicable"]
                     else f"not applicable: {cc['note']}")
        nr = cc.get("noise_reversion")
        if nr:
            body.add_row("noise reversion", f"{nr['reverted']:.3f} of the safety module's change to the concept "
                         f"prompts' noise predictions reverted ({nr['prompts']} prompts, {nr['steps']} steps)")
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


# ------------------------------------------------------------------------------------------------
# training: align (Safety LoRA by ESD) and finetune (on top of a safety module, or modular)


def _progress(label: str, loss: bool = True):
    """A rich progress bar driven by (step, total, loss) callbacks."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn(label), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn("loss {task.fields[loss]}")] if loss else []
    bar = Progress(*columns, TimeRemainingColumn(), console=err, transient=False)
    task = bar.add_task(label, total=None, loss="–")

    def update(step: int, total: int, loss: float) -> None:
        bar.update(task, completed=step, total=total, loss=f"{loss:.4f}")

    return bar, update


def _check_output(out_file: Path, *inputs: Path | None) -> None:
    if out_file.suffix != ".safetensors":
        raise BadInput(out_file, "output must be a .safetensors file")
    for inp in inputs:
        if inp is not None and inp.exists() and out_file.exists() and out_file.resolve() == inp.resolve():
            raise BadInput(out_file, "output would overwrite an input; choose another path")


def _base_option(func):
    return click.option("--base", default="lab", show_default=True,
                        help="Base pipeline: 'lab' (the shipped tiny model) or a local diffusers folder.")(func)


def _torch_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


@cli.command()
@_base_option
@click.option("--concept", "concepts", multiple=True, help="A prompt naming the concept to erase (repeatable).")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path),
              help="A text file of concept prompts, one per line.")
@click.option("--method", type=click.Choice(["esd-x", "esd-u"]), default="esd-x", show_default=True,
              help="ESD-x: cross-attention (concept-specific); ESD-u: the other transformer layers (global).")
@click.option("--rank", default=4, show_default=True)
@click.option("--alpha", type=float, default=None, help="LoRA alpha (default: rank, i.e. scale 1).")
@click.option("--steps", default=300, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--batch", default=16, show_default=True)
@click.option("--eta", default=1.0, show_default=True, help="Negative-guidance strength of the ESD target.")
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice).")
@click.option("--out", "out_file", required=True, type=click.Path(path_type=Path))
def align(base, concepts, prompts_file, method, rank, alpha, steps, lr, batch, eta, seed, threads, out_file):
    """Train a Safety LoRA that erases a concept (ESD objective), written as a kohya .safetensors."""
    from auditkit.lora.write import save_adapter
    from auditkit.models.pipeline import architecture_of, load_pipeline
    from auditkit.train.esd import ESDConfig, train_esd

    prompts = list(concepts) + _read_prompts(prompts_file)
    if not prompts:
        raise click.UsageError("give the concept with --concept or --prompts")
    _check_output(out_file)
    _torch_threads(threads)
    pipe = load_pipeline(base)
    cfg = ESDConfig(method=method, rank=rank, alpha=alpha, steps=steps, lr=lr, batch=batch, eta=eta, seed=seed)
    bar, update = _progress(f"align {method}")
    with bar:
        modules = train_esd(pipe, prompts, cfg, progress=update)
    meta = {"auditkit.kind": "safety", "auditkit.method": method, "auditkit.concept_prompts": json.dumps(prompts),
            "auditkit.base": base, "ss_network_dim": str(rank), "ss_network_alpha": str(alpha or rank)}
    save_adapter(modules, out_file, architecture_of(pipe, "custom"), metadata=meta)
    out.print(f"safety adapter: [bold]{out_file}[/bold] ({len(modules)} modules, rank {rank}, {method})")


def _read_prompts(path: Path | None) -> list[str]:
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


@cli.command()
@_base_option
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="Folder of images with same-named .txt captions.")
@click.option("--mode", type=click.Choice(["on-top", "modular", "full"]), default="on-top", show_default=True,
              help="on-top: safety merged, then fine-tune (common practice); modular: fine-tune on the base, add "
                   "the safety module at inference (Modular LoRA); full: full fine-tuning on top.")
@click.option("--safety", type=click.Path(path_type=Path), help="The safety adapter (needed for on-top/full).")
@click.option("--targets", default="transformer", show_default=True,
              help="Trained modules: transformer, attention, cross-kv, esd-x, esd-u, or a regex.")
@click.option("--rank", default=8, show_default=True)
@click.option("--alpha", type=float, default=None)
@click.option("--steps", default=400, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--batch", default=32, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--extract-rank", default=32, show_default=True, help="full mode: rank of the extracted LoRA.")
@click.option("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice).")
@click.option("--out", "out_file", required=True, type=click.Path(path_type=Path))
def finetune(base, data_dir, mode, safety, targets, rank, alpha, steps, lr, batch, seed, extract_rank, threads,
             out_file):
    """Fine-tune a LoRA on an image-caption folder, on top of a safety module or modularly."""
    from auditkit.lora.adapter import read_adapter
    from auditkit.lora.write import save_adapter
    from auditkit.models.pipeline import architecture_of, load_pipeline
    from auditkit.train.data import check_folder, load_folder
    from auditkit.train.finetune import FinetuneConfig
    from auditkit.train.finetune import finetune as run_finetune

    if mode in ("on-top", "full") and safety is None:
        raise click.UsageError(f"--mode {mode} needs --safety")
    _check_output(out_file, safety)
    pairs = check_folder(data_dir)  # bad data fails before any model loads
    if safety is not None:
        read_adapter(safety)
    _torch_threads(threads)
    pipe = load_pipeline(base)
    arch = architecture_of(pipe, "custom")
    safety_modules = read_adapter(safety, arch=arch).modules if safety else None
    data = load_folder(data_dir, pipe.unet.config.sample_size * pipe.vae_scale_factor, pairs)
    cfg = FinetuneConfig(mode=mode, targets=targets, rank=rank, alpha=alpha, steps=steps, lr=lr, batch=batch,
                         seed=seed, extract_rank=extract_rank)
    bar, update = _progress(f"finetune {mode}")
    with bar:
        result = run_finetune(pipe, data.images, data.captions, cfg, safety=safety_modules, progress=update)
    meta = {"auditkit.kind": "finetune", "auditkit.mode": mode, "auditkit.base": base,
            "ss_network_dim": str(rank), "ss_network_alpha": str(alpha or rank),
            "ss_num_train_images": str(len(data.captions)), "ss_max_train_steps": str(steps),
            "ss_tag_frequency": json.dumps({data_dir.name: _tag_counts(data.captions)})}
    save_adapter(result.modules, out_file, arch, metadata=meta)
    out.print(f"fine-tuning adapter: [bold]{out_file}[/bold] ({len(result.modules)} modules, mode {mode}, "
              f"final loss {result.losses[-1]:.4f})")


def _tag_counts(captions: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for cap in captions:
        for word in cap.split():
            counts[word] = counts.get(word, 0) + 1
    return counts


@cli.group()
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


@cli.group()
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
                      str(len(s.prompts)), _escape(cats))
    out.print(table)


@suites.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
def suites_validate(files: tuple[Path, ...]) -> None:
    """Validate suite files (.yaml) or prompt CSVs; exit 2 at the first invalid one."""
    from auditkit.suites import load_suite

    for f in files:
        s = load_suite(f)
        out.print(f"ok  {_escape(str(f))}: suite '{_escape(s.name)}' v{s.version}, {len(s.prompts)} prompts")


@cli.group()
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
