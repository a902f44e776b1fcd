"""Planted facts: a deterministic synthetic provenance test set.

Invented entities (towns, people, companies, ...) each get exactly one fact
(an attribute with an invented value). Each fact is stated in exactly one
training chunk (a gazetteer document holds several facts, one chunk each),
and held-out queries paraphrase it, so provenance can be scored by whether
the fact's single source chunk is retrieved (Recall@k, MRR).

    facts = generate_facts(200, seed=0)
    docs = training_documents(facts)      # JSONL-ready dicts, source "planted_facts"
    qs = queries(facts)                   # [{fact_id, query, answer}]
    locate_facts(corpus_dir, facts)       # fact_id -> global chunk id after the build
"""

from __future__ import annotations

import dataclasses

import numpy as np

SOURCE = "planted_facts"

_ONSETS = "b br c d dr f g gl k kr l m n p pr qu r s st t tr v z".split()
_VOWELS = "a e i o u ai ea io ou".split()
_CODAS = ["", "", "n", "r", "l", "s", "th", "nd", "x"]

# kind -> (attribute, training statement, held-out paraphrased queries, value kind)
TEMPLATES = {
    "town": [
        ("river", "The town of {e} lies on the banks of the river {v}.",
         ["Which river flows past the town of {e}?", "{e} is a town beside which river?"], "name"),
        ("dish", "In {e} the traditional festival dish is {v} stew.",
         ["What stew do people in {e} eat at festivals?"], "name"),
    ],
    "person": [
        ("profession", "{e} worked for forty years as a {v}.",
         ["What was the lifelong occupation of {e}?", "{e} spent four decades in which trade?"],
         "profession"),
        ("birthplace", "{e} was born in the mountain village of {v}.",
         ["In which village was {e} born?"], "name"),
    ],
    "company": [
        ("product", "The {e} company is best known for making {v}.",
         ["What does the firm {e} mainly produce?", "{e} is famous for manufacturing what?"],
         "product"),
        ("founded", "The {e} company was founded in the year {v}.",
         ["When was the firm {e} established?"], "year"),
    ],
    "ship": [
        ("captain", "The ship {e} was commanded by captain {v}.",
         ["Who was the captain of the vessel {e}?"], "name"),
    ],
    "star": [
        ("color", "The distant star {e} shines with a {v} light.",
         ["What colour is the light of the star {e}?"], "color"),
    ],
}
_VALUES = {
    "profession": "glassblower cartographer beekeeper lamplighter clockmaker ropemaker "
                  "bookbinder falconer stonemason cooper tanner weaver".split(),
    "product": ["brass telescopes", "paper lanterns", "copper kettles", "wool blankets",
                "wooden clocks", "glass marbles", "leather saddles", "silk kites"],
    "color": "violet amber teal crimson silver indigo jade copper".split(),
}


@dataclasses.dataclass(frozen=True)
class Fact:
    id: str
    kind: str
    entity: str
    attribute: str
    value: str
    statement: str
    queries: tuple[str, ...]

    @property
    def concept(self) -> str:
        return f"fact:{self.attribute}"


def _name(rng, used: set) -> str:
    while True:
        n = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.integers(2, 4)))
        n = (n + rng.choice(_CODAS)).capitalize()
        if n not in used and len(n) >= 5:
            used.add(n)
            return n


def generate_facts(n: int = 200, seed: int = 0) -> list[Fact]:
    """``n`` facts with unique invented entities and values; deterministic in seed."""
    rng = np.random.default_rng(seed)
    used: set = set()
    slots = [(k, t) for k, ts in sorted(TEMPLATES.items()) for t in ts]
    facts = []
    for i in range(n):
        kind, (attr, stmt, qs, vkind) = slots[i % len(slots)]
        entity = _name(rng, used)
        if vkind == "name":
            value = _name(rng, used)
        elif vkind == "year":
            value = str(int(rng.integers(1200, 1900)))
        else:
            value = str(rng.choice(_VALUES[vkind]))
        facts.append(Fact(f"fact-{i:05d}", kind, entity, attr, value,
                          stmt.format(e=entity, v=value),
                          tuple(q.format(e=entity) for q in qs)))
    return facts


def concepts(facts: list[Fact]) -> dict[str, dict]:
    """Concept name -> {description, group, level} for the fact attributes used."""
    return {f.concept: {"description": f"a planted fact about an entity's {f.attribute}",
                        "group": "fact", "level": "chunk"} for f in facts}


def training_documents(facts: list[Fact], per_doc: int = 4) -> list[dict]:
    """Gazetteer documents; each fact is exactly one labelled chunk (forced train split)."""
    docs = []
    for d in range(0, len(facts), per_doc):
        text, chunks = "", []
        for f in facts[d:d + per_doc]:
            if text:
                text += "\n"
            chunks.append({"start": len(text), "end": len(text) + len(f.statement),
                           "concepts": [f.concept]})
            text += f.statement
        docs.append({"text": text, "source": SOURCE, "id": f"facts-{d // per_doc:05d}",
                     "split": "train", "chunks": chunks,
                     "facts": [f.id for f in facts[d:d + per_doc]]})
    return docs


def queries(facts: list[Fact]) -> list[dict]:
    """Held-out paraphrased queries: [{fact_id, query, answer, entity}]."""
    return [{"fact_id": f.id, "query": q, "answer": f.value, "entity": f.entity}
            for f in facts for q in f.queries]


def query_documents(facts: list[Fact]) -> list[dict]:
    """Queries with their answers as held-out documents (for held-out loss)."""
    return [{"text": f"{q['query']} {q['answer']}.", "source": SOURCE, "split": "heldout",
             "id": f"query-{i:05d}"} for i, q in enumerate(queries(facts))]


def locate_facts(corpus_dir, facts: list[Fact]) -> dict[str, int]:
    """fact_id -> global chunk id of the one training chunk stating it.

    Raises if a fact is found in zero or in more than one chunk.
    """
    from cbm_lm.data.corpus import Corpus

    c = Corpus(corpus_dir)
    tok, sid = c.tokenizer, c.sources.index(SOURCE)
    index = c.source_index("train")
    by_statement = {f.statement: f.id for f in facts}
    found: dict[str, list[int]] = {}
    from cbm_lm.data.source import ShardedArrayRecordSource
    src = ShardedArrayRecordSource(c.shards("train"))
    for i in np.nonzero(index["source_id"] == sid)[0]:
        rec = src[int(i)]
        for j in range(rec.num_chunks):
            text = tok.decode(rec.tokens[rec.chunk_bounds[j]:rec.chunk_bounds[j + 1]]).strip()
            if text in by_statement:
                found.setdefault(by_statement[text], []).append(int(rec.chunk_ids[j]))
    bad = {f.id: len(found.get(f.id, [])) for f in facts if len(found.get(f.id, [])) != 1}
    if bad:
        raise ValueError(f"{corpus_dir}: facts not stated in exactly one chunk: {dict(list(bad.items())[:5])}")
    return {k: v[0] for k, v in found.items()}
