"""Building the provenance index of a training workdir (tools/build_provenance_index.py).

  WORKDIR/provenance/keys/logged/     training-time key store (cbm_lm/train/chunk_keys.py)
  WORKDIR/provenance/keys/rekeyed/    every training chunk keyed with one checkpoint
  WORKDIR/provenance/index/<name>/    faiss index over a store (cbm_lm/provenance/index.py)
  WORKDIR/provenance/mass.npy         concept x source mass used for source distributions:
                                      mass-rekeyed.npy if there is one, else mass-train.npy
  WORKDIR/provenance/word-mass.npy    hashed-word x source mass of the re-keying pass (the
                                      word expert of source distributions, source_mass.py)
  WORKDIR/provenance/DEFAULT          the index queries use unless told otherwise

Without a training-time key store (a run trained before logging existed, or
with provenance.log_keys off), building re-keys with the checkpoint instead.
A re-keyed index already built from the same checkpoint step, corpus and
re-keying config is reused unless ``rekey`` asks for a new pass (the pass is the
whole cost: about 100 s on the demo run; the eval binary builds it first).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os

import ml_collections
import numpy as np
from etils import epath

from cbm_lm.atomic_io import write_npy_atomic, write_text_atomic
from cbm_lm.config import ProvenanceConfig
from cbm_lm.data.corpus import Corpus
from cbm_lm.default_config import base_config
from cbm_lm.provenance import keystore
from cbm_lm.provenance.index import KeyIndex
from cbm_lm.provenance.rekey import read_mass, rekey_corpus
from cbm_lm.train.checkpoint import restore_source_mass

PROVENANCE_DIR = "provenance"
LOGGED, REKEYED = "logged", "rekeyed"
MASS_OF = "mass-{}.npy"
WORD_MASS = "word-mass.npy"
MASS_KINDS = {"train": "summed by the train step over every training token, from the checkpoint",
              REKEYED: "one re-keying pass over the corpus"}


def provenance_config(config: ml_collections.ConfigDict) -> ProvenanceConfig:
    """The run's provenance section, defaults filled for configs that predate it."""
    values = base_config().provenance.to_dict()
    saved = dict(config.get("provenance", {}) or {})
    if saved and "hashed_vectors" not in saved:   # its keys were drawn before signs existed
        saved["hashed_vectors"] = "gaussian"
    values.update(saved)
    return ProvenanceConfig.from_config(values)


def corpus_dir(config: ml_collections.ConfigDict, workdir, override: str | None = None) -> str:
    """The run's corpus: ``override``, else config data.dir (as given, then next to WORKDIR)."""
    if override:        # an explicit corpus is strict: no fallback to a look-alike elsewhere
        if not (epath.Path(override) / "manifest.json").exists():
            what = "directory has no manifest.json" if epath.Path(override).exists() else \
                "no such directory"
            raise FileNotFoundError(f"corpus_dir {override}: {what}; expected a corpus built "
                                    "by tools/build_corpus.py")
        return override
    d = config.data.dir
    candidates = [d, os.path.join(os.path.dirname(os.path.abspath(os.fspath(workdir))),
                                  os.path.basename(d.rstrip("/")))]
    for c in candidates:
        if c and (epath.Path(c) / "manifest.json").exists():
            return c
    raise FileNotFoundError(f"no corpus at {candidates} (from config data.dir of {workdir}); "
                            "pass --corpus_dir")


def root(workdir) -> epath.Path:
    return epath.Path(workdir) / PROVENANCE_DIR


def store_path(workdir, name: str) -> epath.Path:
    return root(workdir) / "keys" / name


def index_path(workdir, name: str) -> epath.Path:
    return root(workdir) / "index" / name


def has_store(path) -> bool:
    p = epath.Path(path)
    return p.exists() and any(keystore.segments(d) for d in p.iterdir() if d.name.startswith("p"))


def manifest_sha256(corpus: Corpus) -> str:
    """The corpus's identity for indexes built from it: the sha256 of its manifest.json
    (the manifest lists every shard with its hash, so a rebuilt corpus or another one
    differs; a copy of the same corpus elsewhere does not)."""
    return hashlib.sha256((epath.Path(corpus.dir) / "manifest.json").read_bytes()).hexdigest()


def rekey_fingerprint(prov: ProvenanceConfig, step: int, corpus: Corpus, seq_len: int) -> dict:
    """What a re-keyed store depends on: the checkpoint step, the re-keying config (width,
    context, lexical features, weights, seeds), the window length and the corpus (its
    manifest's digest)."""
    return {"checkpoint_step": int(step), "corpus_manifest_sha256": manifest_sha256(corpus),
            "seq_len": int(seq_len), "config": json.loads(json.dumps(dataclasses.asdict(prov)))}


