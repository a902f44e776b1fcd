"""Ablations of the training recipe, measured by the attribution-eval binary.

    python benchmarks/fidelity.py --corpus runs/demo/corpus --out runs/fidelity \
        [--steps 1200] [--objectives autoregressive,diffusion] [--variants base,no_tf,...]

For each objective and each variant (the demo recipe with one change switched), trains
the recipe with launch/train.py, then runs launch/attribution_eval.py on the run. A
same-size run without the concept layer (no epsilon dropout, no concept terms, no
residual-energy pull, so the LM reads h exactly and nothing else shapes it) is the
perplexity baseline: its own report's perplexity (same held-out windows, same seed) is the
baseline_perplexity column and ppl_ratio divides by it. A variant that changes the data
or the backbone (data.* or model.* overrides other than model.concepts.*, e.g. "windows",
"width_192") is divided by a baseline trained on the same data with the same backbone
(run no_concept_layer+<those overrides>). Prints and writes OUT/fidelity.md: held-out concept AUROC, logit shares, dead real
concepts, perplexity against the baseline, steering success and held-out masked CE
(diffusion). Runs already finished in OUT are reused (a run whose metrics reach --steps
is only evaluated), so an interrupted sweep resumes.

Budget: on 2 shared CPU cores one 1200-step tiny run takes 15-40 minutes and its eval
about 5, so a full sweep is hours; pass --variants (and --steps for a quicker, noisier
ranking) to run a subset.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app, flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each variant: the demo recipe (the config file's defaults) with these --config overrides,
# i.e. one switch flipped away from the default; "base" is the recipe itself.
VARIANTS = {
    "base": [],
    "no_concept_layer": ["loss.epsilon_dropout=0.0", "loss.concept_weight=0.0",
                         "loss.reconstruction_weight=0.0", "loss.independence_weight=0.0",
                         "loss.teacher_forcing_start=0.0", "loss.cfg_dropout=0.0",
                         "loss.epsilon_weight=0.0",
                         # no refit: the concept terms are off, and the refit leaves the LM's
                         # output (this row's perplexity) as trained anyway
                         "train.key_refit_steps=0"],
    "soft_or_positives": ["loss.concept_positives=soft_or", "loss.concept_weight=1.0"],
    "token_positives": ["loss.concept_positives=token"],
    "no_unknown_tf": ["loss.unknown_teacher_forcing=False"],   # tiny_diffusion.py has it on
    "report_tf": ["loss.teacher_forcing=hard", "loss.teacher_forcing_schedule=report"],
    "unknown_tf": ["loss.unknown_teacher_forcing=True"],
    "rec_target_labels": ["loss.reconstruction_target=labels"],
    "eps_dropout_0.5": ["loss.epsilon_dropout=0.5"],   # the default until issue 13 measured 0.1
    "eps_dropout_0.2": ["loss.epsilon_dropout=0.2"],
    "eps_dropout_0.3": ["loss.epsilon_dropout=0.3"],
    "eps_dropout_0": ["loss.epsilon_dropout=0.0"],     # epsilon in every sequence's LM loss
    "cfg_dropout_0.1": ["loss.cfg_dropout=0.1"],
    "independence_report": ["loss.independence_normalization=report"],
    "all_known_slots": ["data.known_concepts_from_corpus=False"],
    "topk8": ["model.concepts.known_topk=8"],      # tiny.py keeps the top-16
    "topk32": ["model.concepts.known_topk=32"],
    # the rewrite's capacity: more discovered concepts per token leave less to epsilon
    "unknown_topk32": ["model.concepts.unknown_topk=32"],   # tiny.py keeps the top-16
    "rec_weight_3": ["loss.reconstruction_weight=3.0"],      # unknown ~ sg(h - known), harder
    # a pull on the backbone itself: ||h - k - u||^2 / ||h||^2 at the LM's positions
    "no_eps_energy": ["loss.epsilon_weight=0.0"],   # tiny.py has 0.1, tiny_diffusion.py 0.3
    "eps_energy_0.1": ["loss.epsilon_weight=0.1"],
    "eps_energy_0.3": ["loss.epsilon_weight=0.3"],
    "eps_energy_1": ["loss.epsilon_weight=1.0"],
    "eps_energy_4": ["loss.epsilon_weight=4.0"],
    "concept_balance": ["loss.concept_balance=concept"],
    # the keys' chunk-mean term off: tiny.py scores each chunk's mean logit against its labels
    # too (measured as "pooled_1" against the recipe without it on 2026-12-05, docs/fidelity.md
    # "Fidelity: the head's keys fit to the chunk-mean read-out")
    "no_pooled": ["loss.concept_pooled_weight=0.0"],
    # the known-key refit after the last step off (tiny.py refits 3600 steps over 500
    # batches' states, train/key_refit.py; docs/fidelity.md "Fidelity: the known-key refit")
    "no_key_refit": ["train.key_refit_steps=0"],
    "key_refit_1800": ["train.key_refit_steps=1800", "train.key_refit_batches=250"],
    # the concept term's pull on the backbone (tiny.py: 0.2)
    "concept_weight_0.5": ["loss.concept_weight=0.5"],
    "concept_weight_0.1": ["loss.concept_weight=0.1"],
    "concept_weight_0.3": ["loss.concept_weight=0.3"],
    # the contrast each concept sees: sampled negatives per batch (tiny.py: 256 of its 198
    # concepts, drawn with replacement; 64 before, and in tiny_diffusion.py)
    # and the positive term's weight against the negatives'
    "negatives_256": ["loss.concept_negatives=256"],
    "negatives_512": ["loss.concept_negatives=512"],
    "negatives_1024": ["loss.concept_negatives=1024"],
    "pos_weight_2": ["loss.concept_pos_weight=2.0"],
    # the data each step sees: sources by one window per document (data/source_weighting.py);
    # a data variant gets its own no_concept_layer baseline on the same data
    "windows": ["data.source_weighting=windows"],
    # the backbone's width (tiny.py: d 128, MLP 512, 4 heads); a model.* variant, like a data
    # variant, gets its own baseline of the same shape
    "width_192": ["model.d_model=192", "model.mlp_dim=768", "model.n_heads=6",
                  "model.n_kv_heads=3"],
    "natural": ["data.source_weighting=natural"],
    # the optimizer (tiny.py: peak learning rate 3e-3, cosine to 0.1 x); an optimizer.*
    # variant gets its own baseline trained with the same optimizer
    "lr_6e-3": ["optimizer.learning_rate=6e-3"],
    "lr_1e-2": ["optimizer.learning_rate=1e-2"],
    # the known head's key rows only (train/optimizer.py): 3x / 10x the rate, no decay; a
    # backbone without the head has no such rows, so these share the recipe's baseline
    "keys_no_decay": ["optimizer.known_keys_weight_decay=0.0"],
    "keys_lr_3": ["optimizer.known_keys_lr_scale=3.0", "optimizer.known_keys_weight_decay=0.0"],
    "keys_lr_10": ["optimizer.known_keys_lr_scale=10.0", "optimizer.known_keys_weight_decay=0.0"],
    # the row length at equal tokens per step: tiny.py reads 4 x 512 (measured as "seq_512"
    # against 8 x 256 on 2026-12-05, docs/fidelity.md "Fidelity: 512-token rows"); this is
    # the recipe before, with the key slots it had
    "seq_256": ["data.seq_len=256", "data.batch_size=8", "model.max_seq_len=256",
                "provenance.max_chunks_per_row=16"],
    # the backbone's depth (tiny.py: 2 layers)
    "layers_3": ["model.n_layers=3"],
    "uniform_noise": ["loss.diffusion_noise=uniform"],
    "no_context_window": ["loss.context_window=0"],
}
CONFIGS = {"autoregressive": "gin_configs/tiny.py", "diffusion": "gin_configs/tiny_diffusion.py"}
DIFFUSION_ONLY = {"uniform_noise", "no_context_window", "no_unknown_tf"}
AUTOREGRESSIVE_ONLY = {"key_refit_1800"}   # the refit is refused for diffusion models
COLUMNS = ("concept_auroc_macro", "logit_share_known", "logit_share_unknown",
           "logit_share_epsilon", "dead_real_concepts", "perplexity", "baseline_perplexity",
           "ppl_ratio", "steering_success", "eval_masked_ce")

_CORPUS = flags.DEFINE_string("corpus", "runs/demo/corpus", "Corpus built by build_corpus.")
_OUT = flags.DEFINE_string("out", "runs/fidelity", "Where runs and the table go.")
_STEPS = flags.DEFINE_integer("steps", 1200, "Training steps per run (make demo trains 1800).")
_OBJ = flags.DEFINE_list("objectives", list(CONFIGS), "Objectives to sweep.")
_VAR = flags.DEFINE_list("variants", list(VARIANTS), "Variants to run.")
_NUM = flags.DEFINE_integer("num_examples", 256, "Held-out documents per eval (the "
                            "binary's default, so the rows match make demo's report).")


def _run(cmd: list[str], log: str) -> None:
    with open(log, "w") as f:
        rc = subprocess.call(["nice", "-n", "5", sys.executable, *cmd], cwd=_ROOT, stdout=f,
                             stderr=subprocess.STDOUT)
    if rc:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed (rc={rc}); see {log}")


def _last_step(run: str) -> int:
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    steps = [json.loads(line).get("step", 0) for line in open(path) if line.strip()]
    return max(steps, default=0)


_HEAD_ONLY = ("optimizer.known_keys_",)   # no effect on a model without the concept layer


def baseline_overrides(variant: str) -> list[str]:
    """The variant's data.*, optimizer.* and backbone model.* overrides: its baseline must
    read the same data with the same backbone and optimizer (the concept layer's own
    model.concepts.* are not shared)."""
    return [o for o in VARIANTS[variant]
            if (o.startswith(("data.", "optimizer.")) and not o.startswith(_HEAD_ONLY))
            or (o.startswith("model.") and not o.startswith("model.concepts."))]


def train_and_eval(objective: str, variant: str, out: str, baseline: dict | None,
                   extra: tuple[str, ...] = ()) -> dict:
    """Trains one run (unless trained) and evaluates it (unless evaluated); returns the row.
    ``extra``: overrides after the variant's (a baseline's data variant), in the run's name."""
    run = os.path.join(out, objective, "+".join([variant, *extra]))
    report = os.path.join(run, "eval", "report.json")
    if not os.path.exists(report):
        os.makedirs(run, exist_ok=True)
        if _last_step(run) < _STEPS.value:   # launch/train.py resumes a cut run
            overrides = [f"--config.{o}" for o in [*VARIANTS[variant], *extra]]
            _run(["launch/train.py", "--config", CONFIGS[objective], "--workdir", run,
                  f"--config.data.dir={_CORPUS.value}",
                  f"--config.train.num_steps={_STEPS.value}", *overrides],
                 os.path.join(run, "train.log"))
        _run(["launch/attribution_eval.py", "--workdir", run, "--out", os.path.join(run, "eval"),
              f"--num_examples={_NUM.value}"], os.path.join(run, "eval.log"))
    with open(report) as f:
        row = json.load(f)
    if baseline is not None and row.get("perplexity") and baseline.get("perplexity"):
        row["baseline_perplexity"] = baseline["perplexity"]
        row["ppl_ratio"] = row["perplexity"] / baseline["perplexity"]
    metrics = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl")) if line.strip()]
    evals = [m for m in metrics if "eval_masked_ce" in m]
    row["eval_masked_ce"] = evals[-1]["eval_masked_ce"] if evals else None
    return row


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def main(argv):
    del argv
    out = os.path.abspath(_OUT.value)
    lines = ["| objective | variant | " + " | ".join(COLUMNS) + " |",
             "|" + "---|" * (len(COLUMNS) + 2)]
    for objective in _OBJ.value:
        base = None
        if "no_concept_layer" in _VAR.value:   # trained first: the others' baseline
            base = train_and_eval(objective, "no_concept_layer", out, None)
        for variant in _VAR.value:
            if objective == "autoregressive" and variant in DIFFUSION_ONLY:
                continue
            if objective == "diffusion" and variant in AUTOREGRESSIVE_ONLY:
                continue
            own = baseline_overrides(variant)
            row = train_and_eval(objective, variant, out,
                                 train_and_eval(objective, "no_concept_layer", out, None,
                                                tuple(own)) if own and base else base)
            lines.append(f"| {objective} | {variant} | "
                         + " | ".join(_fmt(row.get(c)) for c in COLUMNS) + " |")
            print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    with open(os.path.join(out, "fidelity.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    app.run(main)
