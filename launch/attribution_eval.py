"""Attribution eval: a checkpoint -> measured interpretability numbers and a readable report.

  python launch/attribution_eval.py --workdir runs/demo/train --out OUT
  python launch/attribution_eval.py --checkpoint CKPT_DIR --data CORPUS_DIR --out OUT

Writes OUT/report.json (the metrics at top level, details nested),
OUT/report.html (self-contained) and OUT/plots/*.png. Restores params only
(no training loop), on whatever devices this process has.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from absl import app, flags, logging  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run: newest checkpoint, its config "
                               "and its corpus (data.dir).")
_CKPT = flags.DEFINE_string("checkpoint", None, "A checkpoint directory (e.g. an imported "
                            "Steerling one); needs --data.")
_DATA = flags.DEFINE_string("data", None, "Corpus directory (default: the config's data.dir).")
_OUT = flags.DEFINE_string("out", None, "Output directory for report.json / report.html.")
_NUM = flags.DEFINE_integer("num_examples", 256, "Held-out documents to evaluate on.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for the held-out draw, masks and random orders.")
_BASE = flags.DEFINE_string("baseline_workdir", None, "A same-size run without the concept "
                            "layer, for baseline_perplexity.")
_PROMPTS = flags.DEFINE_integer("num_prompts", 3, "Held-out prompts explained in the HTML.")
_STEER = flags.DEFINE_integer("steering_concepts", 6, "Concepts amplified in the steering test "
                              "(0 skips it).")
_STEER_MIN = flags.DEFINE_integer("steering_min_chunks", 20, "Sampled training chunks a concept "
                                  "must label for the steering test's detector.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:   # orbax logs every file at INFO
        logging.set_verbosity(logging.WARNING)
    if not _OUT.value:
        raise app.UsageError("--out is required")
    if _CKPT.value and not _DATA.value:
        raise app.UsageError("--checkpoint needs --data CORPUS_DIR")
    if _NUM.value < 1:
        raise app.UsageError(f"--num_examples={_NUM.value}: expected >= 1 held-out document")
    import jax

    from cbm_lm.eval.report import OutputError
    from cbm_lm.eval.runner import EvalOptions, run_eval
    from cbm_lm.eval.target import EvalInputError, load_target

    try:
        print(f"restoring {_WORKDIR.value or _CKPT.value} on {jax.device_count()} "
              f"{jax.devices()[0].platform} device(s)", flush=True)
        target = load_target(workdir=_WORKDIR.value, checkpoint=_CKPT.value, data=_DATA.value)
        print(f"step {target.step}, {target.model_cfg.objective}, corpus {target.corpus.dir}",
              flush=True)
        report = run_eval(target, _OUT.value, EvalOptions(
            num_examples=_NUM.value, seed=_SEED.value, baseline_workdir=_BASE.value,
            num_prompts=_PROMPTS.value, steering_concepts=_STEER.value,
            steering_min_chunks=_STEER_MIN.value))
    except (EvalInputError, OutputError) as e:
        sys.exit(f"attribution_eval: error: {e}")
    out = os.path.abspath(_OUT.value)
    print("headline:", flush=True)
    for k in ("perplexity", "concept_auroc_macro", "dead_real_concepts", "logit_share_known", "logit_share_unknown",
              "logit_share_epsilon", "decomposition_max_error", "input_attribution_deletion_auc",
              "random_deletion_auc", "provenance_recall_at_10", "steering_success"):
        v = report[k]
        print(f"  {k:32s} {'null (' + report['details']['missing'].get(k, '') + ')' if v is None else f'{v:.4g}'}")
    print(f"report: {os.path.join(out, 'report.html')}", flush=True)


if __name__ == "__main__":
    app.run(main)
