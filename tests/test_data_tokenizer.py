"""Tokenizer: trained BPE special-id layout, losslessness, tiktoken ranks files."""

import base64

import numpy as np

from cbm_lm.data import tokenizer as T

TEXTS = ["the cat sat on the mat", "the dog ate the bone", "héllo wörld 日本語"] * 20


def test_trained_bpe_specials_at_end_and_lossless(tmp_path):
    tok = T.train_bpe(TEXTS, 300, min_frequency=1)
    V = tok.vocab_size
    assert V == 300
    assert (tok.pad_id, tok.bos_id, tok.endofchunk_id, tok.mask_id) == (V - 4, V - 3, V - 2, V - 1)
    s = "the cat <|mask|> héllo\n\tend"
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert tok.mask_id not in ids  # special strings in raw text stay text
    loaded = T.load(tok.save(tmp_path))
    assert loaded.encode(s) == ids and loaded.mask_id == V - 1
    again = T.train_bpe(TEXTS, 300, min_frequency=1)
    assert again._impl.to_str() == tok._impl.to_str()  # deterministic


def test_char_offsets_cover_text():
    tok = T.train_bpe(TEXTS, 300, min_frequency=1)
    s = "the wörld 日本 cat"
    ids = tok.encode(s)
    st, en = tok.char_offsets(s, ids)
    assert st[0] == 0 and en[-1] == len(s)
    assert np.all(st[1:] <= en[:-1]) and np.all(st <= en)
    # every ASCII token maps to exactly its own characters
    for i, a, b in zip(ids, st, en):
        piece = tok.decode([i])
        if piece.isascii():
            assert s[a:b] == piece


def _write_ranks(path, extra: list[bytes], n_filler: int = 0):
    toks = [bytes([b]) for b in range(256)] + extra
    toks += [b"\xff\xfe" + i.to_bytes(3, "big") for i in range(n_filler)]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(toks)))
    return len(toks)


def test_tiktoken_ranks_file(tmp_path):
    n = _write_ranks(tmp_path / "mini.tiktoken", [b"th", b"the", b" the", b"at", b" c"])
    tok = T.load(tmp_path / "mini.tiktoken")
    assert tok.kind == "tiktoken"
    assert (tok.pad_id, tok.bos_id, tok.endofchunk_id, tok.mask_id) == (n, n + 1, n + 2, n + 3)
    assert tok.vocab_size == n + 4
    ids = tok.encode("the cat <|pad|>")
    # hand-computed: "the" -> 257, " c" -> 260, "at" -> 259
    assert ids[:3] == [257, 260, 259]
    assert tok.pad_id not in ids and tok.decode(ids) == "the cat <|pad|>"
    loaded = T.load(tok.save(tmp_path / "saved"))
    assert loaded.encode("the cat") == tok.encode("the cat")
    assert loaded.mask_id == tok.mask_id


def test_tiktoken_cl100k_layout_gets_steerling_specials(tmp_path):
    n = _write_ranks(tmp_path / "cl100k_base.tiktoken", [], n_filler=T.CL100K_NUM_RANKS - 256)
    assert n == 100256
    tok = T.load(tmp_path / "cl100k_base.tiktoken")
    assert (tok.pad_id, tok.bos_id, tok.endofchunk_id, tok.mask_id) == (100277, 100278, 100279,
                                                                        100280)
    assert tok.vocab_size == 100281
    assert tok.decode(tok.encode("plain text")) == "plain text"


def test_tokenizer_texts_are_the_training_split_only(tmp_path):
    """The texts a tokenizer learns from are exactly the documents build_corpus
    puts in the training split (the held-out split is read back from the corpus)."""
    from cbm_lm.data.corpus import Corpus
    from cbm_lm.data.inputs import training_texts
    from data_fixtures import build, fixture_docs

    docs = fixture_docs() + [{"text": "Pinned to the held-out split.", "source": "pets",
                              "id": "pinned", "split": "heldout"}]
    corpus = Corpus(build(tmp_path, docs=docs, heldout_fraction=0.3))
    heldout = {r.doc_key for r in corpus.documents("heldout")}
    train = {r.doc_key for r in corpus.documents("train")}
    assert "pinned" in heldout and len(heldout) >= 5 and train      # both splits populated
    text_of = {d["id"]: d["text"] for d in docs}
    got = list(training_texts([tmp_path / "input.jsonl"], 0.3))
    assert sorted(got) == sorted(text_of[k] for k in train)
