"""Writes a markdown report explaining a checkpoint through its concepts.

  python tools/explain.py --checkpoint DIR [--corpus_dir CORPUS] [--text "..."] --out report.md

Sections (cbm_lm/eval/checkpoint_report.py): the training summary against the
corpus's unigram entropy, and the exact concept decomposition (plus the
integrated-gradients context tokens) of held-out text: the first held-out
document of CORPUS, or --text, or --input_ids, or random ids. The explanation
is cbm_lm.api.Explainer's (teacher_forced + attribute).
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from absl import app, flags, logging  # noqa: E402

_CKPT = flags.DEFINE_string("checkpoint", None, "cbm_lm checkpoint directory.", required=True)
_CORPUS = flags.DEFINE_string("corpus_dir", None, "Corpus dir (tokenizer, concept names); "
                              "default: the checkpoint's own corpus, when found.")
_TEXT = flags.DEFINE_string("text", None, "Text to explain (needs a tokenizer).")
_IDS = flags.DEFINE_string("input_ids", None, "[T] or [1,T] integer .npy to explain instead "
                           "of text.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 64, "Tokens of context to run (at most the "
                                   "model's max_seq_len).")
_POSITIONS = flags.DEFINE_integer("positions", 6, "Positions to explain.")
_TOP = flags.DEFINE_integer("top", 5, "Contributions listed per head.")
_N_STEPS = flags.DEFINE_integer("n_steps", 8, "Integrated-gradients steps (0: no input view).")
_OUT = flags.DEFINE_string("out", None, "Markdown report path.", required=True)


def _input_ids(ex, corpus_dir, vocab, limit):
    import numpy as np

    from cbm_lm.eval.checkpoint_report import first_document
    from cbm_lm.inference.prompts import load_prompt_ids, random_prompt_ids, single_prompt_ids
    if _IDS.value:
        try:
            ids = single_prompt_ids(load_prompt_ids(_IDS.value, vocab_size=vocab), _IDS.value)
        except (FileNotFoundError, ValueError) as e:
            raise app.UsageError(f"--input_ids: {e}") from None
        return ids[:limit], "ids from " + _IDS.value
    if _TEXT.value:
        try:
            return np.asarray(ex.encode(_TEXT.value)[:limit]), "--text"
        except ValueError as e:
            raise app.UsageError(f"--text: {e}") from None
    if corpus_dir is not None:
        try:
            return first_document(corpus_dir, "heldout")[:limit], "the first held-out document"
        except ValueError as e:
            sys.exit(f"explain: error: {e}; give --text or --input_ids instead")
    return random_prompt_ids(vocab, limit), "random ids"


def main(argv):
    if len(argv) > 1:   # a stray word, e.g. the value of "--config.x False" (write x=False)
        raise app.UsageError(f"unexpected arguments {argv[1:]}; flags take --name=value")
    if _MAX_TOKENS.value < 2:
        raise app.UsageError(f"--max_tokens={_MAX_TOKENS.value}: expected >= 2 (a context "
                             f"token and one to explain)")
    if _TEXT.value is not None and _IDS.value is not None:
        raise app.UsageError("give at most one of --text and --input_ids")
    logging.set_verbosity(logging.WARNING)
    from cbm_lm.api import Explainer, find_corpus
    from cbm_lm.eval import checkpoint_report as report
    from cbm_lm.config import ConfigError
    from cbm_lm.train.checkpoint import CheckpointError, read_config

    try:
        corpus_dir = _CORPUS.value or find_corpus(_CKPT.value, read_config(_CKPT.value))
        ex = Explainer.load(_CKPT.value, corpus_dir=corpus_dir)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        sys.exit(f"explain: error: {e}")
    cfg = ex.model.config
    ids, what = _input_ids(ex, corpus_dir, cfg.vocab_size, min(_MAX_TOKENS.value, cfg.max_seq_len))
    diffusion = cfg.attention != "causal"
    try:
        start, end = report.explained_span(len(ids), _POSITIONS.value, diffusion,
                                           cfg.diffusion_block_size)
        gen = ex.teacher_forced(ids[:end], end - start)
    except ValueError as e:
        sys.exit(f"explain: error: {what}: {e}")
    mode = (f"masked diffusion: positions [{start}, {end}) masked, true tokens explained"
            if diffusion else "autoregressive: the next token explained")
    if _N_STEPS.value > 0:
        inputs, concepts = ex.attribute(gen, n_steps=_N_STEPS.value)
    else:
        from cbm_lm.attribution.concept_attribution import concept_attribution
        inputs, concepts = None, concept_attribution(ex.model, gen.trace)

    lines = [f"# cbm_lm report: {_CKPT.value}", ""]
    lines += report.training_section(_CKPT.value, corpus_dir)
    lines += report.decomposition_section(gen, concepts, inputs, ex.labels, ex.decode,
                                          what=what, mode=mode, top=_TOP.value)
    report.write_markdown(_OUT.value, lines)
    err = concepts.verify().max_abs_error
    print(f"wrote {_OUT.value} (decomposition identity error {err:.2e})")


if __name__ == "__main__":
    app.run(main)