def reusable_rekeyed(workdir, fingerprint: dict) -> dict | None:
    """The meta of the re-keyed index of ``workdir`` when it was built with ``fingerprint``
    and its store is intact; None otherwise (indexes from before the fingerprint never match)."""
    meta_file = index_path(workdir, REKEYED) / "meta.json"
    if not (meta_file.exists() and has_store(store_path(workdir, REKEYED))):
        return None
    meta = json.loads(meta_file.read_text())
    if meta.get("rekeyed_with") != fingerprint:
        return None
    meta.pop("mu", None)
    return meta


def index_store(workdir, name: str, prov: ProvenanceConfig, step: int, log=print,
                extra_meta: dict | None = None) -> KeyIndex:
    rows = keystore.read_store(store_path(workdir, name))
    # rows logged after the checkpoint (a run killed after a flush, or still training) are
    # keys of a model the index does not describe; resuming drops them, so must the index
    late = rows["steps"] > step
    if late.any():
        if late.all():
            raise ValueError(
                f"{store_path(workdir, name)}: every logged row is from after checkpoint step "
                f"{step} (earliest step {int(rows['steps'].min())}): the store describes no "
                f"model of this checkpoint; index a later checkpoint, or re-key this one")
        log(f"{name}: leaving out {int(late.sum())} rows logged after step {step}")
        rows = {k: v[~late] for k, v in rows.items()}
    ids, keys = keystore.latest_keys(rows)
    # the lexical features its keys hold, for queries to key alike: the train step logs
    # tokens + bigrams (no tokenizer), re-keying uses provenance.lexical
    lexical = prov.lexical if name == REKEYED else "tokens"
    idx = KeyIndex.build(ids, keys, prov, meta={"store": name, "checkpoint_step": int(step),
                                                 "rows": int(len(rows["ids"])),
                                                 "lexical": lexical,
                                                 "hashed_vectors": prov.hashed_vectors,
                                                 **(extra_meta or {})})
    idx.save(index_path(workdir, name))
    log(f"{name}: indexed {len(ids)} chunks ({len(rows['ids'])} rows) as {idx.meta['kind']}, "
        f"{idx.nbytes() / len(ids):.0f} bytes/chunk -> {index_path(workdir, name)}")
    return idx


class UnusedRekeyOverrides(ValueError):
    """Re-keying overrides given where nothing would be re-keyed (``build_index``)."""


# the provenance fields a build may override for re-keying, and the index tool's flags for them
REKEY_FLAGS = {"rekey_context": "--context", "rekey_d_p": "--rekey_d_p"}


