"""What an evaluation runs on: a restored checkpoint and the corpus it is judged on.

  target = load_target(workdir=DIR)                      # newest checkpoint, its config, its corpus
  target = load_target(checkpoint=CKPT, data=CORPUS)     # any checkpoint (an imported Steerling one too)

Only the params are restored (cbm_lm.train.checkpoint.load_model builds the
abstract model from the saved config.json; no optimizer, no training loop).
Every mismatch is refused before any compute, naming the file and what was
expected.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections
from etils import epath

from cbm_lm.config import ModelConfig
from cbm_lm.data.corpus import Corpus
from cbm_lm.model import ConceptBottleneckLM
from cbm_lm.train.checkpoint import (CHECKPOINTS, CONFIG_FILE, CheckpointError, load_model,
                                     read_config)


class EvalInputError(ValueError):
    """A checkpoint, corpus or output path the evaluation cannot use."""


@dataclasses.dataclass
class EvalTarget:
    model: ConceptBottleneckLM
    config: ml_collections.ConfigDict
    corpus: Corpus
    checkpoint_dir: str
    step: int

    @property
    def model_cfg(self) -> ModelConfig:
        return self.model.config

    @property
    def corpus_hash(self) -> str:
        return str(self.corpus.manifest.get("content_hash", ""))


def latest_step(ckpt_dir: str) -> int:
    """Newest step number under CKPT_DIR/checkpoints (orbax step folders are integers)."""
    root = epath.Path(ckpt_dir) / CHECKPOINTS
    steps = [int(p.name) for p in root.iterdir() if p.name.isdigit()] if root.exists() else []
    if not steps:
        raise EvalInputError(f"{root}: no checkpoint steps; expected a training workdir or an "
                             f"imported checkpoint holding {CONFIG_FILE} and {CHECKPOINTS}/<step>/")
    return max(steps)


def check_corpus_matches(corpus: Corpus, model_cfg: ModelConfig) -> None:
    """Refuses a corpus whose tokenizer or concept vocabulary does not fit the model."""
    where = os.path.join(os.fspath(corpus.dir), "manifest.json")
    n_concepts = int(corpus.manifest.get("num_concepts", len(corpus.concepts)))
    if n_concepts > model_cfg.concepts.n_known:
        raise EvalInputError(
            f"{where}: {n_concepts} concepts, but the checkpoint's known head has "
            f"n_known={model_cfg.concepts.n_known}; expected the corpus the model was trained on "
            f"(at most {model_cfg.concepts.n_known} concepts)")
    tok = corpus.manifest.get("tokenizer", {})
    vocab = int(tok.get("vocab_size", corpus.tokenizer.vocab_size))
    if vocab > model_cfg.vocab_size:
        raise EvalInputError(
            f"{where}: tokenizer vocabulary of {vocab} tokens, but the checkpoint's model has "
            f"vocab_size={model_cfg.vocab_size}; expected the corpus the model was trained on")
    if (model_cfg.objective == "diffusion" and "mask_id" in tok
            and int(tok["mask_id"]) != model_cfg.resolved_mask_token_id):
        raise EvalInputError(
            f"{where}: tokenizer mask id {tok['mask_id']}, but the checkpoint's diffusion model "
            f"masks with {model_cfg.resolved_mask_token_id}; expected the corpus the model was "
            f"trained on")


def _corpus_of(config, ckpt_dir: str) -> str:
    """The run's corpus: config data.dir as given, else its namesake beside the workdir
    (a relative data.dir written by a run started from another directory)."""
    d = (config.get("data", {}) or {}).get("dir", "")
    if not d:
        raise EvalInputError(f"{os.path.join(ckpt_dir, CONFIG_FILE)}: names no corpus (data.dir); "
                             f"pass --data CORPUS_DIR")
    sibling = os.path.join(os.path.dirname(os.path.abspath(ckpt_dir)), os.path.basename(d.rstrip("/")))
    return d if os.path.exists(d) or not os.path.exists(sibling) else sibling


def load_target(*, workdir: str | None = None, checkpoint: str | None = None,
                data: str | None = None) -> EvalTarget:
    """Restores params and opens the corpus; exactly one of workdir / checkpoint."""
    if bool(workdir) == bool(checkpoint):
        raise EvalInputError("give exactly one of --workdir (a training run) or --checkpoint "
                             "(with --data)")
    ckpt_dir = workdir or checkpoint
    if not os.path.isdir(ckpt_dir):
        raise EvalInputError(f"{ckpt_dir}: no such directory; expected a cbm_lm checkpoint "
                             f"directory holding {CONFIG_FILE} and {CHECKPOINTS}/<step>/")
    if not os.path.exists(os.path.join(ckpt_dir, CONFIG_FILE)):
        raise EvalInputError(f"{os.path.join(ckpt_dir, CONFIG_FILE)}: not found; expected a cbm_lm "
                             f"checkpoint directory (a training workdir or tools/import_steerling.py "
                             f"output)")
    step = latest_step(ckpt_dir)
    try:
        config = read_config(ckpt_dir)
        model_cfg = ModelConfig.from_config(config.model)
    except (CheckpointError, ValueError) as e:
        raise EvalInputError(f"{os.path.join(ckpt_dir, CONFIG_FILE)}: {e}") from e
    data = data or _corpus_of(config, ckpt_dir)
    try:
        corpus = Corpus(data)
    except (FileNotFoundError, ValueError) as e:
        raise EvalInputError(str(e)) from e
    check_corpus_matches(corpus, model_cfg)     # before any restore or compute
    try:
        model, config = load_model(ckpt_dir, step=step)
    except CheckpointError as e:
        raise EvalInputError(str(e)) from e
    return EvalTarget(model, config, corpus, os.fspath(ckpt_dir), step)
