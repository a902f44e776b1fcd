"""The compile checks (train/compile_check.py, tools/aot_compile.py, tools/plan.py) build the
abstract batch from the trainer's own field list (train/device_batch.py), so they compile the
program the trainer runs: source_ids (the source-mass update) and the chunk id halves (read
with provenance.log_keys) included."""

import pathlib

import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from cbm_lm.default_config import load_config_file
from cbm_lm.parallel.mesh import single_device_mesh
from cbm_lm.train.compile_check import abstract_batch, compile_train_step
from cbm_lm.train.data_feed import process_pipeline
from cbm_lm.train.device_batch import global_batch as _global_batch
from data_fixtures import small_corpus  # noqa: F401 (fixture)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tiny(log_keys: bool):
    c = load_config_file(ROOT / "gin_configs" / "tiny.py")
    c.provenance.log_keys = log_keys
    if log_keys:
        c.provenance.d_p, c.provenance.max_chunks_per_row = 16, 8
    return c


@pytest.mark.parametrize("log_keys", [False, True])
def test_abstract_batch_is_the_trainers_device_batch(small_corpus, log_keys):  # noqa: F811
    """Truth: what the trainer hands its step, made from a real pipeline batch."""
    c = _tiny(log_keys)
    c.data.dir, c.data.seq_len, c.data.max_chunk_concepts = str(small_corpus), 64, 4
    c.data.batch_size = 2
    local = next(iter(process_pipeline(c, "train", 2)))
    fed = _global_batch(local, NamedSharding(single_device_mesh(), P()))
    abstract = abstract_batch(c, None)
    assert set(abstract) == set(fed)
    assert {"source_ids", "chunk_id_hi", "chunk_id_lo"} <= set(abstract)
    for k, v in fed.items():
        assert (abstract[k].shape, abstract[k].dtype) == (v.shape, v.dtype), k


def test_compile_check_lowers_the_tiny_step_with_log_keys():
    """With provenance.log_keys the step reads chunk_id_hi/lo: the compile check's batch
    used to lack them (KeyError in the step's trace)."""
    report = compile_train_step(_tiny(True), n_devices=1, layers=1, batch_size=2, seq_len=32)
    assert report.batch_size == 2 and report.n_layers == 1
