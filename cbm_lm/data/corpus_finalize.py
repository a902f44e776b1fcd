"""Folds per-shard stats into ``manifest.json`` after the Beam run, and publishes the
finished build (``publish``).

Manifest fields: format, tokenizer (file, vocab_size, special ids),
max_chunk_tokens, max_chunk_concepts, num_concepts, splits.<split>.shards
([{file, records, tokens, chunks, sha256}]) and totals, sources.<name> and
concepts.<name> counts (documents/tokens/chunks; chunks labelled / tokens
labelled), bad_records, and ``content_hash``: sha256 over the shard hashes,
concepts.json, sources.json and the tokenizer files, in a fixed order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import uuid
from collections import Counter

from etils import epath

from cbm_lm.data import shards
from cbm_lm.data import tokenizer as tokenizer_lib

FORMAT = "cbm_lm.corpus/1"


def finalize(tmp, cfg) -> dict:
    tmp = epath.Path(tmp)
    tok = tokenizer_lib.load(tmp)
    concepts = json.loads((tmp / "concepts.json").read_text())["concepts"]
    if not (tmp / "sources.json").exists():  # no document survived
        (tmp / "sources.json").write_text(json.dumps({"sources": []}))
    sources = json.loads((tmp / "sources.json").read_text())["sources"]
    splits = {}
    per_source: dict[str, Counter] = {s["name"]: Counter() for s in sources}
    chunk_c, token_c = Counter(), Counter()
    truncated = 0
    for split, n in (("train", cfg.num_shards), ("heldout", cfg.heldout_shards)):
        entries = []
        for i in range(n):
            stats_file = tmp / shards.shard_name(split, i, n).replace(".array_record", ".stats.json")
            if not stats_file.exists():  # no document hashed to this shard
                shards.write_shard(tmp, split, i, n, [])
            st = json.loads(stats_file.read_text())
            stats_file.unlink()
            entries.append({k: st[k] for k in ("file", "records", "tokens", "chunks", "sha256")})
            for sid, c in st["sources"].items():
                per_source[sources[int(sid)]["name"]].update(c)
            chunk_c.update({int(k): v for k, v in st["chunk_concepts"].items()})
            token_c.update({int(k): v for k, v in st["token_concepts"].items()})
            truncated += st["truncated_concept_lists"]
        splits[split] = {"shards": entries, **{k: sum(e[k] for e in entries)
                                               for k in ("records", "tokens", "chunks")}}
    bad_file = tmp / "bad_records.json"
    bad = json.loads(bad_file.read_text()) if bad_file.exists() else {"count": 0, "examples": []}
    tok_files = sorted(f.name for f in tmp.iterdir()
                       if f.name in ("tokenizer.json", "tokenizer_spec.json", "tokenizer.tiktoken"))
    h = hashlib.sha256()
    for split in ("train", "heldout"):
        for e in splits[split]["shards"]:
            h.update(f"{e['file']}:{e['sha256']}\n".encode())
    for name in ["concepts.json", "sources.json", *tok_files]:
        h.update(name.encode() + b"\n" + (tmp / name).read_bytes())
    manifest = {
        "format": FORMAT,
        "tokenizer": {"files": tok_files, "vocab_size": tok.vocab_size, "pad_id": tok.pad_id,
                      "bos_id": tok.bos_id, "endofchunk_id": tok.endofchunk_id,
                      "mask_id": tok.mask_id},
        "max_chunk_tokens": cfg.max_chunk_tokens,
        "max_chunk_concepts": cfg.max_chunk_concepts,
        "num_concepts": len(concepts),
        "num_sources": len(sources),
        "splits": splits,
        "sources": {k: dict(sorted(v.items())) for k, v in sorted(per_source.items())},
        "concepts": {c["name"]: {"chunks": chunk_c.get(c["id"], 0),
                                 "tokens": token_c.get(c["id"], 0)} for c in concepts},
        "truncated_concept_lists": truncated,
        "bad_records": bad,
        "build": {k: v for k, v in dataclasses.asdict(cfg).items()
                  if k in ("labelers", "heldout_fraction", "num_shards", "heldout_shards")},
        "content_hash": h.hexdigest(),
    }
    if bad_file.exists():
        bad_file.unlink()
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True,
                                                  ensure_ascii=False))
    return manifest


def publish(tmp, out) -> None:
    """Moves the finished build ``tmp`` (a sibling of ``out``) into place at ``out``.

    Local: the old corpus renamed aside, the new one renamed in, then the old removed; a
    failure before the swap leaves the old corpus whole. Object stores have no directory
    rename: the new corpus is already complete at ``tmp`` before the old one is touched;
    then the old ``manifest.json`` goes first (a directory without one reads as incomplete,
    ``Corpus`` refuses it), the old files next, the new ones are copied with
    ``manifest.json`` last, and ``tmp`` is removed. A failure in between keeps ``tmp`` (the
    caller must not remove it) and raises naming it: the complete build survives there.
    """
    tmp, out = epath.Path(tmp), epath.Path(out)
    if shards.is_local(out):
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        if out.exists():
            out.rename(old)
        try:
            tmp.rename(out)  # atomic on one filesystem
        except BaseException:
            if old.exists() and not out.exists():
                old.rename(out)
            raise
        if old.exists():
            shutil.rmtree(old)
        return
    try:
        if out.exists():
            if (out / "manifest.json").exists():
                (out / "manifest.json").unlink()
            out.rmtree()
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == "manifest.json"):
            (out / f.name).write_bytes(f.read_bytes())
    except Exception as e:
        raise RuntimeError(
            f"{out}: copying the new corpus into place failed ({type(e).__name__}: {e}); readers "
            f"refuse {out} while it has no manifest.json. The complete build is kept at {tmp}: "
            f"copy its files to {out}, manifest.json last, or rerun the build") from e
    tmp.rmtree()
