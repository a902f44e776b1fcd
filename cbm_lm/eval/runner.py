"""One evaluation: restored checkpoint -> every metric -> OUT/{report.json, report.html, *.png}.

  target = load_target(workdir=...)            (cbm_lm.eval.target)
  report = run_eval(target, out_dir, EvalOptions(...))

Everything is written into a temporary sibling of OUT and renamed into place
at the end, so a failure leaves OUT as it was. A stage the data cannot support
raises MetricUnavailable (cbm_lm.eval.report): its metrics are null, the reason
is in details.missing, and the other stages run.
"""

from __future__ import annotations

import dataclasses
import os

from etils import epath

from cbm_lm.eval import plots, report as report_lib, report_html
from cbm_lm.eval.concept_detection import concept_detection
from cbm_lm.eval.dead_concepts import dead_concepts
from cbm_lm.eval.heldout import heldout_windows
from cbm_lm.eval.input_faithfulness import input_deletion
from cbm_lm.eval.logit_shares import logit_shares
from cbm_lm.eval.panels import generation_panels
from cbm_lm.eval.perplexity import perplexity
from cbm_lm.eval.progress import Progress
from cbm_lm.eval.provenance_eval import provenance_eval
from cbm_lm.eval.report import MetricUnavailable
from cbm_lm.eval.steering_eval import SteeringUnavailable, steering_eval
from cbm_lm.eval.target import EvalInputError, EvalTarget, load_target

PROVENANCE_KEYS = ("provenance_recall_at_10", "provenance_mrr", "bm25_recall_at_10",
                   "source_accuracy")
STEERING_KEYS = ("steering_success", "steering_perplexity_ratio")
SHARE_KEYS = ("logit_share_known", "logit_share_unknown", "logit_share_epsilon",
              "decomposition_max_error")
DELETION_KEYS = ("input_attribution_deletion_auc", "random_deletion_auc")


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    num_examples: int = 256       # held-out windows (documents)
    seed: int = 0
    batch: int = 8                # rows per forward pass
    baseline_workdir: str | None = None
    num_prompts: int = 3          # explained prompts in the HTML report
    deletion_tokens: int = 24     # explained tokens in the deletion test
    ig_steps: int = 8             # integrated-gradients Riemann steps
    min_positives: int = 5        # positive chunks a concept needs to count in the macro AUROC
    elbo_draws: int = 4           # mask draws of the diffusion ELBO
    steering_concepts: int = 6    # concepts amplified in the steering test
    steering_min_chunks: int = 20  # sampled training chunks a steered concept's detector needs


def run_eval(target: EvalTarget, out_dir: str, opts: EvalOptions = EvalOptions()) -> dict:
    tmp = report_lib.prepare_output(out_dir)
    try:
        report = _evaluate(target, tmp, opts)
    except BaseException:
        report_lib.discard_output(tmp)
        raise
    report_lib.commit_output(tmp, out_dir)
    return report


