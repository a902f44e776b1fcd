"""Which training chunks and sources a text came from.

  python tools/provenance_query.py --workdir DIR (--text "..." | --queries FILE) [--k 10]
      [--json] [--method provenance|bm25|gradient] [--index logged|rekeyed]

--queries: one query per line (plain text, or JSONL with a "text" field), answered
in one process, batched. --json prints one JSON object per query:
{"query": i, "text": ..., "chunks": [{"chunk": j, "text": ..., "sources": {name: p},
  "matches": [{"chunk_id", "source", "score", "text"}]}]}
Needs tools/build_provenance_index.py --workdir DIR first.
"""

import json
import sys

from absl import app, flags, logging

from cbm_lm.config import ConfigError
from cbm_lm.provenance.open import INDEXES, open_query
from cbm_lm.provenance.query import read_queries
from cbm_lm.train.checkpoint import CheckpointError, load_model

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir with a provenance index.",
                               required=True)
_TEXT = flags.DEFINE_string("text", None, "One query text.")
_QUERIES = flags.DEFINE_string("queries", None, "File of queries, one per line.")
_K = flags.DEFINE_integer("k", 10, "Training chunks per query chunk.")
_JSON = flags.DEFINE_bool("json", False, "One JSON object per query on stdout.")
_METHOD = flags.DEFINE_enum("method", "provenance", ["provenance", "bm25", "gradient"],
                            "The provenance index, the BM25 baseline over training chunks, or "
                            "the projected-gradient reference (needs build --gradient).")
_INDEX = flags.DEFINE_enum("index", None, list(INDEXES), "Key store index of --method "
                           "provenance (default: the one the last build chose).")
_CORPUS = flags.DEFINE_string("corpus_dir", None, "Corpus (default: the run's data.dir).")


def _print_text(ans: dict) -> None:
    print(f"query {ans['query']}: {ans['text']!r}")
    for c in ans["chunks"]:
        top = sorted(c["sources"].items(), key=lambda kv: -kv[1])[:3]
        print(f"  chunk {c['chunk']}: {c['text']!r}")
        print("    sources: " + ", ".join(f"{n} {p:.2f}" for n, p in top))
        for r, m in enumerate(c["matches"], 1):
            print(f"    {r:2d}. {m['score']:.3f} [{m['source']}] {m['chunk_id']}: {m['text']!r}")


def main(argv):
    if len(argv) > 1:   # a stray word, e.g. the value of "--config.x False" (write x=False)
        raise app.UsageError(f"unexpected arguments {argv[1:]}; flags take --name=value")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if (_TEXT.value is None) == (_QUERIES.value is None):
        raise app.UsageError("pass exactly one of --text or --queries")
    if _K.value < 1:
        raise app.UsageError(f"--k must be >= 1, got {_K.value}")
    if _INDEX.value is not None and _METHOD.value != "provenance":
        raise app.UsageError(f"--index={_INDEX.value} picks the key index of --method "
                             f"provenance; --method={_METHOD.value} has none (drop --index)")
    try:
        texts = [_TEXT.value] if _TEXT.value is not None else read_queries(_QUERIES.value)
    except FileNotFoundError:
        sys.exit(f"provenance_query: error: --queries={_QUERIES.value}: no such file "
                 "(expected one query per line)")
    except ValueError as e:
        sys.exit(f"provenance_query: error: --queries: {e}")
    try:
        model, config = load_model(_WORKDIR.value)
        query = open_query(_WORKDIR.value, model, config, method=_METHOD.value,
                           index=_INDEX.value, corpus_dir=_CORPUS.value)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        sys.exit(f"provenance_query: error: {e}")
    for ans in query.answer(texts, k=_K.value):
        if _JSON.value:
            print(json.dumps(ans, ensure_ascii=False), flush=True)
        else:
            _print_text(ans)


if __name__ == "__main__":
    app.run(main)
