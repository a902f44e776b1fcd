"""The Apache Beam corpus build: read -> validate -> label -> tokenize -> chunk ->
shard -> 64-bit ids -> ArrayRecord, then a manifest. Runs on any Beam runner
(DirectRunner by default); ``BuildConfig`` holds the corpus options, every
other argument is a Beam pipeline option.

Outputs go to a hidden sibling ``.<out>.tmp-<id>`` and are renamed to ``out``
only after the whole build succeeded, with ``manifest.json`` written last, so a
failed run never leaves shards that look complete (object stores copy instead of
renaming: ``corpus_finalize.publish``). Flags are range-checked (``check_config``)
before anything is read or written. Determinism: documents are
split (train/heldout) and sharded by a hash of their content, sorted by it
inside a shard, and ids are positions in the sorted shard, so the same input
gives byte-identical shards whatever the runner's ordering.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import uuid
from collections.abc import Callable

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from etils import epath

from cbm_lm.data import chunking, inputs, labelers as labelers_lib, shards
from cbm_lm.data import tokenizer as tokenizer_lib
from cbm_lm.data.concepts import ConceptVocab
from cbm_lm.data.corpus_finalize import finalize, publish
from cbm_lm.data.errors import DataError, unwrap

BAD = "bad"


@dataclasses.dataclass
class BuildConfig:
    out: str
    jsonl: list[str] = dataclasses.field(default_factory=list)   # files or globs
    atlas: str | None = None                                     # concept-atlas directory
    tokenizer: str | None = None                                 # tokenizer.json / ranks / dir
    vocab_size: int = 0            # train a BPE of this size on the input when no tokenizer
    concepts: str | None = None    # fixed concept vocabulary (names checked against it)
    max_concepts: int = 0          # error if the vocabulary is larger (0 = no limit)
    labelers: list[str] = dataclasses.field(default_factory=lambda: ["imported"])
    max_chunk_tokens: int = 128
    max_chunk_concepts: int = 8
    num_shards: int = 8
    heldout_shards: int = 1
    heldout_fraction: float = 0.02
    skip_bad_records: bool = False
    overwrite: bool = False
    tokenizer_sample_bytes: int = 64 << 20


def expand(patterns: list[str]) -> list[str]:
    """Sorted files matching each path or glob (local or gs://)."""
    files = []
    for pat in patterns:
        p = epath.Path(pat)
        if any(ch in pat for ch in "*?["):
            # the folder before the first wildcard anchors the glob ("." when there is none)
            head = pat[:min(pat.index(ch) for ch in "*?[" if ch in pat)]
            folder = head.rsplit("/", 1)[0] + "/" if "/" in head else ""
            anchor = epath.Path(folder or ".")
            matched = sorted(anchor.glob(pat[len(folder):]))
            if not matched:
                raise FileNotFoundError(f"{pat}: no files match")
            files += [str(m) for m in matched]
        elif p.is_dir():
            found = sorted(str(m) for m in p.iterdir() if m.name.endswith((".jsonl", ".jsonl.gz")))
            if not found:
                raise FileNotFoundError(f"{pat}: directory holds no input; expected .jsonl or "
                                        ".jsonl.gz files in it")
            files += found
        elif p.exists():
            files.append(str(p))
        else:
            raise FileNotFoundError(f"{pat}: no such file")
    return files


def check_config(cfg: BuildConfig) -> None:
    """Raises ValueError naming each out-of-range build flag and its value; build_corpus
    calls it before reading or writing anything (a 0 would otherwise surface deep inside
    Beam, e.g. --num_shards 0 as 'integer modulo by zero', or never return)."""
    bad = [f"--{flag} {getattr(cfg, flag)!r}: expected an integer >= 1"
           for flag in ("max_chunk_tokens", "max_chunk_concepts", "num_shards")
           if not getattr(cfg, flag) >= 1]
    bad += [f"--{flag} {getattr(cfg, flag)!r}: expected an integer >= 0 ({zero})"
            for flag, zero in (("vocab_size", "0 = use --tokenizer"),
                               ("max_concepts", "0 = no limit"))
            if not getattr(cfg, flag) >= 0]
    if 0 < cfg.vocab_size <= len(tokenizer_lib.SPECIALS):
        bad.append(_vocab_size_problem(cfg.vocab_size))
    frac = cfg.heldout_fraction
    if not 0 <= frac <= 1:
        bad.append(f"--heldout_fraction {frac!r}: expected a fraction in [0, 1]")
    elif frac > 0 and not cfg.heldout_shards >= 1:
        bad.append(f"--heldout_shards {cfg.heldout_shards!r}: expected an integer >= 1 when "
                   f"--heldout_fraction is {frac} (held-out documents need a shard)")
    elif not cfg.heldout_shards >= 0:
        bad.append(f"--heldout_shards {cfg.heldout_shards!r}: expected an integer >= 0")
    if bad:
        raise ValueError("invalid build flag(s): " + "; ".join(bad))


def _vocab_size_problem(vocab_size) -> str:
    n = len(tokenizer_lib.SPECIALS)
    return (f"--vocab_size {vocab_size!r}: expected an integer > {n} (the BPE vocabulary "
            f"includes the {n} special tokens {list(tokenizer_lib.SPECIALS)})")


def check_bpe_flags(vocab_size: int, heldout_fraction: float) -> None:
    """Raises ValueError naming each out-of-range flag of a BPE training run
    (tools/train_tokenizer.py, the demo corpus): before any input is read."""
    bad = []
    if not (isinstance(vocab_size, int) and vocab_size > len(tokenizer_lib.SPECIALS)):
        bad.append(_vocab_size_problem(vocab_size))
    if not 0 <= heldout_fraction <= 1:
        bad.append(f"--heldout_fraction {heldout_fraction!r}: expected a fraction in [0, 1]")
    if bad:
        raise ValueError("invalid flag(s): " + "; ".join(bad))


def check_out_dir(out, overwrite: bool) -> None:
    """Raises FileExistsError when ``out`` is a non-empty directory and not ``overwrite``
    (and when it is a file): before any work, so a rerun fails in a second, not after it."""
    out = epath.Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; choose another --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")


class _ReadJsonl(beam.DoFn):
    """One file -> LabelledDocs; bad lines raise or go to the BAD output."""

    def __init__(self, skip_bad: bool):
        self.skip_bad = skip_bad

    def process(self, path):
        default_source = inputs.default_source_for(path)
        for line_no, raw in inputs.iter_jsonl_lines(path):
            try:
                yield inputs.parse_jsonl_line(raw, path, line_no, default_source)
            except DataError as e:
                if not self.skip_bad:
                    raise
                yield beam.pvalue.TaggedOutput(BAD, str(e))


class _Label(beam.DoFn):
    def __init__(self, specs):
        self.specs = specs

    def setup(self):
        self.chain = labelers_lib.make_labelers(self.specs)

    def process(self, doc):
        yield labelers_lib.apply_labelers(doc, self.chain)


class _Encode(beam.DoFn):
    """Resolves concepts, tokenizes, chunks and keys each doc by (split, shard)."""

    def __init__(self, tokenizer_path, cfg: BuildConfig, vocab_file):
        self.tokenizer_path, self.cfg, self.vocab_file = tokenizer_path, cfg, vocab_file

    def setup(self):
        self.tok = tokenizer_lib.load(self.tokenizer_path)

    def process(self, doc, concept_names, source_names):
        cfg = self.cfg
        if not hasattr(self, "_maps") or self._maps[0] is not concept_names:
            self._maps = (concept_names, {n: i for i, n in enumerate(concept_names)},
                          {n: i for i, n in enumerate(source_names)})
        split = doc.split_for(cfg.heldout_fraction)
        try:
            if split == "heldout" and cfg.heldout_shards < 1:
                raise doc.error(f"field 'split' is 'heldout' but --heldout_shards is "
                                f"{cfg.heldout_shards}; expected 'train', or --heldout_shards >= 1")
            doc_ids, spans, tok_labels = chunking.resolve_doc(doc, self._maps[1], len(concept_names),
                                                              self.vocab_file)
            out = chunking.tokenize_and_chunk(doc, doc_ids, spans, tok_labels, self.tok,
                                              cfg.max_chunk_tokens, cfg.max_chunk_concepts)
        except DataError as e:
            if not cfg.skip_bad_records:
                raise
            yield beam.pvalue.TaggedOutput(BAD, str(e))
            return
        h = doc.hash()
        n = cfg.heldout_shards if split == "heldout" else cfg.num_shards
        shard = int.from_bytes(h[8:16], "big") % n
        out.update(hash=h, source_id=self._maps[2][doc.source], doc_key=doc.key)
        yield (split, shard), out


def _concept_names_of(doc) -> list[str]:
    names = [c for c in doc.concepts if isinstance(c, str)]
    names += [c for _, _, cs in doc.spans for c in cs if isinstance(c, str)]
    names += [c for _, _, c in doc.token_labels if isinstance(c, str)]
    return names


def _check_vocab_size(names, limit):
    if limit and len(names) > limit:
        raise ValueError(f"the input has {len(names)} distinct concepts but --max_concepts is "
                         f"{limit} (the model's n_known); expected at most {limit}")
    return names


def _write_json(obj, path):
    epath.Path(path).write_text(json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False))


