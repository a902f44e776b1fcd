"""The trainer's start-up check of a corpus against the config (train/corpus_check.py):
each mismatch that would otherwise cut data silently is refused, naming the file and flag."""

import pytest

from cbm_lm.config import ConceptConfig, ConfigError, ModelConfig
from cbm_lm.train.corpus_check import check_corpus_fits_model

MODEL = ModelConfig(vocab_size=512, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=64,
                    max_seq_len=64, concepts=ConceptConfig(n_known=16, known_topk=4,
                                                           n_unknown=16, unknown_rank=4,
                                                           unknown_topk=4, block_size=16))
MANIFEST = {"num_concepts": 12, "tokenizer": {"vocab_size": 500}, "max_chunk_concepts": 8,
            "num_sources": 5}


def test_a_corpus_within_every_limit_passes():
    check_corpus_fits_model(MANIFEST, "corpus", MODEL, 64, max_chunk_concepts=8, max_sources=5)


def test_fewer_label_slots_than_the_corpus_is_a_choice_but_never_silent(capsys):
    check_corpus_fits_model(MANIFEST, "corpus", MODEL, 64, max_chunk_concepts=4)
    assert "--config.data.max_chunk_concepts=8 keeps them" in capsys.readouterr().out


@pytest.mark.parametrize("kw,manifest,flag", [
    ({"max_sources": 4}, {}, "--config.provenance.max_sources=5"),
    ({}, {"num_concepts": 20}, "raise n_known to at least 20"),
    ({}, {"tokenizer": {"vocab_size": 600}}, "exceeds model.vocab_size=512"),
])
def test_each_limit_is_refused_naming_the_manifest_and_flag(kw, manifest, flag):
    with pytest.raises(ConfigError, match="corpus/manifest.json") as e:
        check_corpus_fits_model({**MANIFEST, **manifest}, "corpus", MODEL, 64, **kw)
    assert flag in str(e.value)
