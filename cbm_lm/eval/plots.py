"""The report's figures (matplotlib, Agg): training curves, deletion curves, AUROC per concept.

Each function returns PNG bytes (or None when there is nothing to draw); the
report writer saves them beside report.html and inlines them as base64.
"""

from __future__ import annotations

import io
import json

import matplotlib
from etils import epath

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CURVE_PANELS = (
    ("loss", ("loss", "lm_loss", "eval_lm_loss")),
    ("concept loss / AUROC", ("concept_loss", "concept_auroc", "eval_concept_auroc")),
    ("share of the logit", ("share_known", "share_unknown", "share_epsilon")),
)


def read_metrics(workdir: str) -> list[dict]:
    """The records of WORKDIR/metrics.jsonl (empty if there is none)."""
    path = epath.Path(workdir) / "metrics.jsonl"      # any epath filesystem (gs://, memory://)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def training_curves(records: list[dict]) -> bytes | None:
    panels = [(title, [k for k in keys if any(k in r for r in records)])
              for title, keys in CURVE_PANELS]
    panels = [(t, ks) for t, ks in panels if ks]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for k in keys:
            pts = [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="o" if k.startswith("eval_") else None, ms=3, label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return _png(fig)


def deletion_curves(fractions, attribution_curve, random_curve) -> bytes:
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(fractions, attribution_curve, marker="o", ms=3, label="attribution order")
    ax.plot(fractions, random_curve, marker="o", ms=3, label="random order")
    ax.set_xlabel("fraction of context masked")
    ax.set_ylabel("mean log p(explained token)")
    ax.set_title("deletion test")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def concept_auroc_histogram(per_concept: list[dict]) -> bytes | None:
    if not per_concept:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.hist([p["auroc"] for p in per_concept], bins=20, range=(0, 1))
    ax.axvline(0.5, color="gray", ls="--", lw=1)
    ax.set_xlabel("held-out chunk AUROC")
    ax.set_ylabel("concepts")
    ax.set_title(f"concept detection ({len(per_concept)} concepts)")
    return _png(fig)
