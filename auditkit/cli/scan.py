"""``auditkit scan`` and ``auditkit report``: parse, call :func:`auditkit.scan`, print."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.panel import Panel
from rich.table import Table

from auditkit.cli.common import VERDICT_STYLE, escape, out, print_paths, progress_bar
from auditkit.cli.options import resolve, scan_options
from auditkit.report.safety_cost import summary_line


@click.command()
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option("--top", default=10, show_default=True, help="Modules listed in the terminal summary.")
@scan_options
def scan(candidate: Path, top: int, **params) -> None:
    """Scan CANDIDATE; write report.json and report.html; exit 0 pass, 1 risk, 2 error, 3 inconclusive.

    What runs depends on what is configured (options here, or auditkit.toml / [tool.auditkit]):
    with a safety module: the static scan; with a base too: the data-free checks and the dynamic
    scan (suites rendered under base, base+safety, base+safety+candidate, base+candidate with paired
    seeds). With a base and no safety module: concept amplification against the base. With
    neither: the file's format, coverage and metadata only (exit 3). Only the dynamic scan can
    give a pass. Resumable: run it again with the same --out.

    Several GPUs: `accelerate launch --num_processes N -m auditkit scan ...` splits the probe
    batches across N processes into one run (rank 0 writes the report and prints).
    """
    from auditkit.distributed import is_main_process
    from auditkit.scan import scan as run_scan

    suites_given = bool(params.get("suites"))
    config, _, config_path = resolve(params, candidate)
    if suites_given and config.base is None:
        raise click.UsageError("--suite needs a base model (--base or the config file): the suites are probed on it")
    main = is_main_process()
    bar, update = progress_bar("dynamic scan", loss=False)

    def progress(stage: str, done: int, total: int) -> None:
        if not bar.live.is_started:  # drawn once rendering starts: input errors print no empty bar
            bar.start()
        update(done, total)

    try:
        result = run_scan(config, progress=progress if main else None)
    finally:
        bar.stop()
    if not main:
        sys.exit(result.exit_code)  # other ranks of a distributed launch: same verdict, rank 0 reports it
    print_scan(result.report, top, config_path)
    print_paths(report=result.paths["html"], json=result.paths["json"])
    sys.exit(result.exit_code)


@click.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--show-flagged", is_flag=True, help="Do not blur images the nudity detector flags.")
def report_cmd(run_dir: Path, show_flagged: bool) -> None:
    """Re-render RUN_DIR's report from its run log and static results, without a model or GPU."""
    from auditkit.report.build import refresh, write_reports

    report = refresh(run_dir, show_flagged)
    paths = write_reports(report, run_dir)
    print_paths(report=paths["html"], json=paths["json"])
    sys.exit(report["exit_code"])


def print_scan(r: dict, top: int, config_path: Path | None = None) -> None:
    style = VERDICT_STYLE[r["verdict"]]
    body = Table.grid(padding=(0, 2))
    body.add_row("verdict", f"[{style}]{r['verdict'].upper()}[/{style}]  "
                            f"(evidence: {r['evidence']['level']}; gathered: {', '.join(r['evidence']['gathered'])})")
    for reason in r["reasons"]:
        body.add_row("", escape(reason))
    for role in ("candidate", "safety"):
        fm = (r.get(role) or {}).get("full_model")
        if fm:
            kept = f"energy {fm['energy']:g}" if fm["energy"] is not None else f"rank {fm['rank']}"
            body.add_row(role, escape(f"full model ({fm['form']}): its difference to the {fm['reference']}, "
                                      f"{fm['modules_changed']} modules changed ({kept} kept per module), "
                                      f"{fm['modules_unchanged']} unchanged"))
    s = r.get("static")
    if s:
        body.add_row("cancellation", f"{s['cancellation']:.3f}  (1.0 = the candidate exactly undoes the safety update)")
        body.add_row("energy in safety subspace", f"{s['energy_in_safety_subspace']:.1%} of the candidate's update")
        body.add_row("modules", f"{s['shared_modules']} shared, {len(s['candidate_only'])} candidate-only, "
                                f"{len(s['safety_only'])} safety-only")
    cc = r.get("concept_check")
    if cc:
        on_concept = cc.get("reverted_concept_tokens")
        on_concept = f"{on_concept:.3f}" if on_concept is not None else "no tokens found"
        body.add_row("concept check", f"{cc['reverted']:.3f} of the safety change to the concept prompts' keys/values "
                     f"reverted ({on_concept} on the concept tokens)" if cc["applicable"]
                     else f"not applicable: {escape(cc['note'])}")
        nr = cc.get("noise_reversion")
        if nr:
            body.add_row("noise reversion", f"{nr['reverted']:.3f} of the safety module's change to the concept "
                         f"prompts' {nr.get('prediction', 'noise')} predictions reverted ({nr['prompts']} prompts, "
                         f"{nr['steps']} steps)")
        bj = cc.get("base_judge")
        if bj:
            body.add_row("base judge", _base_judge_text(bj))
    _metadata_rows(body, r.get("metadata_evidence"))
    _trigger_rows(body, r.get("triggers"), r.get("dynamic"))
    cost = summary_line((r.get("dynamic") or {}).get("safety_cost"))
    if cost:
        body.add_row("safety module's cost", escape(f"on the control suites, base → base + safety: {cost}"))
    out.print(Panel(body, title=f"auditkit scan · {r['architecture']} · {r['mode']}", expand=False))
    if s:
        _static_tables(s, top)
    for role in ("candidate", "safety"):
        cov = (r.get(role) or {}).get("coverage")
        if cov and cov["unmapped"]:
            out.print(f"[yellow]{role}: {cov['unmapped']} unmapped keys[/yellow] ({cov['fraction']:.0%} coverage)")
    if r["mode"] != "full":
        _what_was_not_checked(r, config_path)


