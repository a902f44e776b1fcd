"""Training-time chunk keys and the concept x source mass, from the train step's own pass.

Inside the jitted step (no second forward; DESIGN.md section 7), from the pass's
ForwardViews (train/losses.py: the concept stream's hidden state and active sets,
and for autoregressive models the next-token losses the head pools by):

  keys   float32 [B,M,d_p]  ChunkProvenanceHead keys of each row's chunk slots
  id_hi, id_lo int32 [B,M]  the two 32-bit halves of each slot's 64-bit global chunk id
                            (read at the slot's first token; JAX runs without x64)
  valid  bool [B,M]         the slot holds a chunk
  chunks int32 [B]          the row's chunk count; chunks past slot M have no key, and the
                            logger warns with their number (provenance.max_chunks_per_row)
  mass   float32 [C_pad,S]  M[c,s] += sum_{t: source(t)=s} sum_k [i_{t,k}=c] w_{t,k}
                            over the whole global batch: jit sums the data-parallel
                            shards, so every replica's tokens count once

On the host, ``ChunkKeyLogger`` appends (id, key, step) rows to this process's
file set of the key store WORKDIR/provenance/keys/logged (cbm_lm/provenance/
keystore.py). It never waits on the device in the step it is given keys: it
starts their copy to the host and converts the previous step's. Rows reach disk
at log steps and before each checkpoint, which then writes the cursor
p<i>/CURSOR.json = {"step", "rows"} (atomically); on resume it drops the rows
logged after the restored step (steps redone after a crash log again), so the
store holds each chunk as often as an uninterrupted run would.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from cbm_lm.atomic_io import write_text_atomic
from cbm_lm.model.provenance import ChunkProvenanceHead, ProjectionTables, chunk_onehot
from cbm_lm.provenance import keystore
from cbm_lm.provenance.build import LOGGED, store_path
from cbm_lm.provenance.source_mass import mass_update

CURSOR = "CURSOR.json"
ID_FIELDS = ("chunk_id_hi", "chunk_id_lo")


def split_ids(ids: np.ndarray) -> dict[str, np.ndarray]:
    """int64 ids (any shape; -1 padding) -> {"chunk_id_hi", "chunk_id_lo"} int32 halves."""
    ids = np.asarray(ids, np.int64)
    return {"chunk_id_hi": (ids >> 32).astype(np.int32),
            "chunk_id_lo": (ids & 0xFFFFFFFF).astype(np.uint32).view(np.int32)}


def join_ids(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Inverse of ``split_ids``."""
    return (np.asarray(hi, np.int64) << 32) | np.asarray(lo, np.int32).view(np.uint32).astype(
        np.int64)


def step_outputs(views, batch, prov, model_cfg, log_keys: bool,
                 tables: ProjectionTables | None = None,
                 head: ChunkProvenanceHead | None = None) -> dict:
    """{"mass": [C_pad,S]} (when the batch has source_ids) and, with ``log_keys``,
    {"keys": {keys, id_hi, id_lo, valid}} for one (micro-)batch; see the module docstring.
    tables: ``placed_tables`` (drawn in the step when None); head: the model's trained key
    head (its W as the step read it), else the fixed key."""
    out = {}
    if "source_ids" in batch:
        out["mass"] = mass_update(views.known.indices, views.known.weights, batch["source_ids"],
                                  model_cfg.concepts.n_known_padded, prov.max_sources)
    if log_keys:
        if head is None:   # a learned head nothing trains has W = 0: the fixed key
            head = ChunkProvenanceHead(prov, model_cfg, rngs=nnx.Rngs(prov.seed))
        lm_out = SimpleNamespace(logits=None, hidden=views.hidden, known=views.known,
                                 unknown=views.unknown)
        ck = head(lm_out, batch["tokens"], batch["segment_ids"], batch["chunk_segment_ids"],
                  nll=views.nll, tables=tables)
        onehot = chunk_onehot(batch["chunk_segment_ids"], prov.max_chunks_per_row)
        first = jnp.argmax(onehot, axis=1)                                      # [B,M]
        out["keys"] = {"keys": ck.keys, "valid": ck.valid,
                       "id_hi": jnp.take_along_axis(batch["chunk_id_hi"], first, axis=1),
                       "id_lo": jnp.take_along_axis(batch["chunk_id_lo"], first, axis=1),
                       "chunks": jnp.max(batch["chunk_segment_ids"], axis=1).astype(jnp.int32)}
    return out


