"""report.html: one self-contained file (inline CSS and SVG, no scripts, no network) for people.

Rendered with Jinja2 autoescaping from the report dict alone. Everything that comes from an
adapter file (metadata, key names, paths) is untrusted and reaches the page only as escaped text.
Charts are SVG built here from numbers; their few labels are escaped too.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from auditkit.discovery.search import probes
from auditkit.placement import described
from auditkit.report.digest import placed, variant_pairs
from auditkit.report.safety_cost import summary_line

BLOCK_ORDER = ("down", "mid", "up", "unet_other", "text_encoder", "other")
KIND_LABEL = {"self_attention": "self-attn", "cross_attention": "cross-attn", "feed_forward": "ff", "other": "other"}


def environment() -> Environment:
    """The templates' Jinja2 environment: autoescaped, with the report's number filters."""
    return _env()


def _env() -> Environment:
    env = Environment(loader=PackageLoader("auditkit.report", "templates"),
                      autoescape=select_autoescape(default=True, default_for_string=True))
    env.filters["pct"] = lambda x: "–" if x is None else f"{100 * x:.1f}%"
    env.filters["num"] = lambda x, d=3: "–" if x is None else f"{x:.{d}f}"
    env.filters["short"] = lambda h: h[:12] if h else ""
    env.filters["placed"] = placed
    env.filters["probes"] = probes
    env.filters["described"] = described
    env.filters["safety_cost"] = summary_line
    return env


def group_chart(groups: list[dict], width: int = 720) -> Markup:
    """Horizontal bars per block group: cancellation (scale −0.5…1.5) and energy in safety subspace."""
    rows = [g for g in groups if g["safety_share"] > 0 or g["modules"]]
    rows.sort(key=lambda g: (BLOCK_ORDER.index(g["block"]) if g["block"] in BLOCK_ORDER else 99, g["kind"]))
    if not rows:
        return Markup("<p>No module is shared with the safety adapter.</p>")
    label_w, bar_w, row_h = 190, (width - 190 - 20) // 2, 30
    height = 40 + row_h * len(rows)
    lo, hi = -0.5, 1.5
    zero_x = label_w + bar_w * (0 - lo) / (hi - lo)
    one_x = label_w + bar_w * (1 - lo) / (hi - lo)
    ex0 = label_w + bar_w + 20
    parts = [
        f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        'xmlns="http://www.w3.org/2000/svg" aria-label="cancellation and energy per block group">',
        f'<text x="{label_w}" y="14" class="axis">cancellation (dashed: 1.0 = full undo)</text>',
        f'<text x="{ex0}" y="14" class="axis">energy in safety subspace</text>',
        f'<line x1="{zero_x:.1f}" y1="22" x2="{zero_x:.1f}" y2="{height - 6}" class="zero"/>',
        f'<line x1="{one_x:.1f}" y1="22" x2="{one_x:.1f}" y2="{height - 6}" class="one"/>',
    ]
    for i, g in enumerate(rows):
        y = 26 + i * row_h
        c = max(lo, min(hi, g["cancellation"] or 0.0))
        x_c = label_w + bar_w * (c - lo) / (hi - lo)
        x0, x1 = sorted((zero_x, x_c))
        cls = "bar risk" if c >= 0.5 else ("bar warn" if c >= 0.2 else "bar ok")
        e = max(0.0, min(1.0, g["energy_in_safety_subspace"] or 0.0))
        label = escape(f"{g['block']} · {KIND_LABEL.get(g['kind'], g['kind'])}")
        parts += [
            f'<text x="4" y="{y + 15}" class="label">{label}</text>',
            f'<text x="4" y="{y + 26}" class="sub">{100 * g["safety_share"]:.0f}% of safety update</text>',
            f'<rect x="{x0:.1f}" y="{y + 4}" width="{max(x1 - x0, 1):.1f}" height="16" class="{cls}">'
            f'<title>cancellation {g["cancellation"]:.3f}</title></rect>',
            f'<text x="{min(x1, label_w + bar_w - 40) + 4:.1f}" y="{y + 16}" class="val">'
            f'{g["cancellation"]:.2f}</text>',
            f'<rect x="{ex0}" y="{y + 4}" width="{bar_w}" height="16" class="track"/>',
            f'<rect x="{ex0}" y="{y + 4}" width="{max(bar_w * e, 1):.1f}" height="16" class="bar energy">'
            f'<title>energy in safety subspace {100 * e:.1f}%</title></rect>',
            f'<text x="{ex0 + 4}" y="{y + 16}" class="val">{100 * e:.0f}%</text>',
        ]
    parts.append("</svg>")
    return Markup("".join(parts))


GRID_IMAGES = 16  # per configuration and suite
NUDITY_DETECTORS = ("nudenet-default", "nudenet-strict")


def rate_chart(rates: dict, width: int = 560) -> Markup:
    """Concept rate per configuration with its 95% Wilson interval (0 … 100%)."""
    rows = list(rates.items())
    label_w, bar_w, row_h = 220, width - 270, 24
    height = 12 + row_h * len(rows)
    parts = [f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
             'xmlns="http://www.w3.org/2000/svg" aria-label="concept rate per configuration">']
    for i, (config, r) in enumerate(rows):
        y = 6 + i * row_h
        x = label_w + bar_w * r["rate"]
        lo, hi = (label_w + bar_w * v for v in r["ci95"])
        parts += [
            f'<text x="4" y="{y + 13}" class="label">{escape(config)}</text>',
            f'<rect x="{label_w}" y="{y + 3}" width="{bar_w}" height="12" class="track"/>',
            f'<rect x="{label_w}" y="{y + 3}" width="{max(x - label_w, 1):.1f}" height="12" class="bar energy">'
            f'<title>{100 * r["rate"]:.1f}% ({r["hits"]}/{r["n"]})</title></rect>',
            f'<line x1="{lo:.1f}" y1="{y + 9}" x2="{hi:.1f}" y2="{y + 9}" class="ci"/>',
            f'<text x="{label_w + bar_w + 4}" y="{y + 13}" class="val">{100 * r["rate"]:.0f}%</text>',
        ]
    parts.append("</svg>")
    return Markup("".join(parts))


def image_grids(report: dict) -> dict:
    """suite -> configuration -> [(data URI, flagged, blurred, prompt)] from the run's saved images; an edit
    suite's input image comes first, under "input image"."""
    from auditkit.runlog import RunLog

    dyn = report.get("dynamic") or {}
    if not dyn.get("run_log"):
        return {}
    run_dir = Path(dyn["run_log"]).parent
    show = dyn.get("show_flagged", False)
    grids: dict = {}
    for rec in RunLog(run_dir).records():
        if "input_image" in rec and rec["suite"] not in grids:  # an edit suite: its input first, then the edits
            shown = _grid_image(run_dir, rec["input_image"], "the image the prompts edit")
            grids[rec["suite"]] = {"input image": [shown]}
        cell = grids.setdefault(rec["suite"], {}).setdefault(rec["config"], [])
        if len(cell) >= GRID_IMAGES:
            continue
        image = _grid_image(run_dir, rec["image"], rec["prompt"])
        image["frames"] = rec.get("frames", 1)  # a clip's strip of sampled frames
        if "uri" in image:
            nude = any(rec["flags"].get(d) for d in NUDITY_DETECTORS)
            image.update(flagged=any(rec["flags"].values()), blur=nude and not show)
        cell.append(image)
    return grids


def _grid_image(run_dir: Path, image: str, prompt: str) -> dict:
    """One image of a grid as a data URI, or why it is missing (only images inside the run folder are shown)."""
    import base64

    path = (run_dir / image).resolve()
    if run_dir.resolve() not in path.parents or not path.is_file():
        why = "outside the run folder" if run_dir.resolve() not in path.parents else "file missing"
        return {"missing": why, "prompt": prompt, "image": image}
    return {"uri": "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii"), "prompt": prompt}


def render_html(report: dict) -> str:
    template = _env().get_template("report.html.j2")
    static = report.get("static") or {}
    top = set(static.get("top_modules", []))
    dyn = report.get("dynamic") or {}
    return template.render(
        r=report,
        s=static,
        chart=group_chart(static.get("groups", [])) if static else "",
        top_modules=[m for m in static.get("modules", []) if m["name"] in top],
        rate_charts={name: rate_chart(sd["rates"]) for name, sd in dyn.get("suites", {}).items()},
        variants=variant_pairs(dyn),
        grids=image_grids(report),
    )
