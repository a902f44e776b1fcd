"""Ablations of the training recipe, measured by the attribution-eval binary.

    python benchmarks/fidelity.py --corpus runs/demo/corpus --out runs/fidelity \
        [--steps 1200] [--objectives autoregressive,diffusion] [--variants base,no_tf,...]

For each objective and each variant (the demo recipe with one change switched), trains
the recipe with launch/train.py, then runs launch/attribution_eval.py on the run, with
a same-size run without the concept layer (no epsilon dropout, no concept terms, so the
LM reads h exactly) as the perplexity baseline. Prints and writes OUT/fidelity.md: held-out
concept AUROC, logit shares, dead real concepts, perplexity against the baseline, steering
success and held-out masked CE (diffusion). Runs already finished in OUT are reused, so
an interrupted sweep resumes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app, flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each variant: the demo recipe with these --config overrides.
VARIANTS = {
    "base": [],
    "no_concept_layer": ["loss.epsilon_dropout=0.0", "loss.concept_weight=0.0",
                         "loss.reconstruction_weight=0.0", "loss.independence_weight=0.0",
                         "loss.teacher_forcing_start=0.0", "loss.cfg_dropout=0.0"],
    "soft_linear_tf": ["loss.teacher_forcing=soft", "loss.teacher_forcing_schedule=linear"],
    "no_unknown_tf": ["loss.unknown_teacher_forcing=False"],
    "rec_target_predicted": ["loss.reconstruction_target=predicted"],
    "eps_dropout_0.5": ["loss.epsilon_dropout=0.5"],
    "no_cfg_dropout": ["loss.cfg_dropout=0.0"],
    "all_known_slots": ["data.known_concepts_from_corpus=False"],
    "uniform_noise": ["loss.diffusion_noise=uniform"],
    "no_context_window": ["loss.context_window=0"],
}
CONFIGS = {"autoregressive": "gin_configs/tiny.py", "diffusion": "gin_configs/tiny_diffusion.py"}
DIFFUSION_ONLY = {"uniform_noise", "no_context_window"}
COLUMNS = ("concept_auroc_macro", "logit_share_known", "logit_share_unknown",
           "logit_share_epsilon", "dead_real_concepts", "perplexity", "baseline_perplexity",
           "steering_success", "eval_masked_ce")

_CORPUS = flags.DEFINE_string("corpus", "runs/demo/corpus", "Corpus built by build_corpus.")
_OUT = flags.DEFINE_string("out", "runs/fidelity", "Where runs and the table go.")
_STEPS = flags.DEFINE_integer("steps", 1200, "Training steps per run (make demo's).")
_OBJ = flags.DEFINE_list("objectives", list(CONFIGS), "Objectives to sweep.")
_VAR = flags.DEFINE_list("variants", list(VARIANTS), "Variants to run.")
_NUM = flags.DEFINE_integer("num_examples", 64, "Held-out documents per eval.")


def _run(cmd: list[str], log: str) -> None:
    with open(log, "w") as f:
        rc = subprocess.call(["nice", "-n", "5", sys.executable, *cmd], cwd=_ROOT, stdout=f,
                             stderr=subprocess.STDOUT)
    if rc:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed (rc={rc}); see {log}")


def train_and_eval(objective: str, variant: str, out: str, baseline: str | None) -> dict:
    """Trains one run (unless finished) and evaluates it; returns the table row."""
    run = os.path.join(out, objective, variant)
    report = os.path.join(run, "eval", "report.json")
    if not os.path.exists(report):
        os.makedirs(run, exist_ok=True)
        overrides = [f"--config.{o}" for o in VARIANTS[variant]]
        _run(["launch/train.py", "--config", CONFIGS[objective], "--workdir", run,
              f"--config.data.dir={_CORPUS.value}", f"--config.train.num_steps={_STEPS.value}",
              *overrides], os.path.join(run, "train.log"))
        _run(["launch/attribution_eval.py", "--workdir", run, "--out", os.path.join(run, "eval"),
              f"--num_examples={_NUM.value}",
              *([f"--baseline_workdir={baseline}"] if baseline else [])],
             os.path.join(run, "eval.log"))
    with open(report) as f:
        row = json.load(f)
    metrics = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl")) if line.strip()]
    evals = [m for m in metrics if "eval_masked_ce" in m]
    row["eval_masked_ce"] = evals[-1]["eval_masked_ce"] if evals else None
    if row.get("dead_real_concepts") is None:   # the trainer's held-out measure, if the binary has none
        last = [m for m in metrics if "eval_dead_known_fraction" in m]
        row["dead_real_concepts"] = last[-1]["eval_dead_known_fraction"] if last else None
    return row


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def main(argv):
    del argv
    out = os.path.abspath(_OUT.value)
    lines = ["| objective | variant | " + " | ".join(COLUMNS) + " |",
             "|" + "---|" * (len(COLUMNS) + 2)]
    for objective in _OBJ.value:
        base_run = None
        if "no_concept_layer" in _VAR.value:   # trained first: the others' baseline
            train_and_eval(objective, "no_concept_layer", out, None)
            base_run = os.path.join(out, objective, "no_concept_layer")
        for variant in _VAR.value:
            if objective == "autoregressive" and variant in DIFFUSION_ONLY:
                continue
            row = train_and_eval(objective, variant, out, base_run)
            lines.append(f"| {objective} | {variant} | "
                         + " | ".join(_fmt(row.get(c)) for c in COLUMNS) + " |")
            print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    with open(os.path.join(out, "fidelity.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    app.run(main)
