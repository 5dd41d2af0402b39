"""``report.html``: one self-contained page for a ``compress`` (or ``search``) output folder.

No network: a Content-Security-Policy meta tag allows nothing but inline styles and
scripts and ``data:`` images; the plots are PNGs embedded as ``data:`` URIs. Every number
on the page is read from the folder's JSON (``compress.json``, or ``search.json``), so
``graphprune report DIR`` writes the same page again from it.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from ..search.report import _atomic_write

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:70em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f3f3f3;cursor:pointer}td.l,th.l{text-align:left}
tr.front td{background:#eef6ff}tr.chosen td{background:#e6f7e6;font-weight:600}code,pre{background:#f6f6f6;padding:.2em .4em}
img{max-width:100%}.met{color:#080}.notmet{color:#b00}"""
SORT = """document.querySelectorAll('table.sortable th').forEach(function(th,i){th.addEventListener('click',function(){
var body=th.closest('table').tBodies[0],rows=Array.from(body.rows),up=th.dataset.up!=='1';th.dataset.up=up?'1':'0';
rows.sort(function(a,b){var x=a.cells[i].dataset.v,y=b.cells[i].dataset.v,p=parseFloat(x),q=parseFloat(y);
var c=(isNaN(p)||isNaN(q))?String(x).localeCompare(String(y)):p-q;return up?c:-c});rows.forEach(function(r){body.appendChild(r)})})});"""


def write_report(folder) -> Path:
    """Write ``report.html`` in a compress or search output folder from its JSON; returns its path."""
    folder = Path(folder)
    if (folder / "compress.json").is_file():
        body = compress_page(json.loads((folder / "compress.json").read_text()))
    elif (folder / "search.json").is_file():
        body = search_page(json.loads((folder / "search.json").read_text()))
    else:
        raise ValueError(f"report: {folder} holds neither compress.json nor search.json; give the output folder of graphprune compress or search")
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f"<title>graphprune report</title><style>{STYLE}</style></head><body>{body}<script>{SORT}</script></body></html>")
    _atomic_write(folder / "report.html", page)
    return folder / "report.html"


def _e(value) -> str:
    return html.escape(str(value))


