"""report.json: the promised keys at top level, everything else nested under "details".

Top level, exactly:

  perplexity, baseline_perplexity, concept_auroc_macro, concept_prauc_macro,
  dead_real_concepts, logit_share_known, logit_share_unknown, logit_share_epsilon,
  decomposition_max_error, input_attribution_deletion_auc, random_deletion_auc,
  provenance_recall_at_10, provenance_mrr, bm25_recall_at_10, source_accuracy,
  steering_success, steering_perplexity_ratio,
  checkpoint_step, config, seed, corpus_hash, details

A metric that could not be measured is null, and details.missing[key] says why.
The output directory is written to a temporary sibling and renamed into place,
so a failed run leaves OUT as it was.
"""

from __future__ import annotations

import json
import math
import os

from etils import epath

# key -> one-line meaning (shown in the HTML metric table)
METRICS = {
    "perplexity": "held-out perplexity (autoregressive: exact; diffusion: exp of the ELBO bound)",
    "baseline_perplexity": "the same for --baseline_workdir (a run without the concept layer)",
    "concept_auroc_macro": "chunk-level concept detection by the known head (soft-OR over the "
                           "chunk's tokens), AUROC averaged over concepts",
    "concept_prauc_macro": "the same ranking scored by average precision (PR-AUC)",
    "dead_real_concepts": "share of the corpus's concepts labelled in the held-out windows that "
                          "are never in the known head's active top-k there (padding slots "
                          "never counted)",
    "logit_share_known": "mean share of |logit| carried by known (supervised) concepts",
    "logit_share_unknown": "mean share of |logit| carried by unknown (discovered) concepts",
    "logit_share_epsilon": "mean share of |logit| left to epsilon, the unexplained residual",
    "decomposition_max_error": "max |known + unknown + epsilon - logit| over explained tokens "
                               "(the identity; should be ~0)",
    "input_attribution_deletion_auc": "mean log p(token) as context tokens are masked in "
                                      "attribution order (lower = more faithful)",
    "random_deletion_auc": "the same with context tokens masked in random order (reference)",
    "provenance_recall_at_10": "planted facts whose source chunk is in the top 10 retrieved by "
                               "chunk provenance",
    "provenance_mrr": "mean reciprocal rank of the planted fact's source chunk",
    "bm25_recall_at_10": "the same Recall@10 for BM25 over the training chunks (lexical baseline)",
    "source_accuracy": "held-out chunks whose top retrieved source is their own source",
    "steering_success": "share of steered concepts detected (independent bag-of-words classifier) "
                        "in steered generations above their unsteered rate",
    "steering_perplexity_ratio": "perplexity of steered over unsteered generations, under the "
                                 "model",
}
IDENTITY = ("checkpoint_step", "config", "seed", "corpus_hash")
TOP_LEVEL = tuple(METRICS) + IDENTITY + ("details",)


class OutputError(OSError):
    """The output directory cannot be written."""


class MetricUnavailable(ValueError):
    """The data cannot support a metric (e.g. no held-out token has enough context): the
    runner reports the metric as null with this message in details.missing[key] and goes
    on; it is not an error of the run."""


def finite_or_none(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def build_report(metrics: dict, missing: dict, identity: dict, details: dict) -> dict:
    """Assembles the report; a metric absent from ``metrics`` (or not finite) is null + a reason."""
    report = {}
    missing = dict(missing)
    for key in METRICS:
        value = finite_or_none(metrics.get(key))
        if value is None and key not in missing:
            missing[key] = ("not finite" if key in metrics and metrics[key] is not None
                            else "not measured")
        report[key] = value
    for key in IDENTITY:
        report[key] = identity[key]
    report["details"] = dict(details, missing={k: v for k, v in missing.items()
                                               if report.get(k) is None})
    assert tuple(report) == TOP_LEVEL
    return report


def _path(out_dir: str) -> epath.Path:
    return epath.Path(out_dir if "://" in str(out_dir) else os.path.abspath(out_dir))


def prepare_output(out_dir: str) -> str:
    """Creates and returns an empty temporary sibling of out_dir (local or gs://, via
    etils.epath); errors name the path."""
    out = _path(out_dir)
    parent = out.parent
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out}: exists and is not a directory; expected a directory "
                          f"to write report.json and report.html into")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f"{out.name}.tmp-{os.getpid()}"
        if tmp.exists():
            tmp.rmtree()
        tmp.mkdir()
    except OSError as e:
        raise OutputError(f"--out {out}: cannot write in {parent} ({e.strerror or e}); expected "
                          f"a writable location") from e
    return str(tmp)


def discard_output(tmp: str) -> None:
    """Removes a temporary output directory after a failed run."""
    if epath.Path(tmp).exists():
        epath.Path(tmp).rmtree()


def commit_output(tmp: str, out_dir: str) -> None:
    """Swaps the finished tmp directory in for out_dir (an old out_dir goes only after)."""
    out = _path(out_dir)
    old = out.parent / f"{out.name}.old-{os.getpid()}"
    if out.is_dir():
        out.rename(old)
    epath.Path(tmp).rename(out)
    if old.exists():
        old.rmtree()


def write_json(path: str, report: dict) -> None:
    epath.Path(path).write_text(json.dumps(report, indent=2, sort_keys=False, allow_nan=False)
                                + "\n")
