"""The corpus build refuses bad flags and empty inputs before any work, and replacing a
corpus never destroys the old one before the new one is complete (locally or on gs://);
remote shards are staged by their manifest sha256, never read stale."""

import json
import math
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest
from etils import epath

from cbm_lm.data import chunking, corpus_build, shards
from cbm_lm.data.corpus import Corpus
from cbm_lm.data.corpus_build import BuildConfig, build_corpus, expand
from cbm_lm.data.errors import DataError
from cbm_lm.data.source import ShardedArrayRecordSource, ShardRef

from data_fixtures import make_tokenizer, small_corpus, write_jsonl  # noqa: F401 (fixture)
from gcs_fixtures import bucket  # noqa: F401 (pytest fixture)

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = [{"text": f"Tiny document {i}: the {w} sat still.", "source": "s", "id": f"d{i}",
         "concepts": [f"topic:{w}"]} for i, w in enumerate(["cat", "dog", "owl", "fox"])]


def _no_hang(fn, seconds=5):
    """fn(), failed with TimeoutError if it runs past ``seconds`` (an endless loop)."""
    def alarm(*_):
        raise TimeoutError(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_split_points_refuses_a_zero_chunk_length_instead_of_looping():
    nl = np.zeros(10, bool)
    assert chunking._split_points(10, nl, 4) == [4, 8, 10]        # pieces <= 4 tokens
    assert chunking._split_points(3, nl, 1) == [1, 2, 3]
    for bad in (0, -2):
        with pytest.raises(ValueError, match=f"chunk length {bad} tokens.*expected an integer"):
            _no_hang(lambda: chunking._split_points(10, nl, bad))


@pytest.mark.parametrize("flag,value,expect", [
    ("max_chunk_tokens", 0, "--max_chunk_tokens 0: expected an integer >= 1"),
    ("max_chunk_concepts", 0, "--max_chunk_concepts 0: expected an integer >= 1"),
    ("num_shards", 0, "--num_shards 0: expected an integer >= 1"),
    ("heldout_fraction", -0.1, "--heldout_fraction -0.1: expected a fraction in [0, 1]"),
    ("heldout_fraction", 1.5, "--heldout_fraction 1.5: expected a fraction in [0, 1]"),
    ("heldout_fraction", math.nan, "--heldout_fraction nan: expected a fraction in [0, 1]"),
    ("heldout_shards", 0, "--heldout_shards 0: expected an integer >= 1 when --heldout_fraction "
                          "is 0.02"),
])
def test_out_of_range_flags_are_refused_before_any_work(tmp_path, monkeypatch, flag, value,
                                                        expect):
    src = write_jsonl(tmp_path / "in.jsonl", DOCS)

    def started(*a, **k):
        raise AssertionError("the build started")
    monkeypatch.setattr(corpus_build, "_prepare_tokenizer", started)
    with pytest.raises(ValueError) as e:
        build_corpus(BuildConfig(out=str(tmp_path / "c"), jsonl=[str(src)], vocab_size=300,
                                 **{"heldout_fraction": 0.02, flag: value}))
    assert expect in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]    # nothing written


def test_zero_heldout_shards_build_until_a_document_asks_for_heldout(tmp_path):
    """--heldout_shards 0 is fine with --heldout_fraction 0 (no document is held out by
    hash), but a document whose own split is 'heldout' then has no shard: a bad record
    naming its line, not Beam's 'integer modulo by zero'."""
    corpus_build.check_config(BuildConfig(out="x", heldout_fraction=0.0, heldout_shards=0))
    tok = make_tokenizer(tmp_path)
    src = write_jsonl(tmp_path / "in.jsonl", DOCS[:2] + [dict(DOCS[2], split="heldout")])
    with pytest.raises(DataError) as e:
        build_corpus(BuildConfig(out=str(tmp_path / "c"), jsonl=[str(src)], tokenizer=str(tok),
                                 heldout_fraction=0.0, heldout_shards=0, num_shards=1))
    assert f"{src}:3:" in str(e.value) and "--heldout_shards is 0" in str(e.value)
    assert not (tmp_path / "c").exists()


