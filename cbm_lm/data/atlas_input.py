"""Beam reading of a concept-atlas Parquet directory (layout in ``inputs``).

Documents and chunk rows are read file by file, keyed by ``document_id`` and
joined with CoGroupByKey, so no table has to fit in memory; the concepts
table (small) becomes the fixed concept vocabulary.
"""

from __future__ import annotations

import apache_beam as beam
from etils import epath

from cbm_lm.data import inputs
from cbm_lm.data import tokenizer as tokenizer_lib
from cbm_lm.data.errors import DataError

BAD = "bad"


def _tables(atlas_dir, prefix: str) -> list[str]:
    files = sorted(str(f) for f in epath.Path(atlas_dir).iterdir()
                   if f.name.startswith(prefix) and f.name.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(f"{atlas_dir}: no {prefix}*.parquet table (concept-atlas layout "
                                "expects documents*, chunks*, concepts*.parquet)")
    return files


def concept_table(atlas_dir) -> list[dict]:
    out = []
    for f in _tables(atlas_dir, "concepts"):
        out += inputs.read_atlas_concepts(f)
    return out


def _rows(path, key_field):
    for row, r in inputs.iter_parquet_rows(path):
        if r.get(key_field) is None:
            raise DataError(path, f"row {row}", f"missing field '{key_field}'")
        yield str(r[key_field]), (path, row, r)


class _Join(beam.DoFn):
    def __init__(self, tokenizer_path, concept_names, skip_bad):
        self.tokenizer_path, self.names, self.skip_bad = tokenizer_path, concept_names, skip_bad

    def setup(self):
        self.tok = tokenizer_lib.load(self.tokenizer_path)

    def process(self, item):
        doc_id, grouped = item
        docs, chunks = list(grouped["docs"]), sorted(grouped["chunks"], key=lambda x: x[:2])
        try:
            if len(docs) != 1:
                where = chunks[0] if chunks else ("?", "?")
                raise DataError(where[0], f"row {where[1]}", f"document_id {doc_id!r} has "
                                f"{len(docs)} document rows; expected exactly one")
            yield inputs.atlas_doc(docs[0], chunks, self.tok, self.names,
                                   inputs.default_source_for(docs[0][0]))
        except DataError as e:
            if not self.skip_bad:
                raise
            yield beam.pvalue.TaggedOutput(BAD, str(e))


def read_atlas(p, atlas_dir, tokenizer_path, concept_names, skip_bad):
    """Returns (PCollection[LabelledDoc], PCollection[str] of bad-record messages)."""
    docs = (p | "AtlasDocFiles" >> beam.Create(_tables(atlas_dir, "documents"))
            | "AtlasDocRows" >> beam.FlatMap(_rows, "document_id"))
    chunks = (p | "AtlasChunkFiles" >> beam.Create(_tables(atlas_dir, "chunks"))
              | "AtlasChunkRows" >> beam.FlatMap(_rows, "document_id"))
    joined = ({"docs": docs, "chunks": chunks} | "AtlasJoin" >> beam.CoGroupByKey()
              | "AtlasDocs" >> beam.ParDo(_Join(tokenizer_path, concept_names, skip_bad))
              .with_outputs(BAD, main="docs"))
    return joined.docs, joined[BAD]
