"""The batch the train and eval steps receive: its fields, made global or abstract.

The one list of fields (``device_fields``) serves both the trainer (``global_batch``,
train/loop.py) and the compile checks (``abstract_batch``: train/compile_check.py,
tools/aot_compile.py, tools/plan.py), so AOT and planning compile the program the
trainer runs. Every field is int32 [B, T] (concept_ids [B, T, K]); the pipeline's
int64 chunk ids travel as two int32 halves (chunk_keys.ID_FIELDS), always sent:
the step reads them with provenance.log_keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from cbm_lm.train.chunk_keys import ID_FIELDS, split_ids

# The pipeline's fields the step reads as they are (data/pipeline.py).
DEVICE_FIELDS = ("tokens", "segment_ids", "positions", "concept_ids", "chunk_segment_ids",
                 "source_ids")


def device_fields() -> tuple[str, ...]:
    """Every field of the device batch, in order."""
    return DEVICE_FIELDS + ID_FIELDS


def global_batch(local: dict, sharding: NamedSharding) -> dict:
    """A process's pipeline batch -> the global device batch sharded by ``sharding``."""
    fields = {k: local[k] for k in DEVICE_FIELDS if k in local}
    if "chunk_ids" in local:
        fields.update(split_ids(local["chunk_ids"]))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in fields.items()}


def abstract_batch(config, sharding: NamedSharding | None) -> dict:
    """The global device batch of ``config`` as ShapeDtypeStructs: nothing allocated."""
    b, t, k = config.data.batch_size, config.data.seq_len, config.data.max_chunk_concepts
    return {f: jax.ShapeDtypeStruct((b, t, k) if f == "concept_ids" else (b, t), jnp.int32,
                                    sharding=sharding)
            for f in device_fields()}
