"""``index.html``: every adapter of a batch with its verdict, sortable and filterable, linking to its report.

Self-contained (inline CSS and one inline script, allowed by its hash in the page's Content-Security-Policy,
nothing loaded from anywhere). Every value comes from files (ids, paths, metadata, error messages): the
template escapes each one, and the script reads only the table's text, never writes HTML. The view's
state lives in the address's fragment (``#verdict=risk&q=text&sort=reemergence_ratio&dir=desc``), so a
filtered, sorted view can be linked.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
from pathlib import Path

from auditkit import __version__
from auditkit.batch.results import COLUMNS as FIELDS
from auditkit.batch.results import counts
from auditkit.fsutil import atomic_write_text

COLUMNS = (("id", "adapter", False), ("verdict", "verdict", False), ("evidence", "evidence", False),
           ("reemergence_ratio", "re-emergence ratio", True), ("static_cancellation", "cancellation", True),
           ("suspicion", "triage", True), ("architecture", "architecture", False), ("format", "format", False),
           ("reason", "reason / error", False), ("sha256", "sha256", False))

SCRIPT = r"""
(function () {
  var table = document.getElementById("results"), body = table.tBodies[0];
  var verdict = document.getElementById("verdict"), q = document.getElementById("q");
  var shown = document.getElementById("shown"), heads = table.tHead.rows[0].cells;
  var state = {verdict: "", q: "", sort: "", dir: "asc"};
  function cell(row, key) {
    for (var i = 0; i < row.cells.length; i++) if (row.cells[i].dataset.key === key) return row.cells[i];
    return null;
  }
  function value(row, key, numeric) {
    var c = cell(row, key); if (!c) return numeric ? -Infinity : "";
    if (numeric) { var v = parseFloat(c.dataset.v); return isNaN(v) ? -Infinity : v; }
    return c.textContent.trim().toLowerCase();
  }
  function apply() {
    var rows = Array.prototype.slice.call(body.rows), text = state.q.toLowerCase(), n = 0;
    if (state.sort) {
      var numeric = false;
      for (var h = 0; h < heads.length; h++) {
        if (heads[h].dataset.key === state.sort) numeric = heads[h].dataset.numeric === "1";
        heads[h].removeAttribute("aria-sort");
        if (heads[h].dataset.key === state.sort)
          heads[h].setAttribute("aria-sort", state.dir === "desc" ? "descending" : "ascending");
      }
      rows.sort(function (a, b) {
        var x = value(a, state.sort, numeric), y = value(b, state.sort, numeric);
        var c = x < y ? -1 : x > y ? 1 : 0; return state.dir === "desc" ? -c : c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    }
    rows.forEach(function (r) {
      var ok = (!state.verdict || r.dataset.verdict === state.verdict) &&
               (!text || r.textContent.toLowerCase().indexOf(text) >= 0);
      r.hidden = !ok; if (ok) n++;
    });
    verdict.value = state.verdict; q.value = state.q;
    shown.textContent = "showing " + n + " of " + rows.length;
  }
  function save() {
    var parts = [];
    ["verdict", "q", "sort", "dir"].forEach(function (k) {
      if (state[k]) parts.push(k + "=" + encodeURIComponent(state[k]));
    });
    history.replaceState(null, "", "#" + parts.join("&"));
  }
  function load() {  // a part that does not decode (a mistyped or cut link) is ignored, the rest still applies
    location.hash.replace(/^#/, "").split("&").forEach(function (p) {
      var kv = p.split("="); if (kv.length !== 2 || !(kv[0] in state)) return;
      try { state[kv[0]] = decodeURIComponent(kv[1]); } catch (e) { /* URIError: left as it was */ }
    });
  }
  verdict.addEventListener("change", function () { state.verdict = verdict.value; save(); apply(); });
  q.addEventListener("input", function () { state.q = q.value; save(); apply(); });
  for (var i = 0; i < heads.length; i++) heads[i].addEventListener("click", function (e) {
    var key = e.currentTarget.dataset.key;
    state.dir = state.sort === key && state.dir === "asc" ? "desc" : "asc"; state.sort = key; save(); apply();
  });
  load(); apply();
})();
"""


def render_index(rows: list[dict]) -> str:
    from auditkit.report.html import environment

    digest = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    rows = [{c: row.get(c) for c in FIELDS} for row in rows]
    return environment().get_template("index.html.j2").render(
        rows=rows, columns=COLUMNS, counts=counts(rows), script=SCRIPT, script_hash=f"sha256-{digest}",
        created=created, version=__version__)


def write_index(rows: list[dict], out: Path) -> Path:
    return atomic_write_text(Path(out) / "index.html", render_index(rows))
