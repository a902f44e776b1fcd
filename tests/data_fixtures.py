"""Small corpus fixtures for the data tests (generated into tmp dirs)."""

from __future__ import annotations

import json
import pathlib

import pytest

from cbm_lm.data import tokenizer as tokenizer_lib
from cbm_lm.data.corpus_build import BuildConfig, build_corpus

PETS = [
    ("The cat sat on the mat. It purred all afternoon.", ["topic:cats"]),
    ("A dog barked at the mailman.\nThe dog was proud.", ["topic:dogs"]),
    ("Goldfish swim in small bowls and forget everything.", ["topic:fish"]),
]
CODE = [
    ("Python lists grow by doubling their capacity.", ["topic:python"]),
    ("Rust borrows are checked at compile time.", ["topic:rust"]),
]
# A chunk-labelled document: character spans with their own concepts.
CHUNKED_TEXT = "Dogs bark at night. Birds sing in the morning. Nothing else happens."
CHUNKED_SPANS = [(0, 19, ["topic:dogs"]), (19, 46, ["topic:birds"])]


def fixture_docs() -> list[dict]:
    docs = [{"text": t, "source": "pets", "concepts": c, "id": f"pets-{i}"}
            for i, (t, c) in enumerate(PETS)]
    docs += [{"text": t, "source": "code", "concepts": c, "id": f"code-{i}"}
             for i, (t, c) in enumerate(CODE)]
    docs.append({"text": CHUNKED_TEXT, "source": "pets", "id": "chunked",
                 "chunks": [{"start": s, "end": e, "concepts": c} for s, e, c in CHUNKED_SPANS]})
    # Filler so that packing, sharding and process splits have something to do.
    for i in range(40):
        docs.append({"text": f"Filler document number {i}. " * (1 + i % 5), "source": "filler",
                     "id": f"filler-{i}", "concepts": [f"topic:filler{i % 3}"]})
    return docs


def write_jsonl(path: pathlib.Path, docs) -> pathlib.Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def make_tokenizer(tmp: pathlib.Path) -> pathlib.Path:
    texts = [d["text"] for d in fixture_docs()] * 3
    return tokenizer_lib.train_bpe(texts, 400, min_frequency=1).save(tmp / "tok")


def build(tmp: pathlib.Path, docs=None, **kw) -> pathlib.Path:
    """Builds a corpus from ``docs`` (default: fixture_docs) into tmp/corpus."""
    tmp.mkdir(parents=True, exist_ok=True)
    src = write_jsonl(tmp / "input.jsonl", fixture_docs() if docs is None else docs)
    tok = kw.pop("tokenizer", None) or make_tokenizer(tmp)
    cfg = dict(out=str(tmp / "corpus"), jsonl=[str(src)], tokenizer=str(tok), num_shards=3,
               heldout_shards=1, heldout_fraction=0.0, max_chunk_tokens=16, max_chunk_concepts=4)
    cfg.update(kw)
    build_corpus(BuildConfig(**cfg))
    return pathlib.Path(cfg["out"])


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> pathlib.Path:
    return build(tmp_path_factory.mktemp("small"))