def _local(x, sharding) -> np.ndarray:
    """This process's rows of a batch-sharded global array."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.global_array_to_host_local_array(
        x, sharding.mesh, sharding.spec))


class ChunkKeyLogger:
    """Appends the train step's chunk keys to this process's key store (module docstring)."""

    def __init__(self, workdir, batch_sharding=None, flush_rows: int = 1 << 16, log=print):
        self.store = store_path(workdir, LOGGED)
        self.process = jax.process_index()
        self.writer = keystore.KeyStoreWriter(self.store, self.process, flush_rows)
        self.cursor_path = keystore.process_dir(self.store, self.process) / CURSOR
        self.sharding, self.log = batch_sharding, log
        self._pending: list[tuple[int, dict]] = []
        # chunks that had no key slot (past provenance.max_chunks_per_row), since the start
        # and as of the last warning, and the most chunks one row held
        self.unkeyed, self._warned, self.max_row_chunks, self.slots = 0, 0, 0, 0

    def rows(self) -> int:
        """Rows on disk (from the segment names; nothing is read)."""
        return keystore.row_count(self.writer.dir)

    def resume(self, step: int) -> None:
        """Drops rows logged after ``step`` (the restored checkpoint; 0 for a fresh start)."""
        self._pending = []
        dropped = self.writer.truncate_after(step)
        rows = self.rows()
        if dropped:
            self.log(f"key store {self.writer.dir}: dropped {dropped} rows logged after step "
                     f"{step} (those steps run again)")
        if step and self.cursor_path.exists():
            cursor = json.loads(self.cursor_path.read_text())
            if cursor["step"] == step and cursor["rows"] != rows:
                self.log(f"WARNING: key store {self.writer.dir} holds {rows} rows through step "
                         f"{step}, its cursor {self.cursor_path} says {cursor['rows']}: segments "
                         f"were lost or added outside training")

    def record(self, step: int, keys: dict) -> None:
        """Takes step ``step``'s key outputs (device arrays); converts the previous ones."""
        for x in jax.tree.leaves(keys):
            x.copy_to_host_async()
        self._pending.append((step, keys))
        self._drain(keep=1)

    def _drain(self, keep: int = 0) -> None:
        while len(self._pending) > keep:
            step, k = self._pending.pop(0)
            k = {name: _local(x, self.sharding) for name, x in k.items()}
            valid = k["valid"]
            self.writer.add(join_ids(k["id_hi"], k["id_lo"])[valid], k["keys"][valid], step)
            self.slots = valid.shape[1]
            self.unkeyed += int(np.maximum(k["chunks"] - self.slots, 0).sum())
            self.max_row_chunks = max(self.max_row_chunks, int(k["chunks"].max(initial=0)))

    def flush(self) -> None:
        """Writes every row recorded so far (the loop calls it at log steps, which sync anyway)."""
        self._drain()
        self.writer.flush()
        if self.unkeyed > self._warned:
            self.log(f"WARNING: {self.unkeyed} chunks this process trained on got no key (a "
                     f"row held up to {self.max_row_chunks} chunks, provenance."
                     f"max_chunks_per_row={self.slots}): provenance cannot find them; raise "
                     "max_chunks_per_row")
            self._warned = self.unkeyed

    def checkpoint(self, step: int) -> None:
        """Writes every row up to ``step``, then the cursor; call before saving ``step``."""
        self.flush()
        write_text_atomic(self.cursor_path, json.dumps({"step": int(step), "rows": self.rows()}))

    def close(self) -> None:
        """Writes what is buffered (rows past the last checkpoint are dropped on resume)."""
        self.flush()


def read_cursor(store, process_index: int = 0) -> dict | None:
    p = keystore.process_dir(store, process_index) / CURSOR
    return json.loads(epath.Path(p).read_text()) if p.exists() else None