def _bad_report(messages, path):
    messages = sorted(messages)
    _write_json({"count": len(messages), "examples": messages[:100]}, path)


def _sample_texts(files, budget, heldout_fraction):
    """Texts of the training split's documents, up to ``budget`` characters: the tokenizer
    never sees a held-out document (the split rule is LabelledDoc.split_for, the build's).
    Lines the build will reject are skipped here; the build reports them."""
    total = 0
    for f in files:
        source = inputs.default_source_for(f)
        for n, raw in inputs.iter_jsonl_lines(f):
            try:
                doc = inputs.parse_jsonl_line(raw, f, n, source)
            except DataError:
                continue
            if doc.split_for(heldout_fraction) != "train":
                continue
            total += len(doc.text)
            yield doc.text
            if total >= budget:
                return


def _prepare_tokenizer(cfg, files, tmp):
    if cfg.tokenizer:
        tok = tokenizer_lib.load(cfg.tokenizer)
    elif cfg.vocab_size:
        tok = tokenizer_lib.train_bpe(_sample_texts(files, cfg.tokenizer_sample_bytes,
                                                    cfg.heldout_fraction), cfg.vocab_size)
    else:
        raise ValueError("pass --tokenizer PATH or --vocab_size N (train one on the input)")
    return str(tok.save(tmp))


