"""A small corpus and an untrained tiny model with its re-keyed provenance index, shared by
the provenance tests (test_provenance_query.py, test_provenance_build.py)."""

from __future__ import annotations

import pytest
from flax import nnx

from cbm_lm.config import ModelConfig
from cbm_lm.default_config import base_config
from cbm_lm.model import ConceptBottleneckLM
from cbm_lm.provenance import build
from cbm_lm.train.checkpoint import load_model, save_params
from data_fixtures import build as build_corpus


def small_config(corpus) -> "ml_collections.ConfigDict":  # noqa: F821
    c = base_config()
    c.data.dir, c.data.seq_len = str(corpus), 32
    c.model.update(vocab_size=512, d_model=32, n_heads=2, n_kv_heads=1, mlp_dim=64,
                   objective="autoregressive", attention="causal")
    c.model.concepts.update(n_known=16, known_topk=4, n_unknown=32, unknown_rank=4,
                            unknown_topk=4, block_size=16)
    c.provenance.update(max_chunks_per_row=8, rekey_batch_size=4)
    return c


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """(workdir, model, config): step 0 of TMP/train over the corpus TMP/corpus (tokenizer
    TMP/tok), indexed by re-keying (no training-time key store)."""
    tmp = tmp_path_factory.mktemp("prov")
    corpus = build_corpus(tmp)
    config = small_config(corpus)
    model = ConceptBottleneckLM(ModelConfig.from_config(config.model), rngs=nnx.Rngs(0))
    save_params(tmp / "train", config, model)
    model, config = load_model(tmp / "train")
    logs = []
    built = build.build_index(tmp / "train", model, config, 0, log=logs.append)
    assert "rekeyed" in built and any("re-keying every training chunk" in m for m in logs)
    return tmp / "train", model, config
