"""Input formats of build_corpus: JSONL lines and concept-atlas Parquet rows.

Every reader yields ``LabelledDoc``s and raises ``DataError`` naming the file
and line (JSONL) or row (Parquet) and what was expected.

JSONL, one object per line:

    {"text": str, "source": str?, "id": str?, "split": "train"|"heldout"?,
     "concepts": [name | id, ...]?,                       # document level
     "chunks": [{"start": int, "end": int, "concepts": [...]}, ...]?}

``start``/``end`` are CHARACTER offsets into ``text`` (Python str indices,
end exclusive); chunks must be sorted and must not overlap; text outside any
chunk becomes unlabelled chunks. A concept is a name (str) or, only when a
concept vocabulary is given, an integer id. Any other field is kept in
``meta`` for the metadata labeler.

Concept-atlas Parquet layout (a directory with three tables):

    documents*.parquet: document_id (int|str), text (str), source (str)?,
                        chunk_token_starts (list<int>), token_ids (list<int>)?
    chunks*.parquet:    document_id, chunk_index (int), concept_ids (list<int>)
    concepts*.parquet:  concept_id (int, dense 0..C-1), name (str),
                        description (str)?, group (str)?

``chunk_token_starts`` index tokens of the corpus tokenizer (the atlas must
be built with the same tokenizer, e.g. Steerling's cl100k); when
``token_ids`` is given, our tokenization must reproduce it exactly.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
from collections.abc import Iterator

from etils import epath

from cbm_lm.data.errors import DataError

_KNOWN_FIELDS = {"text", "source", "id", "split", "concepts", "chunks"}


@dataclasses.dataclass
class LabelledDoc:
    """A document with character-level labels, before tokenization."""
    text: str
    source: str
    key: str
    path: str = ""
    where: int | str | None = None
    split: str | None = None
    concepts: list = dataclasses.field(default_factory=list)          # doc level
    spans: list = dataclasses.field(default_factory=list)             # [(start, end, [concepts])]
    token_labels: list = dataclasses.field(default_factory=list)      # [(start, end, concept)]
    meta: dict = dataclasses.field(default_factory=dict)

    def error(self, reason: str) -> DataError:
        return DataError(self.path, self.where, reason)

    def split_for(self, heldout_fraction: float) -> str:
        """Its own ``split`` field, else 'heldout' for a content-hash fraction of documents.

        The one rule the corpus build and the tokenizer's training texts share,
        so the tokenizer never sees a held-out document.
        """
        if self.split is not None:
            return self.split
        return "heldout" if int.from_bytes(self.hash()[:8], "big") < heldout_fraction * 2**64 \
            else "train"

    def hash(self) -> bytes:
        """Content hash: decides the split and the shard; independent of input order."""
        h = hashlib.sha256()
        for part in (self.source, self.key, self.text):
            h.update(part.encode("utf-8", "surrogatepass"))
            h.update(b"\0")
        return h.digest()


def _check_concepts(value, err, field: str) -> list:
    if not isinstance(value, list):
        raise err(f"field '{field}' must be a list of concept names or ids, got "
                  f"{type(value).__name__}")
    for c in value:
        if isinstance(c, bool) or not isinstance(c, (str, int)):
            raise err(f"field '{field}': expected concept names (str) or ids (int), got {c!r:.60}")
    return list(value)


def parse_object(obj, path: str, where, default_source: str) -> LabelledDoc:
    """Validates one decoded JSON object into a LabelledDoc."""
    def err(reason):
        return DataError(path, where, reason)

    if not isinstance(obj, dict):
        raise err(f"expected a JSON object, got {type(obj).__name__}")
    if "text" not in obj:
        raise err("missing field 'text' (expected a non-empty string)")
    text = obj["text"]
    if not isinstance(text, str):
        raise err(f"field 'text' must be a string, got {type(text).__name__}")
    if not text.strip():
        raise err("empty document: field 'text' has no non-whitespace characters "
                  "(expected non-empty text)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise err(f"field 'text' is not valid UTF-8 text (lone surrogate at character "
                  f"{e.start}); expected UTF-8") from None
    source = obj.get("source", default_source)
    if not isinstance(source, str) or not source:
        raise err(f"field 'source' must be a non-empty string, got {source!r:.60}")
    key = obj.get("id")
    key = "" if key is None else str(key)
    split = obj.get("split")
    if split not in (None, "train", "heldout"):
        raise err(f"field 'split' must be 'train' or 'heldout', got {split!r:.40}")
    doc = LabelledDoc(text=text, source=source, key=key, path=path, where=where, split=split,
                      meta={k: v for k, v in obj.items() if k not in _KNOWN_FIELDS})
    doc.concepts = _check_concepts(obj.get("concepts", []), err, "concepts")
    chunks = obj.get("chunks", [])
    if not isinstance(chunks, list):
        raise err("field 'chunks' must be a list of {start, end, concepts} objects")
    prev_end = 0
    for i, ch in enumerate(chunks):
        if not isinstance(ch, dict):
            raise err(f"chunks[{i}]: expected an object with start, end, concepts")
        s, e = ch.get("start"), ch.get("end")
        if not (isinstance(s, int) and isinstance(e, int)) or isinstance(s, bool):
            raise err(f"chunks[{i}]: 'start' and 'end' must be integer character offsets, "
                      f"got start={s!r:.20} end={e!r:.20}")
        if not (prev_end <= s < e <= len(text)):
            raise err(f"chunks[{i}]: span [{s}, {e}) is invalid; expected sorted, "
                      f"non-overlapping, non-empty spans with {prev_end} <= start < end <= "
                      f"{len(text)} (character offsets)")
        prev_end = e
        doc.spans.append((s, e, _check_concepts(ch.get("concepts", []), err,
                                                f"chunks[{i}].concepts")))
    return doc


def parse_jsonl_line(raw: bytes, path: str, line_no: int, default_source: str) -> LabelledDoc:
    """Decodes and validates one JSONL line (1-based ``line_no``)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, line_no, f"line is not valid UTF-8 (bad byte at offset {e.start}); "
                        "expected UTF-8 JSON") from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(path, line_no, f"malformed JSON ({e.msg} at column {e.colno}); expected "
                        "one JSON object per line") from None
    return parse_object(obj, path, line_no, default_source)