def unknown_pipeline_args(args: list[str]) -> list[str]:
    """The flags of ``args`` no Beam pipeline option knows (Beam itself only logs
    "Discarding unparseable args", so a mistyped build flag would be dropped silently),
    and the words that are no flag's value (``build_corpus.py --out c docs.jsonl``, a
    missing ``--jsonl``, would otherwise build without the file).

    A word counts as a flag's value when it follows that flag (written without ``=``) and
    Beam parsed it as the flag's value: after a switch (``--save_main_session docs.jsonl``)
    it is stray too.
    """
    if not args:
        return []
    opts = PipelineOptions(args)
    beam_log = logging.getLogger("apache_beam.options.pipeline_options")
    level = beam_log.level
    beam_log.setLevel(logging.ERROR)          # the warning this function turns into an error
    try:
        known = set(opts.get_all_options())
        values = opts.get_all_options(retain_unknown_options=True)
    finally:
        beam_log.setLevel(level)
    names = set(values) - known

    def name(flag: str) -> str:
        return flag.lstrip("-").split("=")[0].replace("-", "_")

    def is_value_of(word: str, flag: str) -> bool:
        if not flag.startswith("-") or "=" in flag:
            return False
        v = values.get(name(flag))
        if name(flag) not in values:     # a dest other than the flag's name: cannot tell
            return True
        return str(v) == word or (isinstance(v, list) and word in map(str, v))

    return [a for i, a in enumerate(args)
            if (name(a) in names if a.startswith("-")
                else not (i and is_value_of(a, args[i - 1])))]


def check_pipeline_args(args) -> None:
    """Raises ValueError naming the flags that are neither the tool's nor Beam's."""
    unknown = unknown_pipeline_args(list(args or []))
    if unknown:
        raise ValueError(f"unknown flag(s) {unknown}: neither a build flag nor a Beam pipeline "
                         f"option (see --help)")