def test_the_cli_names_a_bad_flag_and_exits_2(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", DOCS)
    r = subprocess.run([sys.executable, "tools/build_corpus.py", "--out", str(tmp_path / "o"),
                        "--jsonl", str(src), "--vocab_size", "300", "--num_shards", "0"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2, r.stderr
    assert "--num_shards 0: expected an integer >= 1" in r.stderr
    assert "modulo" not in r.stderr and not (tmp_path / "o").exists()


def test_a_jsonl_directory_without_jsonl_files_is_refused(tmp_path):
    d = tmp_path / "inputs"
    d.mkdir()
    (d / "notes.txt").write_text("not an input\n")
    (d / "data.json").write_text("{}\n")
    with pytest.raises(FileNotFoundError, match=r"inputs: directory holds no input; expected "
                                                r"\.jsonl or \.jsonl\.gz files"):
        expand([str(d)])
    with pytest.raises(FileNotFoundError, match="inputs"):
        build_corpus(BuildConfig(out=str(tmp_path / "c"), jsonl=[str(d)], vocab_size=300))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]
    write_jsonl(d / "a.jsonl", DOCS)
    assert expand([str(d)]) == [str(d / "a.jsonl")]


def _keys(corpus_dir) -> set[str]:
    c = Corpus(corpus_dir)
    return {r.doc_key for split in ("train", "heldout") for r in c.documents(split)}


def test_a_remote_publish_failing_midway_keeps_the_complete_build(bucket, tmp_path,
                                                                   monkeypatch):
    """gs:// has no directory rename: the old corpus is removed, then the new one copied
    in. A copy failing midway leaves the destination without a manifest (readers refuse
    it) and the complete new build at its temporary sibling, named by the error."""
    tok = str(make_tokenizer(tmp_path))
    cfg = dict(out="gs://b/corpus", tokenizer=tok, num_shards=2, heldout_fraction=0.0,
               overwrite=True)
    old = write_jsonl(tmp_path / "old.jsonl", DOCS[:2])
    build_corpus(BuildConfig(jsonl=[str(old)], **cfg))
    assert _keys("gs://b/corpus") == {"d0", "d1"}

    gpath = type(epath.Path("gs://b/corpus"))
    real = gpath.write_bytes

    def write_bytes(self, data):
        if self.parent.name == "corpus" and self.name.startswith("train-00001"):
            raise OSError("connection reset")
        return real(self, data)
    monkeypatch.setattr(gpath, "write_bytes", write_bytes)
    new = write_jsonl(tmp_path / "new.jsonl", DOCS)
    with pytest.raises((OSError, RuntimeError), match="connection reset") as e:
        build_corpus(BuildConfig(jsonl=[str(new)], **cfg))
    kept = [p for p in (bucket / "b").iterdir() if p.name.startswith(".corpus.tmp-")]
    assert len(kept) == 1 and f"gs://b/{kept[0].name}" in str(e.value)
    assert _keys(f"gs://b/{kept[0].name}") == {"d0", "d1", "d2", "d3"}   # the whole new build
    with pytest.raises(FileNotFoundError, match="no manifest"):
        Corpus("gs://b/corpus")
    monkeypatch.setattr(gpath, "write_bytes", real)
    build_corpus(BuildConfig(jsonl=[str(new)], **cfg))
    assert _keys("gs://b/corpus") == {"d0", "d1", "d2", "d3"}
    assert not (tmp_path / "gs:").exists()


def _write_shard(directory, key: str) -> dict:
    doc = {"hash": b"\0" * 16, "source_id": 0, "doc_key": key,
           "tokens": np.arange(3, dtype=np.int32), "chunk_bounds": np.array([0, 3], np.int32),
           "chunk_concepts": np.full((1, 1), -1, np.int32),
           "token_spans": np.zeros((0, 3), np.int32)}
    return shards.write_shard(directory, "train", 0, 1, [doc])


def test_a_shard_rebuilt_in_place_is_not_read_from_a_stale_cache(bucket, tmp_path):
    """Remote shards are staged to a local cache; a corpus rebuilt at the same path with
    the same record counts must read the new bytes (the manifest's sha256 names them)."""
    remote = epath.Path("gs://b/c")
    remote.mkdir(parents=True)
    path = "gs://b/c/train-00000-of-00001.array_record"
    cache = str(tmp_path / "cache")
    first = _write_shard(remote, "old")
    assert ShardedArrayRecordSource([ShardRef(path, 1, first["sha256"])],
                                    cache_dir=cache)[0].doc_key == "old"
    second = _write_shard(remote, "new")                 # rebuilt in place, one record again
    assert second["sha256"] != first["sha256"]
    assert ShardedArrayRecordSource([ShardRef(path, 1, second["sha256"])],
                                    cache_dir=cache)[0].doc_key == "new"
    assert ShardedArrayRecordSource([(path, 1, second["sha256"])],
                                    cache_dir=cache)[0].doc_key == "new"
    # a manifest read before the rebuild: refused, not read as the old bytes' cache
    with pytest.raises(ValueError, match=f"{path}: sha256 {second['sha256']} but the manifest "
                                         f"says {first['sha256']}"):
        ShardedArrayRecordSource([ShardRef(path, 1, first["sha256"])],
                                 cache_dir=str(tmp_path / "fresh"))[0]


def test_corpus_shards_carry_the_manifest_sha256(small_corpus):
    import hashlib
    import pickle
    manifest = json.loads((small_corpus / "manifest.json").read_text())
    refs = Corpus(small_corpus).shards("train")
    for ref, entry in zip(refs, manifest["splits"]["train"]["shards"], strict=True):
        path, n = ref                                     # still unpacks as a pair
        assert (path, n) == (str(small_corpus / entry["file"]), entry["records"])
        assert ref.sha256 == hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()
        assert pickle.loads(pickle.dumps(ref)).sha256 == ref.sha256