def iter_jsonl_lines(path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of each non-blank line; streams the file."""
    p = epath.Path(path)
    with p.open("rb") as f:
        stream = gzip.open(f) if p.name.endswith(".gz") else f
        for n, raw in enumerate(stream, 1):
            raw = raw.rstrip(b"\r\n")
            if raw.strip():
                yield n, raw


def training_texts(paths, heldout_fraction: float, max_bytes: int = 0) -> Iterator[str]:
    """Texts of the documents the corpus build puts in the training split.

    JSONL files (parsed and split as build_corpus does with the same
    ``heldout_fraction``); any other file is one training text. Stops after the
    text that reaches ``max_bytes`` UTF-8 bytes (0 = no limit).
    """
    total = 0
    for path in paths:
        path = str(path)
        if path.endswith((".jsonl", ".jsonl.gz")):
            source = default_source_for(path)
            texts = (doc.text for doc in (parse_jsonl_line(raw, path, n, source)
                                          for n, raw in iter_jsonl_lines(path))
                     if doc.split_for(heldout_fraction) == "train")
        else:
            texts = [epath.Path(path).read_text(encoding="utf-8")]
        for text in texts:
            total += len(text.encode("utf-8"))
            yield text
            if max_bytes and total >= max_bytes:
                return


def default_source_for(path) -> str:
    name = epath.Path(path).name
    for suffix in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name


# ---------------------------------------------------------------- Parquet atlas
def iter_parquet_rows(path, columns=None) -> Iterator[tuple[int, dict]]:
    """(0-based row number, row dict) of a Parquet file, read batch by batch."""
    import pyarrow.parquet as pq

    with epath.Path(path).open("rb") as f:
        pf = pq.ParquetFile(f)
        row = 0
        for batch in pf.iter_batches(batch_size=1024, columns=columns):
            for rec in batch.to_pylist():
                yield row, rec
                row += 1


def atlas_doc(doc_row: tuple, chunk_rows: list, tokenizer, concept_names: list[str],
              default_source: str) -> LabelledDoc:
    """Joins one atlas document row with its chunk rows into a LabelledDoc.

    ``doc_row`` = (path, row, dict); ``chunk_rows`` = [(path, row, dict)].
    Token chunk starts are converted to character spans with ``tokenizer``.
    """
    path, row, d = doc_row
    where = f"row {row}"
    err = lambda reason: DataError(path, where, reason)  # noqa: E731
    obj = {"text": d.get("text"), "source": d.get("source") or default_source,
           "id": d.get("document_id")}
    doc = parse_object(obj, path, where, default_source)
    ids = tokenizer.encode(doc.text)
    if d.get("token_ids") is not None and list(d["token_ids"]) != list(ids):
        raise err("token_ids differ from the corpus tokenizer's encoding of 'text'; expected the "
                  "atlas to be tokenized with the same tokenizer")
    starts = list(d.get("chunk_token_starts") or [0])
    if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] >= len(ids):
        raise err(f"chunk_token_starts {starts[:8]} invalid; expected strictly increasing token "
                  f"indices starting at 0 and below the document length {len(ids)}")
    cs, _ = tokenizer.char_offsets(doc.text, ids)
    bounds = [int(cs[s]) for s in starts] + [len(doc.text)]
    by_index = {}
    for cpath, crow, c in chunk_rows:
        k = c.get("chunk_index")
        if not isinstance(k, int) or not 0 <= k < len(starts):
            raise DataError(cpath, f"row {crow}", f"chunk_index {k!r} out of range; expected "
                            f"0..{len(starts) - 1} for document {d.get('document_id')!r}")
        names = []
        for cid in c.get("concept_ids") or []:
            if not isinstance(cid, int) or not 0 <= cid < len(concept_names):
                raise DataError(cpath, f"row {crow}", f"concept id {cid!r} out of range; expected "
                                f"0..{len(concept_names) - 1} (the concepts table)")
            names.append(concept_names[cid])
        by_index[k] = names
    doc.spans = [(bounds[i], bounds[i + 1], by_index.get(i, []))
                 for i in range(len(starts)) if bounds[i] < bounds[i + 1]]
    return doc


def read_atlas_concepts(path) -> list[dict]:
    """The atlas concepts table as dense [{name, description, group}] by concept_id."""
    rows = {}
    for row, r in iter_parquet_rows(path):
        cid = r.get("concept_id")
        if not isinstance(cid, int) or not isinstance(r.get("name"), str):
            raise DataError(str(path), f"row {row}", "expected integer concept_id and string name")
        rows[cid] = {"name": r["name"], "description": r.get("description") or "",
                     "group": r.get("group") or ""}
    if sorted(rows) != list(range(len(rows))):
        raise DataError(str(path), None, f"concept_id values must be dense 0..{len(rows) - 1}")
    return [rows[i] for i in range(len(rows))]