def build_corpus(cfg: BuildConfig, pipeline_args: list[str] | None = None,
                 before_publish: Callable[[epath.Path], None] | None = None) -> dict:
    """Runs the build; returns the manifest. Raises DataError on bad input.

    ``before_publish(build_dir)``, when given, runs on the finished build (a readable
    corpus, manifest included) before it replaces ``cfg.out``: files it writes there are
    published with the corpus, and if it raises nothing is published.
    """
    check_pipeline_args(pipeline_args)
    check_config(cfg)
    out = epath.Path(cfg.out)
    check_out_dir(out, cfg.overwrite)
    if not cfg.jsonl and not cfg.atlas:
        raise ValueError("no input: pass --jsonl and/or --atlas")
    files = expand(cfg.jsonl) if cfg.jsonl else []
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    publishing = False
    try:
        tokenizer_path = _prepare_tokenizer(cfg, files, tmp)
        fixed_vocab, vocab_file = None, None
        if cfg.concepts:
            fixed_vocab, vocab_file = ConceptVocab.load(cfg.concepts), str(cfg.concepts)
        atlas_concepts = None
        if cfg.atlas:
            from cbm_lm.data import atlas_input
            atlas_concepts = atlas_input.concept_table(cfg.atlas)
            if fixed_vocab is None:
                fixed_vocab = ConceptVocab.from_names([c["name"] for c in atlas_concepts],
                                                      {c["name"]: c for c in atlas_concepts})
                vocab_file = str(cfg.atlas)
        if fixed_vocab is not None:
            _check_vocab_size(fixed_vocab.concepts, cfg.max_concepts)
            fixed_vocab.save(tmp / "concepts.json")
        _run_pipeline(cfg, files, tmp, tokenizer_path, fixed_vocab, vocab_file,
                      atlas_concepts, pipeline_args or [])
        manifest = finalize(tmp, cfg)
        if before_publish is not None:
            before_publish(tmp)
        publishing = True
        publish(tmp, out)
        return manifest
    except BaseException as e:
        # a remote publish that failed midway keeps the complete build (publish names it)
        if tmp.exists() and not (publishing and not shards.is_local(out)):
            shutil.rmtree(tmp, ignore_errors=True) if shards.is_local(tmp) else tmp.rmtree()
        data_error = unwrap(e)
        if data_error is not None and data_error is not e:
            raise data_error from None
        raise


def _run_pipeline(cfg, files, tmp, tokenizer_path, fixed_vocab, vocab_file, atlas_concepts,
                  pipeline_args):
    options = PipelineOptions(pipeline_args)
    with beam.Pipeline(options=options) as p:
        parts, bads = [], []
        if files:
            read = (p | "Files" >> beam.Create(files) | "Reshuffle" >> beam.Reshuffle()
                    | "ReadJsonl" >> beam.ParDo(_ReadJsonl(cfg.skip_bad_records)).with_outputs(
                        BAD, main="docs"))
            parts.append(read.docs)
            bads.append(read[BAD])
        if cfg.atlas:
            from cbm_lm.data import atlas_input
            docs, bad = atlas_input.read_atlas(p, cfg.atlas, tokenizer_path,
                                               [c["name"] for c in atlas_concepts],
                                               cfg.skip_bad_records)
            parts.append(docs)
            bads.append(bad)
        docs = (parts | "AllDocs" >> beam.Flatten()
                | "Label" >> beam.ParDo(_Label(cfg.labelers)))
        if fixed_vocab is not None:
            names = p | "Vocab" >> beam.Create([[c.name for c in fixed_vocab.concepts]])
        else:
            names = (docs | "ConceptNames" >> beam.FlatMap(_concept_names_of)
                     | "DistinctConcepts" >> beam.Distinct()
                     | "ConceptList" >> beam.combiners.ToList()
                     | "SortConcepts" >> beam.Map(sorted)
                     | "CheckVocab" >> beam.Map(_check_vocab_size, cfg.max_concepts))
            _ = (names | "VocabObj" >> beam.Map(lambda n: ConceptVocab.from_names(n).to_json())
                 | "WriteConcepts" >> beam.Map(lambda s: (tmp / "concepts.json").write_text(s)))
        sources = (docs | "Sources" >> beam.Map(lambda d: d.source)
                   | "DistinctSources" >> beam.Distinct()
                   | "SourceList" >> beam.combiners.ToList() | "SortSources" >> beam.Map(sorted))
        _ = sources | "WriteSources" >> beam.Map(lambda s: _write_json(
            {"sources": [{"id": i, "name": n} for i, n in enumerate(s)]}, tmp / "sources.json"))
        enc = docs | "Encode" >> beam.ParDo(
            _Encode(tokenizer_path, cfg, vocab_file),
            beam.pvalue.AsSingleton(names), beam.pvalue.AsSingleton(sources)).with_outputs(
                BAD, main="encoded")
        bads.append(enc[BAD])
        _ = (enc.encoded | "GroupByShard" >> beam.GroupByKey()
             | "WriteShards" >> beam.MapTuple(lambda key, ds: shards.write_shard(
                 tmp, key[0], key[1], cfg.heldout_shards if key[0] == "heldout" else cfg.num_shards,
                 list(ds))))
        _ = (bads | "AllBad" >> beam.Flatten() | "BadList" >> beam.combiners.ToList()
             | "BadReport" >> beam.Map(_bad_report, tmp / "bad_records.json"))
