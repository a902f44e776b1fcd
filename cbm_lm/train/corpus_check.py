"""Checks, before any compile, that a built corpus fits the model config."""

from __future__ import annotations

import json

from etils import epath

from cbm_lm.config import ConfigError


def read_manifest(data_dir: str) -> dict:
    if not data_dir:
        raise ConfigError("config field 'data.dir' is empty: point it at a corpus built by "
                         "tools/build_corpus.py (e.g. --config.data.dir=runs/demo/corpus)")
    manifest = epath.Path(data_dir) / "manifest.json"
    if not manifest.exists():
        raise ConfigError(f"{manifest}: not found; is data.dir={data_dir!r} a corpus built "
                          f"by tools/build_corpus.py?")
    return json.loads(manifest.read_text())


def check_corpus_fits_model(manifest: dict, data_dir: str, model_cfg, seq_len: int, *,
                            max_chunk_concepts: int | None = None,
                            max_sources: int | None = None) -> None:
    """Validates concept count, vocabulary and mask id of ``manifest`` (read_manifest), and,
    when given, that data.max_chunk_concepts holds the corpus's labels per chunk and
    provenance.max_sources its sources (either cut silently otherwise: labels dropped from
    the loss, sources' tokens from the concept x source mass)."""
    where = f"{data_dir}/manifest.json"
    corpus_k = int(manifest.get("max_chunk_concepts", 0))
    if max_chunk_concepts is not None and corpus_k > max_chunk_concepts:
        # a choice (memory: the label tensors are [B,T,K]) but never a silent one
        print(f"WARNING: {where}: chunks carry up to {corpus_k} concept labels and "
              f"data.max_chunk_concepts={max_chunk_concepts} keeps fewer: the rest, and a full "
              f"chunk's token-level labels, are dropped from the concept loss "
              f"(--config.data.max_chunk_concepts={corpus_k} keeps them)", flush=True)
    n_sources = int(manifest.get("num_sources", 0))
    if max_sources is not None and n_sources > max_sources:
        raise ConfigError(f"{where}: {n_sources} sources, but provenance.max_sources="
                          f"{max_sources} columns of the source mass (the tokens of the others "
                          f"would add no mass); pass --config.provenance.max_sources={n_sources} "
                          f"(a new run: a checkpoint's source mass keeps its width)")
    n_concepts = int(manifest.get("num_concepts", 0))
    if n_concepts > model_cfg.concepts.n_known:
        raise ConfigError(f"{where}: {n_concepts} concepts, but model.concepts.n_known="
                         f"{model_cfg.concepts.n_known}; raise n_known to at least {n_concepts}")
    tok = manifest.get("tokenizer", {})
    if tok.get("vocab_size", 0) > model_cfg.vocab_size:
        raise ConfigError(f"{where}: tokenizer vocabulary of {tok['vocab_size']} exceeds "
                         f"model.vocab_size={model_cfg.vocab_size}")
    if (model_cfg.objective == "diffusion" and "mask_id" in tok
            and model_cfg.resolved_mask_token_id != tok["mask_id"]):
        raise ConfigError(f"model.mask_token_id={model_cfg.resolved_mask_token_id} but the corpus "
                         f"tokenizer's mask id is {tok['mask_id']} ({where}); set "
                         f"--config.model.mask_token_id={tok['mask_id']}")
    if seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"data.seq_len={seq_len} exceeds "
                          f"model.max_seq_len={model_cfg.max_seq_len}")


def resolve_mask_token(config, manifest: dict) -> None:
    """Sets model.mask_token_id from the corpus tokenizer when the config leaves it None."""
    if config.model.mask_token_id is None:
        mask_id = manifest.get("tokenizer", {}).get("mask_id")
        if mask_id is not None:
            with config.unlocked():
                config.model.mask_token_id = int(mask_id)


def resolve_known_concepts(config, manifest: dict) -> None:
    """With data.known_concepts_from_corpus, sizes the known head to the corpus's concepts.

    model.concepts.n_known becomes the manifest's num_concepts, so every known slot
    is a real concept: none is dead by construction and the dead-concept metric
    counts real concepts only (rows are still padded to pad_multiple, and the head
    never selects a padding row).
    """
    if not config.data.get("known_concepts_from_corpus", False):
        return
    n = int(manifest.get("num_concepts", 0))
    if n <= 0:
        raise ConfigError(f"data.known_concepts_from_corpus is set but {config.data.dir}/"
                         f"manifest.json lists no concepts (num_concepts={n})")
    cc = config.model.concepts
    if cc.n_known != n or cc.known_topk > n:   # an explicit --config value is replaced: say so
        print(f"data.known_concepts_from_corpus: model.concepts.n_known {cc.n_known} -> {n} "
              f"(the concepts of {config.data.dir})"
              + (f", known_topk {cc.known_topk} -> {n}" if cc.known_topk > n else ""),
              flush=True)
    with config.unlocked():
        cc.n_known = n
        cc.known_topk = min(cc.known_topk, n)