def _evaluate(target: EvalTarget, tmp: str, opts: EvalOptions) -> dict:
    model, cfg, corpus = target.model, target.config, target.corpus
    loss_cfg = cfg.get("loss", {}) or {}
    clean_context = bool(loss_cfg.get("diffusion_clean_context", True))
    t_min = float(loss_cfg.get("diffusion_t_min", 1e-3))
    seq_len = min(int((cfg.get("data", {}) or {}).get("seq_len", model.config.max_seq_len)),
                  model.config.max_seq_len)
    n_concepts = len(corpus.concepts)
    metrics, missing, details = {}, {}, {}
    progress = Progress({"data": 1, "ppl": 2, "base": 2 if opts.baseline_workdir else 0,
                         "concepts": 2, "dead": 1, "shares": 2, "deletion": 4, "steering": 1,
                         "provenance": 1, "panels": 3, "write": 1})

    progress.start("data", f"reading {opts.num_examples} held-out documents of {corpus.dir}")
    try:
        windows = heldout_windows(corpus, opts.num_examples, seq_len, opts.seed)
    except (KeyError, ValueError) as e:    # no held-out split / document, num_examples < 1
        raise EvalInputError(str(e.args[0]) if e.args else repr(e)) from e
    details["heldout"] = {"windows": windows.num_rows, "seq_len": seq_len,
                          "chunks": len(windows.chunks),
                          "tokens": int(windows.segment_ids.sum())}
    progress.finish(f"{windows.num_rows} windows, {len(windows.chunks)} chunks")

    progress.start("ppl", "perplexity on the held-out windows")
    try:
        ppl = perplexity(model, windows, seed=opts.seed, batch=opts.batch,
                         num_draws=opts.elbo_draws, t_min=t_min, clean_context=clean_context)
    except MetricUnavailable as e:
        _skip(progress, missing, ("perplexity",), f"perplexity: {e}")
    else:
        metrics["perplexity"] = ppl.perplexity
        details["perplexity"] = dataclasses.asdict(ppl)
        progress.finish(f"perplexity {ppl.perplexity:.3f} ({ppl.method})")

    if opts.baseline_workdir:
        progress.start("base", f"baseline perplexity of {opts.baseline_workdir}")
        base = load_target(workdir=opts.baseline_workdir)
        bppl = perplexity(base.model, windows, seed=opts.seed, batch=opts.batch,
                          num_draws=opts.elbo_draws, t_min=t_min, clean_context=clean_context)
        metrics["baseline_perplexity"] = bppl.perplexity
        details["baseline_perplexity"] = dict(dataclasses.asdict(bppl),
                                              workdir=opts.baseline_workdir, step=base.step)
        progress.finish(f"baseline perplexity {bppl.perplexity:.3f}")
    else:
        missing["baseline_perplexity"] = "no --baseline_workdir given"

    progress.start("concepts", f"chunk-level detection of {n_concepts} concepts")
    token_level = [c.id for c in corpus.concepts.concepts if c.level == "token"]
    det, tok = concept_detection(model, windows, n_concepts, min_positives=opts.min_positives,
                                 batch=opts.batch, token_concepts=token_level)
    metrics["concept_auroc_macro"], metrics["concept_prauc_macro"] = det.auroc_macro, det.prauc_macro
    details["concept_detection"] = {
        "concepts_counted": det.num_concepts, "chunks": det.num_chunks,
        "mean_pooled_auroc_macro": det.mean_pooled_auroc_macro,
        "min_positives": opts.min_positives,
        "by_group": det.by_group(corpus.concepts.name),
        "per_concept": [dict(p, name=corpus.concepts.name(p["id"])) for p in det.per_concept],
        # token-level concepts (no chunk labels): AUROC per position against the token labels
        "token_level": {
            "auroc_macro": tok.auroc_macro, "prauc_macro": tok.prauc_macro,
            "concepts_counted": tok.num_concepts, "positions": tok.num_chunks,
            "by_group": tok.by_group(corpus.concepts.name),
            "per_concept": [dict(p, name=corpus.concepts.name(p["id"]))
                            for p in tok.per_concept]}}
    if det.auroc_macro is None:
        for k in ("concept_auroc_macro", "concept_prauc_macro"):
            missing[k] = (f"no concept has {opts.min_positives} positive chunks in the "
                          f"{windows.num_rows} held-out windows")
    progress.finish(f"AUROC {det.auroc_macro} over {det.num_concepts} concepts; token-level "
                    f"{tok.auroc_macro} over {tok.num_concepts} concepts")

    progress.start("dead", "real concepts never in the known head's active set")
    try:
        dead = dead_concepts(model, windows, n_concepts, batch=opts.batch)
    except MetricUnavailable as e:
        _skip(progress, missing, ("dead_real_concepts",), f"dead concepts: {e}")
    else:
        metrics["dead_real_concepts"] = dead.fraction
        details["dead_concepts"] = dict(dataclasses.asdict(dead), dead_names=[
            corpus.concepts.name(j) for j in dead.dead_ids])
        progress.finish(f"{len(dead.dead_ids)}/{dead.num_present} labelled concepts dead "
                        f"({dead.fraction:.3f}); never confident (sigmoid > 0.5): "
                        f"{dead.fraction_confident:.3f}; of all {n_concepts}: "
                        f"{dead.fraction_all:.3f}")

    progress.start("shares", "logit decomposition of every explained held-out token")
    details["logit_shares"] = {}
    try:
        sh = logit_shares(model, windows, seed=opts.seed, batch=opts.batch,
                          clean_context=clean_context)
    except MetricUnavailable as e:
        _skip(progress, missing, SHARE_KEYS, f"logit shares: {e}")
    else:
        metrics.update(logit_share_known=sh.known, logit_share_unknown=sh.unknown,
                       logit_share_epsilon=sh.epsilon, decomposition_max_error=sh.max_error)
        details["logit_shares"] = {"tokens": sh.num_tokens, "percentiles": sh.percentiles}
        progress.finish(f"known {sh.known:.3f} unknown {sh.unknown:.3f} epsilon "
                        f"{sh.epsilon:.3f}, identity error {sh.max_error:.2e} over "
                        f"{sh.num_tokens} tokens")

    figures = {}
    progress.start("deletion", f"deletion test on {opts.deletion_tokens} explained tokens")
    try:
        dl = input_deletion(model, windows, num_tokens=opts.deletion_tokens,
                            ig_steps=opts.ig_steps, seed=opts.seed)
    except MetricUnavailable as e:
        _skip(progress, missing, DELETION_KEYS, f"deletion: {e}")
    else:
        metrics["input_attribution_deletion_auc"] = dl.attribution_auc
        metrics["random_deletion_auc"] = dl.random_auc
        details["deletion"] = dataclasses.asdict(dl)
        figures["deletion curves"] = plots.deletion_curves(dl.fractions, dl.attribution_curve,
                                                           dl.random_curve)
        progress.finish(f"AUC attribution {dl.attribution_auc:.3f} vs random "
                        f"{dl.random_auc:.3f}")

    progress.start("steering", f"steering test: amplifying {opts.steering_concepts} concepts")
    try:
        if not opts.steering_concepts:
            raise SteeringUnavailable("disabled (steering_concepts=0)")
        st = steering_eval(model, corpus, windows, num_concepts=opts.steering_concepts,
                           min_train_chunks=opts.steering_min_chunks, seed=opts.seed,
                           t_min=t_min, clean_context=clean_context,
                           log=lambda m: print(f"      {m}", flush=True))
    except MetricUnavailable as e:
        _skip(progress, missing, STEERING_KEYS, f"steering: {e}")
    else:
        metrics["steering_success"] = st.success
        metrics["steering_perplexity_ratio"] = st.perplexity_ratio
        details["steering"] = dataclasses.asdict(st)
        progress.finish(f"success {st.success:.2f}, perplexity ratio {st.perplexity_ratio:.3f}")

    provenance_panel = None
    progress.start("provenance", "provenance: planted-fact recall, BM25, source accuracy")
    try:
        pm, provenance_panel = provenance_eval(
            target.checkpoint_dir, model, cfg, corpus, target.step,
            log=lambda m: print(f"      {m}", flush=True))
    except MetricUnavailable as e:
        _skip(progress, missing, PROVENANCE_KEYS, f"provenance: {e}")
    else:
        metrics.update(pm)
        progress.finish("  ".join(f"{k} {v:.3f}" for k, v in pm.items()))

    progress.start("panels", f"generating and explaining {opts.num_prompts} held-out prompts")
    panels, gen_err = generation_panels(model, corpus, windows, num_prompts=opts.num_prompts,
                                        ig_steps=opts.ig_steps, seed=opts.seed,
                                        provenance=provenance_panel)
    if panels:     # the identity measured on generated tokens too (alone if shares were not)
        details["logit_shares"]["generated_tokens_max_error"] = gen_err
        metrics["decomposition_max_error"] = max(metrics.get("decomposition_max_error", gen_err),
                                                 gen_err)
    progress.finish(f"{len(panels)} panels; identity error on generated tokens {gen_err:.2e}")

    progress.start("write", "writing the report")
    records = plots.read_metrics(target.checkpoint_dir)
    for name, png in (("training curves", plots.training_curves(records)),
                      ("concept AUROC per concept", plots.concept_auroc_histogram(det.per_concept))):
        if png is not None:
            figures[name] = png
    (epath.Path(tmp) / "plots").mkdir()
    for name, png in figures.items():
        (epath.Path(tmp) / "plots" / (name.replace(" ", "_") + ".png")).write_bytes(png)
    details["run"] = {"checkpoint_dir": os.path.abspath(target.checkpoint_dir),
                      "corpus_dir": os.fspath(corpus.dir), "eval_seed": opts.seed,
                      "options": dataclasses.asdict(opts), "model_objective": model.config.objective,
                      "panels": panels}
    identity = {"checkpoint_step": target.step, "config": cfg.to_dict(),
                "seed": int(cfg.get("seed", 0)), "corpus_hash": target.corpus_hash}
    report = report_lib.build_report(metrics, missing, identity, details)
    report_lib.write_json(str(epath.Path(tmp) / "report.json"), report)
    (epath.Path(tmp) / "report.html").write_text(report_html.render(
        report, panels, figures, f"cbm_lm attribution eval: {target.checkpoint_dir} "
                                 f"step {target.step}"))
    progress.finish()
    return report


def _skip(progress: Progress, missing: dict, keys, reason: str) -> None:
    """A stage the data cannot support: its metrics are null, with ``reason``."""
    for k in keys:
        missing[k] = reason
    progress.finish("skipped: " + reason)
