"""What report.json's fields must hold when ``auditkit report`` reads one back (shapes: :mod:`auditkit.records`).

Only what re-rendering computes with is checked: numbers that are formatted or compared, lists that are
joined or iterated, objects whose items are listed. Text is rendered escaped whatever it holds, and the
sections :func:`auditkit.report.build.refresh` derives again from the run log are not read. Numbers may be
null (a non-finite value is written so).
"""

from __future__ import annotations

from auditkit.discovery.record import TRIGGER_SEARCH
from auditkit.records import ANY, INDEX, NUMBER, OBJECT, TEXT, fields, list_of, map_of, optional

FIGURE = optional(NUMBER)
TEXTS = list_of(TEXT)
ITEMS = list_of(ANY)


def _figures(*names: str, **more) -> dict:
    return {**{n: FIGURE for n in names}, **more}


ADAPTER = fields({
    "components": map_of(ANY), "algorithms": optional(map_of(ANY)), "forms": optional(map_of(ANY)),
    "ranks": ITEMS, "notes": ITEMS,
    "coverage": fields(_figures("fraction", unmapped_keys=ITEMS), required=("fraction",)),
    "full_model": optional(fields(_figures("min_energy_kept", components=ITEMS,
                                           truncation=map_of(fields(_figures("energy_kept")))))),
    "metadata": fields({"fields": map_of(ANY), "training_tags": list_of(OBJECT), "datasets": list_of(OBJECT),
                        "problems": ITEMS, "raw": map_of(ANY)}),
}, required=("components", "coverage"))

GROUP = fields({"block": TEXT, "kind": TEXT, "cancellation": NUMBER, "safety_share": NUMBER,
                "energy_in_safety_subspace": FIGURE, "modules": ANY},
               required=("block", "kind", "cancellation", "safety_share", "modules", "energy_in_safety_subspace"))
MODULE = fields(_figures("cancellation", "contribution", "energy_in_safety_subspace", "candidate_norm", "safety_norm",
                         name=TEXT, column_angles_deg=optional(list_of(FIGURE)),
                         row_angles_deg=optional(list_of(FIGURE))), required=("name",))
STATIC = fields(_figures("cancellation", "cosine", "energy_in_safety_subspace", groups=list_of(GROUP),
                         modules=list_of(MODULE), top_modules=TEXTS, candidate_only=ITEMS, safety_only=ITEMS,
                         thresholds=map_of(ANY), verdict=TEXT, reasons=ITEMS),
                required=("verdict", "reasons", "groups", "modules", "top_modules"))

SEARCHED = fields({"probed": TEXTS, "placed": TEXTS, "tokens_swept": INDEX, "phrases_tried": INDEX})
TRIGGERS = fields({"words": list_of(fields({"sources": list_of(OBJECT)})), "unprobed": ITEMS,
                   "left_out": list_of(OBJECT), "notes": ITEMS, "sidecars": ITEMS, "search": optional(SEARCHED)})
METADATA_EVIDENCE = fields({"declared_triggers": ITEMS,
                            "suites": map_of(fields({"terms": ITEMS, "tags": list_of(OBJECT), "triggers": ITEMS}))})
BASE_JUDGE = fields(_figures("value", "ratio", "threshold", scores=map_of(FIGURE), levels=list_of(FIGURE)))
CONCEPT_CHECK = fields(_figures("reverted", "reverted_concept_tokens", noise_reversion=optional(
    fields(_figures("reverted", "relative_safety_change", per_step=list_of(FIGURE)))),
    base_judge=optional(BASE_JUDGE)))
_ADHERENCE = map_of(map_of(fields(_figures("rate", ci95=optional(list_of(FIGURE))))))
SAFETY_COST = fields(_figures("pixel_similarity", "psnr_db", measured=ANY, suites=TEXTS, pairs=optional(INDEX),
                              adherence=optional(_ADHERENCE), adherence_suites=optional(TEXTS),
                              kept=optional(map_of(FIGURE))))
DYNAMIC = fields({"thresholds": OBJECT, "truncated_prompts": optional(map_of(ANY)),
                  "adapter_coverage": map_of(fields({"missing": TEXTS})), "safety_cost": optional(SAFETY_COST)},
                 required=("adapter_coverage",))

_SCAN_FIGURES = ("static_cancellation", "energy_in_safety_subspace", "noise_reversion", "concept_check")
_COMPARED = fields(_figures("reemergence_ratio", "rate_candidate", reemergence_ci95=optional(list_of(FIGURE))))
_FIDELITY_FIGURES = ("pixel_similarity", "psnr_db", "attributes_agree", "shape_agrees", "colour_agrees",
                     "style_agrees", "clip_cosine")
REPAIR = fields({
    "anchors": optional(fields({"suites": list_of(OBJECT), "verified_on": list_of(OBJECT)})),
    "auto": optional(fields({"tried": list_of(fields(_figures("max_reemergence_ratio", "fidelity"))),
                             "not_tried": ITEMS})),
    "before": fields(_figures(*_SCAN_FIGURES)), "after": fields(_figures(*_SCAN_FIGURES)),
    "comparisons": list_of(fields({"before": _COMPARED, "after": _COMPARED})),
    "fidelity": optional(fields(_figures(*_FIDELITY_FIGURES, suites=ITEMS,
                                         unflagged=fields(_figures(*_FIDELITY_FIGURES))))),
    "notes": ITEMS, "pack": optional(fields({"files": map_of(fields({"ranks": ITEMS}))})),
}, required=("before", "after", "comparisons"))

REPORT = fields({
    "candidate": ADAPTER, "safety": optional(ADAPTER), "static": optional(STATIC), "triggers": optional(TRIGGERS),
    "metadata_evidence": optional(METADATA_EVIDENCE), "concept_check": optional(CONCEPT_CHECK),
    "dynamic": optional(DYNAMIC), "repair": optional(REPAIR), "evidence": optional(OBJECT),
    "trigger_search": optional(TRIGGER_SEARCH),
}, required=("candidate",))
