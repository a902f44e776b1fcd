"""report.html rendered in headless Chromium: the metric table, a heatmap and the
provenance panel are present and visible (checked from the DOM)."""

from __future__ import annotations

import pytest

from browser_probe import find_chromium, probe
from cbm_lm.eval import plots, report_html
from cbm_lm.eval.report import build_report

SELECTORS = ["#metric-table", ".heatmap span", ".provenance", ".chunk-text"]


def sample_page(tmp_path):
    report = build_report({"perplexity": 12.5, "concept_auroc_macro": 0.8},
                          {"provenance_mrr": "not built"},
                          {"checkpoint_step": 3, "config": {}, "seed": 0, "corpus_hash": "ab"},
                          {})
    chunk = {"text": "the cat sat", "context": [{"text": "The", "score": 1.0},
                                                 {"text": " dog", "score": -0.4}],
             "concepts": [{"name": "topic:cats", "share": 0.4}], "unknown_share": 0.1,
             "epsilon_share": 0.5}
    panels = [{"title": "doc 1", "prompt": "The dog", "origin": "held-out continuation",
               "chunks": [chunk],
               "provenance": {"snippets": [{"text": "A cat.", "source": "pets", "score": 0.9}],
                              "sources": {"pets": 1.0}}},
              {"title": "doc 2", "prompt": "x", "origin": "held-out continuation",
               "chunks": [chunk], "provenance": {"reason": "no index"}}]
    curves = plots.training_curves([{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}])
    path = tmp_path / "report.html"
    path.write_text(report_html.render(report, panels, {"training curves": curves}, "t"))
    return path


@pytest.fixture(scope="module")
def chromium():
    path, why = find_chromium()
    if path is None:
        pytest.skip(f"headless Chromium unavailable: {why}")
    return path


def test_report_panels_are_visible_in_chromium(tmp_path, chromium):
    seen = probe(str(sample_page(tmp_path)), SELECTORS + ["#no-such-thing"], chromium)
    assert seen == {**{s: True for s in SELECTORS}, "#no-such-thing": False, "img loaded": True}


def test_hidden_parts_read_as_hidden(tmp_path, chromium):
    # The probe itself must be able to fail: hide the heatmap with CSS.
    path = sample_page(tmp_path)
    path.write_text(path.read_text().replace("</style>", ".heatmap{display:none}</style>"))
    seen = probe(str(path), SELECTORS, chromium)
    assert seen[".heatmap span"] is False and seen["#metric-table"] is True
