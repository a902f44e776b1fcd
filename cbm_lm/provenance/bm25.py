"""BM25 over the training chunks (the ``bm25s`` package): the lexical baseline.

Each training chunk's text (decoded from the corpus shards) is one BM25
document: lower-cased word tokens (``\\b\\w\\w+\\b``), English stopwords
removed, Lucene BM25 (k1 = 1.5, b = 0.75). Built once per workdir into
WORKDIR/provenance/bm25/ and loaded from there afterwards, as long as it was
built from the same corpus: the directory records the corpus it indexes
(``corpus.json``: its manifest's sha256, as the re-keyed index records it, and
the split), and a rebuilt corpus, another --corpus_dir or a directory written
before the record existed is indexed again, since its chunk ids would name
other chunks or none.
"""

from __future__ import annotations

import io
import json

import bm25s
import numpy as np
from etils import epath

from cbm_lm.atomic_io import replace_dir_atomically
from cbm_lm.data.corpus import Corpus
from cbm_lm.provenance.build import manifest_sha256

BM25_DIR = "bm25"
CORPUS_FILE = "corpus.json"


def corpus_identity(corpus: Corpus, split: str = "train") -> dict:
    """What a BM25 directory was built from (compared whole when it is opened)."""
    return {"corpus_manifest_sha256": manifest_sha256(corpus), "split": split}


def training_chunks(corpus: Corpus, split: str = "train") -> tuple[np.ndarray, list[str]]:
    """(ids [N], texts [N]) of every chunk of ``split``, in shard order."""
    tok = corpus.tokenizer
    ids, texts = [], []
    for rec in corpus.documents(split):
        b = rec.chunk_bounds
        for j in range(rec.num_chunks):
            ids.append(int(rec.chunk_ids[j]))
            texts.append(tok.decode(rec.tokens[b[j]:b[j + 1]]))
    return np.asarray(ids, np.int64), texts


def _tokenize(texts: list[str]):
    return bm25s.tokenize(texts, stopwords="en", show_progress=False)


def built_from(directory) -> dict | None:
    """The corpus_identity a BM25 directory records; None when it records none."""
    p = epath.Path(directory) / CORPUS_FILE
    return json.loads(p.read_text()) if p.exists() else None


class BM25Retriever:
    def __init__(self, model: bm25s.BM25, ids: np.ndarray):
        self.model, self.ids = model, ids

    @classmethod
    def build(cls, ids: np.ndarray, texts: list[str]) -> "BM25Retriever":
        model = bm25s.BM25()
        model.index(_tokenize(texts), show_progress=False)
        return cls(model, np.asarray(ids, np.int64))

    @classmethod
    def open(cls, workdir, corpus: Corpus) -> "BM25Retriever":
        """Loads WORKDIR/provenance/bm25 when it was built from ``corpus``; else builds it
        from the corpus (the first time, or again for a rebuilt or another corpus)."""
        d = epath.Path(workdir) / "provenance" / BM25_DIR
        identity = corpus_identity(corpus)
        if (d / "ids.npy").exists() and built_from(d) == identity:
            ids = np.load(io.BytesIO((d / "ids.npy").read_bytes()), allow_pickle=False)
            return cls(bm25s.BM25.load(str(d), show_progress=False), ids)
        r = cls.build(*training_chunks(corpus))
        r.save(d, identity)
        return r

    def save(self, directory, identity: dict | None = None) -> None:
        """Writes the index, its chunk ids and ``identity`` (corpus_identity) to
        ``directory``, replacing an earlier one only once the new one is whole."""
        def write(tmp):
            t = epath.Path(tmp)
            t.mkdir(parents=True)
            self.model.save(tmp, show_progress=False)
            buf = io.BytesIO()
            np.save(buf, self.ids, allow_pickle=False)
            (t / "ids.npy").write_bytes(buf.getvalue())
            if identity is not None:
                (t / CORPUS_FILE).write_text(json.dumps(identity, sort_keys=True))
        replace_dir_atomically(directory, write)

    def search_texts(self, texts: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q,k], chunk ids [Q,k]); -1 ids where a query shares no term."""
        k = min(k, len(self.ids))
        q = _tokenize(list(texts))
        rows, scores = self.model.retrieve(q, k=k, show_progress=False, n_threads=1)
        ids = np.where(scores > 0, self.ids[rows], -1)
        return scores.astype(np.float32), ids

    def search(self, chunks, k):
        return self.search_texts(chunks.texts, k)