def build_index(workdir, model, config, step: int, *, rekey: bool = False,
                rekey_overrides: dict | None = None, corpus: Corpus | None = None,
                batch_sharding=None, log=print) -> dict:
    """Builds the index(es) of ``workdir``; returns {name: meta} of what was built.

    rekey_overrides: provenance fields of REKEY_FLAGS to re-key with instead of the
    config's. They only act where a re-keyed index is built or reused; on a run with a
    training-time key store, without ``rekey`` and with no re-keyed index of ``step``
    built with them, nothing is re-keyed, and the changed fingerprint would only set
    the re-keyed index on disk aside (and delete its masses). That case raises
    UnusedRekeyOverrides, naming the flags, before anything is written.
    """
    if rekey_overrides:
        unknown = sorted(set(rekey_overrides) - set(REKEY_FLAGS))
        if unknown:
            raise ValueError(f"rekey_overrides {unknown}: only {sorted(REKEY_FLAGS)} set how "
                             "re-keying keys")
        config = config.copy_and_resolve_references()
        config.provenance = dict(config.get("provenance", {}) or {}, **rekey_overrides)
    prov = provenance_config(config)
    corpus = corpus or Corpus(corpus_dir(config, workdir))
    logged = has_store(store_path(workdir, LOGGED))
    rprov = prov.for_rekeying()
    fingerprint = rekey_fingerprint(rprov, step, corpus, config.data.seq_len)
    reuse = None if rekey else reusable_rekeyed(workdir, fingerprint)
    if rekey_overrides and logged and not rekey and reuse is None:
        given = ", ".join(f"{REKEY_FLAGS[k]}={v}" for k, v in sorted(rekey_overrides.items()))
        raise UnusedRekeyOverrides(
            f"{given} set how chunks are re-keyed, but nothing would be re-keyed: "
            f"{store_path(workdir, LOGGED)} holds training-time keys and no re-keyed index of "
            f"step {step} was built with them, so the build would index the logged keys and set "
            f"the re-keyed index on disk aside; pass --rekey to re-key with them, or leave them "
            f"out")
    root(workdir).mkdir(parents=True, exist_ok=True)
    built = {}
    if reuse is not None:
        built[REKEYED] = reuse
        log(f"{REKEYED}: reusing the index of step {step} already built with this config and "
            f"corpus ({reuse['n']} chunks, d_p {reuse['d_p']}); --rekey builds it again")
    elif rekey or not logged:
        if not logged and not rekey:
            log(f"no training-time key store at {store_path(workdir, LOGGED)}: re-keying every "
                f"training chunk with the checkpoint of step {step} instead")
        stats = rekey_corpus(model, corpus, rprov, config.data.seq_len,
                             store_path(workdir, REKEYED), batch_sharding=batch_sharding, log=log)
        log(f"re-keyed {stats['chunks']} chunks in {stats['seconds']:.1f}s "
            f"(context={prov.rekey_context}, d_p {rprov.d_p}, step {step})")
        built[REKEYED] = index_store(workdir, REKEYED, rprov, step, log,
                                     extra_meta={"rekeyed_with": fingerprint}).meta
    if logged:
        built[LOGGED] = index_store(workdir, LOGGED, prov, step, log).meta
    # a re-keyed store not (re)built or reused above belongs to another step, config or
    # corpus: its masses are not this checkpoint's
    fresh = REKEYED in built
    if not fresh and index_path(workdir, REKEYED).exists():
        log(f"{REKEYED}: the index on disk was built for another step, config or corpus; "
            f"not used (--rekey builds it for step {step})")
    masses = {"train": restore_source_mass(workdir, step),
              REKEYED: read_mass(store_path(workdir, REKEYED)) if fresh else None}
    masses = {k: v for k, v in masses.items() if v is not None and v.sum() > 0}
    for name, m in masses.items():    # each kept, for the benchmark to compare
        write_npy_atomic(root(workdir) / MASS_OF.format(name), m.astype(np.float32))
    if masses:
        # the re-keying pass's mass first: it comes from the same clean pass (chunk context,
        # final checkpoint) that keys queries, where the train step's is summed over training
        # passes of a changing model (held-out source accuracy on the demo run: 0.812 vs 0.733)
        name = REKEYED if REKEYED in masses else next(iter(masses))
        write_npy_atomic(root(workdir) / "mass.npy", masses[name].astype(np.float32))
        log(f"source distributions use the {name} mass ({MASS_KINDS[name]})")
    elif (root(workdir) / "mass.npy").exists():    # an earlier build's: not this checkpoint's
        (root(workdir) / "mass.npy").unlink()
        log("no source mass for this checkpoint: source distributions fall back to the prior")
    word_mass = read_mass(store_path(workdir, REKEYED), "word-mass-p*.npy") if fresh else None
    if not fresh:                 # derived from the stale store: queries must not read them
        for stale in (root(workdir) / WORD_MASS, root(workdir) / MASS_OF.format(REKEYED)):
            if stale.exists():
                stale.unlink()
    if word_mass is not None and word_mass.sum() > 0:
        write_npy_atomic(root(workdir) / WORD_MASS, word_mass.astype(np.float32))
        log("source distributions add the word x source mass of the re-keying pass")
    default = REKEYED if REKEYED in built else LOGGED
    write_text_atomic(root(workdir) / "DEFAULT", default + "\n")
    log(f"default index for queries: {default}")
    return built


def current_index(workdir, step: int, corpus: Corpus) -> str | None:
    """The default index's name when it describes checkpoint ``step`` (and, for a re-keyed
    index, this corpus), whatever keying it was built with; None otherwise (none, or stale).

    What the eval reuses as is: an index a user built with other re-keying flags stays
    theirs (``build_index`` would rebuild it for the saved config)."""
    try:
        name = default_index(workdir)
    except FileNotFoundError:
        return None
    meta_file = index_path(workdir, name) / "meta.json"
    if not meta_file.exists():
        return None
    meta = json.loads(meta_file.read_text())
    if int(meta.get("checkpoint_step", -1)) != int(step):
        return None
    built_on = meta.get("rekeyed_with", {}).get("corpus_manifest_sha256")
    if built_on is not None and built_on != manifest_sha256(corpus):
        return None
    return name


def default_index(workdir) -> str:
    p = root(workdir) / "DEFAULT"
    if not p.exists():
        raise FileNotFoundError(f"{workdir}: no provenance index; run "
                                f"tools/build_provenance_index.py --workdir {workdir}")
    return p.read_text().strip()


def load_mass(workdir, name: str | None = None) -> np.ndarray | None:
    """mass.npy, or the named one (train | logged | rekeyed | "word"); None when absent."""
    p = root(workdir) / ("mass.npy" if name is None else WORD_MASS if name == "word"
                         else MASS_OF.format(name))
    return np.load(io.BytesIO(p.read_bytes()), allow_pickle=False) if p.exists() else None