def _fmt(value, digits=4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(columns: list, rows: list[dict], *, sortable=False, classes=None, digits=None) -> str:
    head = "".join(f'<th class="{"l" if i == 0 else ""}">{_e(c)}</th>' for i, c in enumerate(columns))
    out = [f'<table class="{"sortable" if sortable else ""}"><thead><tr>{head}</tr></thead><tbody>']
    for n, row in enumerate(rows):
        cls = (classes or {}).get(n, "")
        cells = "".join(f'<td class="{"l" if i == 0 or isinstance(row.get(c), str) else ""}" data-v="{_e(row.get(c, ""))}">'
                        f"{_e(_fmt(row.get(c), (digits or {}).get(c, 4)))}</td>" for i, c in enumerate(columns))
        out.append(f'<tr class="{cls}">{cells}</tr>')
    return "".join(out) + "</tbody></table>"


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _trials_plot(result: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = [t for t in result["trials"] if t.get("speedup") and t.get("validation") is not None and t.get("repeat_of") is None]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for group, style in (([t for t in trials if not t["front"]], dict(color="#999", label="trial")),
                         ([t for t in trials if t["front"]], dict(color="#1f77b4", label="Pareto front"))):
        ax.scatter([t["speedup"] for t in group], [t["validation"] for t in group], **style)
    ax.axhline(result["dense"]["validation"], color="grey", linestyle=":", label="dense")
    ax.axhline(result["dense"]["validation"] - result["max_drop"]["points"] / 100, color="red", linestyle=":", label="the limit")
    if result["chosen"]:
        c = next((t for t in trials if t["trial"] == result["chosen"]["trial"]), None)
        if c:
            ax.scatter([c["speedup"]], [c["validation"]], marker="*", s=250, color="green", label="chosen", zorder=3)
    ax.set_xlabel(f"speed-up over dense torch fp32 eager in the search ({result['shapes'][0]})")
    ax.set_ylabel(f"validation {result['metric']}")
    ax.legend(fontsize=8)
    return _png(fig)


def _layers_plot(dense: list, kept: list) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key, title in ((axes[0], "heads", "attention heads"), (axes[1], "ffn", "FFN neurons")):
        x = [d["layer"] for d in dense]
        ax.bar(x, [d[key] or 0 for d in dense], color="#ddd", label="dense")
        ax.bar(x, [k[key] or 0 for k in kept], color="#1f77b4", label="kept")
        ax.set_title(title)
        ax.set_xlabel("layer")
    axes[0].legend(fontsize=8)
    return _png(fig)


def compress_page(result: dict) -> str:
    dense, chosen, metric = result["dense"], result["chosen"], result["metric"]
    machine = result["machine"]
    budget = result["budget"]
    parts = [f"<h1>graphprune compress: {_e(result['task'])}</h1>",
             f"<p>Machine: {_e(machine.get('cpu'))}, oneDNN ISA {_e(machine.get('onednn_isa'))}, flags {_e(' '.join(machine.get('flags', [])))}. "
             f"Limit: at most {_e(_fmt(result['max_drop']['points'], 2))} points of validation {_e(metric)} lost. "
             f"Budget {_e(budget['seconds'])} s, used {_e(budget['elapsed'])} s ({_e(budget['share'])} of it; stopped: {_e(budget['stopped'])}); "
             f"{len(result['trials'])} trials.</p>"]
    parts.append("<h2 id='before-after'>Before and after</h2>")
    if chosen is None:
        parts.append(f"<p class='notmet'>No trial kept within the limit. Dense validation {_e(_fmt(dense['validation']))}.</p>")
    else:
        rows = [{"": "dense (torch fp32 eager)", f"validation {metric}": dense["validation"], f"test {metric}": dense["test"], "params": dense["params"],
                 **{f"ms {s}": dense["ms"].get("dense eager fp32", {}).get(s) for s in result["shapes"]}}]
        for name in ("dense ort int8", "dense aoti fp32"):
            rows.append({"": name.replace("ort", "ONNX Runtime").replace("aoti", "AOTInductor"),
                         **{f"ms {s}": dense["ms"].get(name, {}).get(s) for s in result["shapes"]}})
        rows.append({"": f"chosen: {chosen['runtime']}", f"validation {metric}": chosen["validation"], f"test {metric}": chosen["test_artefact"],
                     "params": chosen["params"], "size MB": chosen["size_mb"], **{f"ms {s}": chosen["ms"].get(s) for s in result["shapes"]}})
        columns = ["", f"validation {metric}", f"test {metric}", "params", "size MB"] + [f"ms {s}" for s in result["shapes"]]
        parts.append(_table(columns, rows, classes={len(rows) - 1: "chosen"}))
        speed = [{"shape": s, **{k: v for k, v in r.items()}} for s, r in chosen["speedups"].items()]
        parts.append("<p>Speed-ups of the chosen artefact, timed side by side with the dense references "
                     f"({_e(chosen['timing_rounds'])} interleaved rounds each):</p>")
        parts.append(_table(["shape", "vs_eager_fp32", "vs_aoti_fp32", "vs_ort_int8"], speed, digits={k: 2 for k in ("vs_eager_fp32", "vs_aoti_fp32", "vs_ort_int8")}))
        parts.append(f"<p>Test: {_e(_fmt(chosen['test_artefact']))} in the artefact's own runtime ({_e(_fmt(chosen['test_graph']))} as a graph), "
                     f"{_e(_fmt(chosen['drop_test_points'], 2))} points lost against dense.</p>")
    parts.append("<h2 id='trials-plot'>Accuracy against speed-up</h2>" + _trials_plot(result))
    if chosen is not None:
        parts.append("<h2 id='layers'>What was removed, layer by layer</h2>")
        if chosen["layers"] and dense["layers"]:
            rows = [{"layer": d["layer"], "heads dense": d["heads"], "heads kept": k["heads"], "FFN dense": d["ffn"], "FFN kept": k["ffn"]}
                    for d, k in zip(dense["layers"], chosen["layers"])]
            parts.append(_layers_plot(dense["layers"], chosen["layers"]) + _table(list(rows[0]), rows))
        else:
            parts.append("<p>The chosen graph's layer shapes were not readable from its summary.</p>")
        parts.append("<h2 id='pipeline'>The chosen pipeline</h2>")
        parts.append(f"<p>{_e(chosen['pipeline'])}</p><pre>{_e(json.dumps({'passes': chosen['steps'], 'finetune': chosen['finetune'], 'export': chosen['export']}, indent=2))}</pre>")
        parts.append("<h2 id='commands'>Commands</h2><pre>" + "\n".join(f"# {_e(k)}\n{_e(v)}" for k, v in chosen["commands"].items()) + "</pre>")
    parts.append("<h2 id='trials'>Every trial</h2><p>Click a column to sort. Rows on the Pareto front are shaded.</p>")
    columns = ["trial", "state", "pipeline", "validation", "drop_points", "speedup", "feasible", "seconds"]
    rows = result["trials"]
    classes = {i: "chosen" if chosen and r["trial"] == chosen["trial"] else "front" if r["front"] else "" for i, r in enumerate(rows)}
    parts.append(_table(columns, rows, sortable=True, classes=classes, digits={"drop_points": 2, "speedup": 2}))
    return "".join(parts)


def search_page(result: dict) -> str:
    parts = [f"<h1>graphprune search: {_e(result['study'])}</h1>",
             f"<p>Objectives {_e(', '.join(result['objectives']))}; constraints {_e(result['constraints'])}; "
             f"{_e(result['completed'])} completed, {_e(result['failed'])} failed; input graph {_e(result['reference'])}.</p>",
             "<h2 id='front'>Pareto front (validation; test re-scored)</h2>"]
    columns = [c for c in (result["front"][0] if result["front"] else {}) if c not in ("steps", "finetune", "export", "run_file")]
    parts.append(_table(columns, result["front"], sortable=True))
    rows = [{"trial": t["number"], **{k: v for k, v in (t.get("metrics") or {}).items()}, "feasible": t["feasible"]} for t in result["trials"]]
    parts.append("<h2 id='trials'>Every trial</h2>" + _table(list(rows[0]) if rows else ["trial"], rows, sortable=True))
    return "".join(parts)
