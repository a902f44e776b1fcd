"""Generates from a cbm_lm checkpoint and explains every output chunk.

  python tools/generate.py --checkpoint DIR (--prompt TEXT | --prompt_ids FILE.npy)
      [--max_new_tokens N] [--seed S] [--top_p P] [--amplify NAME=VALUE ...]
      [--suppress NAME ...] [--intervene NAME=WEIGHT ...] [--json]

Prints the prompt and each output chunk of the generated text with its
explanation (top concepts and epsilon's share, top input tokens, training
chunks when the run has a provenance index; --n_steps, --top_k and
--input_scope shape it), or with --json one object per prompt (a list when
--prompt_ids holds several):

  {"prompt_ids", "prompt", "tokens", "text",
   "chunks": [{"start", "end", "text", "top_concepts": [...], "epsilon_share",
               "top_input_tokens": [...]}]}

DIR is a training workdir or an imported Steerling checkpoint; the tokenizer
and concept names come from --corpus_dir, else the corpus the checkpoint was
trained on (cbm_lm.api.Explainer.load). Concepts are named as in
concepts.json, by id, or u<id> for discovered ones.
"""

from __future__ import annotations

import json
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from absl import app, flags, logging  # noqa: E402

_CKPT = flags.DEFINE_string("checkpoint", None, "cbm_lm checkpoint directory.", required=True)
_CORPUS = flags.DEFINE_string("corpus_dir", None, "Corpus dir (tokenizer, concepts.json).")
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text.")
_PROMPT_IDS = flags.DEFINE_string("prompt_ids", None, "[P] or [B,P] int .npy of prompt ids.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_TOP_P = flags.DEFINE_float("top_p", 0.8, "Top-p of the sampler.")
_ENTROPY = flags.DEFINE_bool("entropy_sampling", True, "Entropy-adaptive temperature "
                             "(Steerling's default); --noentropy_sampling uses --temperature.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.2, "Sampling temperature; read only with "
                                  "--noentropy_sampling.")
_AMPLIFY = flags.DEFINE_multi_string("amplify", [], "NAME=VALUE: inject the concept, VALUE logits.")
_SUPPRESS = flags.DEFINE_multi_string("suppress", [], "NAME: suppress the concept.")
_INTERVENE = flags.DEFINE_multi_string("intervene", [], "NAME=WEIGHT: override a concept weight.")
_JSON = flags.DEFINE_bool("json", False, "Print JSON (the same per-chunk explanations).")
_N_STEPS = flags.DEFINE_integer("n_steps", 16, "Integrated-gradients steps (1 = grad x input).",
                                lower_bound=1)
_TOP_K = flags.DEFINE_integer("top_k", 5, "Concepts and input tokens listed per chunk.",
                              lower_bound=1)
_SCOPE = flags.DEFINE_enum("input_scope", "all", ["prompt", "generated", "all"],
                           "Input positions the input attribution ranks.")


def _pairs(flag: str, values: list[str]) -> dict[str, float]:
    out = {}
    for v in values:
        name, sep, num = v.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            out[name] = float(num)
        except ValueError:
            raise app.UsageError(f"--{flag}={v!r}: expected NAME=VALUE with a number") from None
    return out


def _prompt_ids():
    from cbm_lm.inference.prompts import load_prompt_ids
    try:
        return load_prompt_ids(_PROMPT_IDS.value)
    except (FileNotFoundError, ValueError) as e:
        raise app.UsageError(f"--prompt_ids: {e}") from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if (_PROMPT.value is None) == (_PROMPT_IDS.value is None):
        raise app.UsageError("give exactly one of --prompt and --prompt_ids")
    logging.set_verbosity(logging.WARNING)
    amplify, intervene = _pairs("amplify", _AMPLIFY.value), _pairs("intervene", _INTERVENE.value)
    prompts = _PROMPT.value if _PROMPT.value is not None else _prompt_ids()

    from cbm_lm.api import Explainer
    from cbm_lm.train.checkpoint import CheckpointError
    try:
        ex = Explainer.load(_CKPT.value, corpus_dir=_CORPUS.value)
        steering = ex.steer(amplify=amplify or None, suppress=_SUPPRESS.value or None,
                            intervene=intervene or None)
        gen = ex.generate(prompts, max_new_tokens=_MAX_NEW.value, seed=_SEED.value,
                          top_p=_TOP_P.value, temperature=_TEMPERATURE.value,
                          use_entropy_sampling=_ENTROPY.value, steering=steering)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(f"generate: error: {e}")
    explanations = ex.explain(gen, n_steps=_N_STEPS.value, top_k=_TOP_K.value,
                              input_scope=_SCOPE.value)
    if _JSON.value:
        rows = ex.to_json(gen, explanations)
        print(json.dumps(rows[0] if len(rows) == 1 else rows, ensure_ascii=False))
        return
    print(ex.to_text(gen, explanations))


if __name__ == "__main__":
    app.run(main)
