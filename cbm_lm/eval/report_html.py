"""report.html: one self-contained page (inline CSS, PNGs as base64 data URIs, no script).

Sections: the metric table (value + one-line meaning; an unmeasured metric
shows why), per held-out prompt the text with chunk boundaries, a heatmap of
input attribution per chunk, the top concepts per chunk with their shares and
epsilon's, and the provenance panel; then the figures (training curves from
metrics.jsonl, deletion curves, AUROC per concept).

A panel is plain data (see ``cbm_lm.eval.panels``):
  {"title", "prompt", "origin", "chunks": [{"text", "context": [{"text", "score"}],
   "concepts": [{"name", "share"}], "unknown_share", "epsilon_share"}],
   "provenance": {"reason" | "snippets": [{"text", "source", "score"}], "sources": {name: p}}}
"""

from __future__ import annotations

import base64
import html
import json

from cbm_lm.eval.report import METRICS

CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:70em;color:#222;line-height:1.4}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}
table.metrics{border-collapse:collapse;width:100%}
table.metrics td,table.metrics th{border:1px solid #ddd;padding:4px 8px;vertical-align:top}
table.metrics td.value{font-family:monospace;text-align:right;white-space:nowrap}
td.missing{color:#999}
.panel{border:1px solid #ccc;border-radius:6px;padding:0.8em;margin:1em 0}
.prompt{background:#f4f4f4;padding:0.4em;white-space:pre-wrap;font-family:monospace}
.chunk{border-left:4px solid #268bd2;margin:0.6em 0;padding-left:0.6em}
.chunk-text{font-family:monospace;white-space:pre-wrap;background:#eef5fb;padding:0.2em}
.heatmap{font-family:monospace;white-space:pre-wrap;line-height:1.8;margin:0.3em 0}
.heatmap span{padding:1px 0;border-radius:2px}
.concepts td{padding:1px 8px;font-size:0.9em}
.provenance{background:#fbf8ee;border:1px dashed #b58900;padding:0.5em;margin-top:0.6em}
.provenance li{font-size:0.9em}
.boundary{color:#cb4b16;font-weight:bold}
img{max-width:100%}
"""


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return html.escape(str(value))


def _metric_table(report: dict) -> str:
    missing = report["details"].get("missing", {})
    rows = ["<table class='metrics' id='metric-table'><tr><th>metric</th><th>value</th>"
            "<th>meaning</th></tr>"]
    for key, meaning in METRICS.items():
        value = report.get(key)
        note = (f"<br><i>not measured: {html.escape(missing.get(key, ''))}</i>"
                if value is None else "")
        cls = "value missing" if value is None else "value"
        rows.append(f"<tr><td>{key}</td><td class='{cls}'>{_fmt(value)}</td>"
                    f"<td>{html.escape(meaning)}{note}</td></tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _heat(score: float) -> str:
    """Background for an attribution score in [-1, 1]: red positive, blue negative."""
    a = min(abs(score), 1.0) * 0.85
    return f"rgba(220,50,47,{a:.2f})" if score >= 0 else f"rgba(38,139,210,{a:.2f})"


def _chunk(i: int, chunk: dict) -> str:
    heat = "".join(f"<span style='background:{_heat(t['score'])}' title='{t['score']:+.3f}'>"
                   f"{html.escape(t['text'])}</span>" for t in chunk["context"])
    rows = "".join(f"<tr><td>{html.escape(c['name'])}</td><td>{c['share']:.1%}</td></tr>"
                   for c in chunk["concepts"])
    return (f"<div class='chunk'><div><span class='boundary'>chunk {i + 1}</span></div>"
            f"<div class='chunk-text'>{html.escape(chunk['text'])}</div>"
            f"<div>input attribution (context that caused this chunk; red raises, blue lowers):"
            f"</div><div class='heatmap'>{heat}</div>"
            f"<table class='concepts'><tr><th>top concepts</th><th>share (signed)</th></tr>{rows}"
            f"<tr><td><i>unknown concepts (all)</i></td><td>{chunk['unknown_share']:.1%}</td></tr>"
            f"<tr><td><i>epsilon</i></td><td>{chunk['epsilon_share']:.1%}</td></tr></table></div>")


def _provenance(prov: dict) -> str:
    if prov.get("snippets") is None:
        return (f"<div class='provenance'><b>provenance</b>: not available: "
                f"{html.escape(prov.get('reason', ''))}</div>")
    items = "".join(f"<li>[{html.escape(s['source'])}, {s['score']:.3f}] "
                    f"{html.escape(s['text'][:300])}</li>" for s in prov["snippets"])
    dist = ", ".join(f"{html.escape(k)} {v:.0%}" for k, v in prov.get("sources", {}).items())
    return (f"<div class='provenance'><b>provenance</b>: training chunks this came from"
            f"<ol>{items}</ol><div>source distribution: {dist}</div></div>")


def _panel(n: int, panel: dict) -> str:
    chunks = "".join(_chunk(i, c) for i, c in enumerate(panel["chunks"]))
    return (f"<div class='panel' id='panel-{n}'><h3>{html.escape(panel['title'])}</h3>"
            f"<div>prompt:</div><div class='prompt'>{html.escape(panel['prompt'])}</div>"
            f"<div>{html.escape(panel['origin'])}, split into chunks:</div>{chunks}"
            f"{_provenance(panel['provenance'])}</div>")


def _img(name: str, png: bytes) -> str:
    data = base64.b64encode(png).decode()
    return f"<figure><img alt='{name}' src='data:image/png;base64,{data}'><figcaption>{name}" \
           f"</figcaption></figure>"


def render(report: dict, panels: list[dict], figures: dict[str, bytes], title: str) -> str:
    identity = {k: report[k] for k in ("checkpoint_step", "seed", "corpus_hash")}
    body = [f"<h1>{html.escape(title)}</h1>",
            f"<p>{html.escape(json.dumps(identity))}</p>",
            "<h2>Metrics</h2>", _metric_table(report),
            "<h2>Held-out prompts explained</h2>"]
    body += [_panel(i, p) for i, p in enumerate(panels)] or ["<p>no prompts</p>"]
    body.append("<h2>Figures</h2>")
    body += [_img(name, png) for name, png in figures.items()] or ["<p>no figures</p>"]
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")