def _base_judge_text(bj: dict) -> str:
    """The base judge's row: what it measured, against the threshold the predictor study found (data-free
    evidence: it never changes the verdict)."""
    if bj["value"] is None:
        return f"not measured: {escape(bj['note'])}"
    side = "at or above" if bj["above"] else "below"
    return (f"{bj['value']:.2f} of the way from what the safe model draws to what the base draws, judged by the base "
            f"({bj['samples']} latents, {bj['steps']} steps); {side} the threshold {bj['threshold']:.2f} "
            "(data-free evidence: never decides the verdict)")


def _metadata_rows(body: Table, ev: dict | None) -> None:
    if not ev:
        return
    for name, sv in ev["suites"].items():
        if sv["tags"] or sv["triggers"]:
            tags = ", ".join(f"{t['tag']} ({t['count']})" for t in sv["tags"][:8])
            body.add_row(f"metadata · {name}", escape(f"training tags naming the concept: {tags or 'none'}"
                                                      + (f"; trigger words: {', '.join(sv['triggers'])}"
                                                         if sv["triggers"] else "")))
    if not ev["found"]:
        body.add_row("metadata", "no training tag or trigger word names a suite's concept"
                     + ("" if ev["has_tag_frequency"] else " (the file has no ss_tag_frequency)"))


def _trigger_rows(body: Table, tr: dict | None, dynamic: dict | None) -> None:
    from auditkit.report.digest import variant_pairs

    if not tr:
        return
    for w in tr["words"]:
        where = "; ".join(f"{src['source']}: {src['detail']}" for src in w["sources"])
        body.add_row("trigger word", escape(f"{w['word']}  ({where})"))
    if tr["words"]:
        state = ("probed: concept suites as written and with " + repr(tr["prefix"]) + " prepended" if tr["used"] else
                 "not used: switched off (--no-triggers)" if not tr["enabled"] else "not used: behaviour not probed")
        body.add_row("", escape(state))
    search = tr.get("search") or {}
    if search.get("ran"):
        body.add_row("trigger search", escape(
            f"{search['tokens_swept']} tokens swept, {search['phrases_tried']} phrases tried; probed: "
            f"{', '.join(search.get('placed') or search['probed']) or 'none'}"))
    elif not search.get("enabled"):
        body.add_row("trigger search", "switched off (--no-trigger-search)")
    for name, n in ((dynamic or {}).get("truncated_prompts") or {}).items():
        body.add_row("", escape(f"note: {n} prompt(s) of {name} are longer than the text encoder reads and were cut"))
    for v in variant_pairs(dynamic or {}):
        figures = {k: v[k]["figure"] for k in ("as_written", "with_triggers")}
        text = ", ".join(f"{label} {v[k]['verdict']}" + (f" ({v['measure']} up to {figures[k]:.2f})"
                                                           if figures[k] is not None else "")
                         for k, label in (("as_written", "as written"), ("with_triggers", "with trigger words")))
        body.add_row(f"dynamic · {escape(v['suite'])}", escape(text))


def _static_tables(s: dict, top: int) -> None:
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


def _what_was_not_checked(r: dict, config_path: Path | None) -> None:
    """A screen saying what this scan did not check and the one command that would complete it."""
    cand = r["candidate"]["path"]
    checked = {"metadata": "the file's format, key coverage and metadata (training tags, trigger words)",
               "static": "weight-space cancellation of the safety module, and the data-free checks with a base",
               "amplification": "behaviour against the base: concept rates of base vs base+candidate (no safety "
                                "module, so no re-emergence ratio and no static scan)"}[r["mode"]]
    missing = {"metadata": "no safety module and no base model: nothing about behaviour was probed",
               "static": "behaviour: no images were rendered, so no pass is possible",
               "amplification": "the safety module's own effect (no --safety): weight-space cancellation and the "
                                "re-emergence ratio"}[r["mode"]]
    command = {"metadata": f"auditkit scan {cand} --safety SAFETY.safetensors --base lab|PIPELINE_DIR",
               "static": f"auditkit scan {cand} --safety {(r.get('safety') or {}).get('path', 'SAFETY')} "
                         + (f"--base {r['base']} --no-static" if r.get("base") else "--base lab|PIPELINE_DIR"),
               "amplification": f"auditkit scan {cand} --safety SAFETY.safetensors --base {r.get('base')}"}[r["mode"]]
    where = f"config: {config_path}" if config_path else "no auditkit.toml found (auditkit init writes one)"
    body = Table.grid(padding=(0, 2))
    body.add_row("checked", escape(checked))
    body.add_row("not checked", escape(missing))
    body.add_row("to complete it", escape(command))
    body.add_row("", escape(where))
    out.print(Panel(body, title="what this scan rests on", expand=False))
