"""A faiss inner-product index over unit keys, saved beside the checkpoints.

  N <= provenance.exact_max_keys:  IndexFlatIP (exact cosine top-k)
  N  > provenance.exact_max_keys:  IndexIVFPQ (nlist = ivf_nlist or sqrt(N) lists,
                                   pq_m sub-quantizers of 8 bits, nprobe lists searched),
                                   trained on a seeded sample of 64 keys per list

Keys are centred before indexing: mu = mean of the stored keys, and both the
stored keys and every query use n(k - mu). Pooled LM states share a large
common direction; removing it makes the cosine compare what differs between
chunks (measured in benchmarks/provenance.py; ``center=False`` turns it off).

Files in DIR: index.faiss, ids.npy (int64 [N], row -> global chunk id),
meta.json (kind, N, d_p, mu, which key store, checkpoint step).
"""

from __future__ import annotations

import io
import json

import faiss
import numpy as np
from etils import epath

from cbm_lm.atomic_io import replace_dir_atomically
from cbm_lm.config import ProvenanceConfig


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


class KeyIndex:
    """ids [N] + a faiss index over n(keys - mu)."""

    def __init__(self, index, ids: np.ndarray, mu: np.ndarray, meta: dict):
        self.index, self.ids, self.mu, self.meta = index, ids, mu, meta

    @classmethod
    def build(cls, ids: np.ndarray, keys: np.ndarray, prov: ProvenanceConfig,
              center: bool = True, meta: dict | None = None) -> "KeyIndex":
        ids, keys = np.asarray(ids, np.int64), np.asarray(keys, np.float32)
        if keys.ndim != 2 or len(ids) != len(keys) or not len(ids):
            raise ValueError(f"cannot index {len(ids)} ids with keys of shape {keys.shape}; "
                             "expected ids [N] and keys [N, d_p] with N >= 1")
        n, d = keys.shape
        mu = keys.mean(axis=0) if center else np.zeros(d, np.float32)
        x = _unit(keys - mu)
        if n <= prov.exact_max_keys:
            index, kind = faiss.IndexFlatIP(d), "flat"
            index.add(x)
        else:
            nlist = prov.ivf_nlist or int(np.sqrt(n))
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFPQ(quantizer, d, nlist, prov.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
            train = x if n <= 64 * nlist else x[np.random.default_rng(0).choice(
                n, 64 * nlist, replace=False)]
            index.train(train)
            index.add(x)
            index.nprobe = prov.nprobe
            kind = f"ivfpq(nlist={nlist},m={prov.pq_m},nprobe={prov.nprobe})"
        meta = dict(meta or {}, kind=kind, n=int(n), d_p=int(d), center=bool(center))
        return cls(index, ids, mu.astype(np.float32), meta)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries [Q,d_p] -> (scores [Q,k] cosine, chunk ids [Q,k], -1 where fewer)."""
        q = _unit(np.asarray(queries, np.float32) - self.mu)
        scores, rows = self.index.search(q, min(k, len(self.ids)))
        ids = np.where(rows >= 0, self.ids[np.maximum(rows, 0)], -1)
        return scores, ids

    def nbytes(self) -> int:
        return int(faiss.serialize_index(self.index).nbytes)

    def save(self, directory) -> None:
        """Writes the three files into ``directory`` atomically: a sibling temporary
        directory swapped in once complete, so a failure leaves the previous index whole
        and no partial directory behind."""
        def write(tmp: str) -> None:
            t = epath.Path(tmp)
            t.mkdir(parents=True)
            (t / "index.faiss").write_bytes(faiss.serialize_index(self.index).tobytes())
            buf = io.BytesIO()
            np.save(buf, self.ids, allow_pickle=False)
            (t / "ids.npy").write_bytes(buf.getvalue())
            (t / "meta.json").write_text(json.dumps(dict(self.meta, mu=self.mu.tolist()),
                                                    indent=1))

        epath.Path(directory).parent.mkdir(parents=True, exist_ok=True)
        replace_dir_atomically(directory, write)

    @classmethod
    def load(cls, directory) -> "KeyIndex":
        d = epath.Path(directory)
        missing = [f for f in ("index.faiss", "ids.npy", "meta.json") if not (d / f).exists()]
        if missing:
            raise FileNotFoundError(f"{d}: provenance index incomplete (missing {missing}); "
                                    "run tools/build_provenance_index.py --workdir WORKDIR")
        index = faiss.deserialize_index(np.frombuffer((d / "index.faiss").read_bytes(), np.uint8))
        ids = np.load(io.BytesIO((d / "ids.npy").read_bytes()), allow_pickle=False)
        meta = json.loads((d / "meta.json").read_text())
        mu = np.asarray(meta.pop("mu"), np.float32)
        if "nprobe" in meta.get("kind", ""):
            index.nprobe = int(meta["kind"].split("nprobe=")[1].rstrip(")"))
        return cls(index, ids, mu, meta)
