"""The report's generation panels: what the provenance query is asked about."""

from __future__ import annotations

from cbm_lm.data.corpus import Corpus
from cbm_lm.eval import panels as panels_mod
from cbm_lm.eval.heldout import heldout_windows
from data_fixtures import small_corpus  # noqa: F401  (fixture)
from model_fixtures import make_model, tiny_config


def test_provenance_is_asked_about_the_chunks_text_without_inserted_spaces(small_corpus,
                                                                           monkeypatch):
    corpus = Corpus(small_corpus)
    tok = corpus.tokenizer
    model = make_model(tiny_config(vocab_size=tok.vocab_size, objective="autoregressive",
                                   attention="causal", max_seq_len=48))
    windows = heldout_windows(corpus, 2, 48, seed=0, split="train")

    # A random model rarely emits <|endofchunk|>: cut its generation into 5-token chunks.
    def five_token_chunks(trace, eoc_id, stop_ids=()):
        out = []
        for b in range(trace.batch_size):
            p, n = int(trace.prompt_lens[b]), int(trace.gen_lens[b])
            out.append([(s, min(s + 5, p + n)) for s in range(p, p + n, 5)])
        return out

    monkeypatch.setattr(panels_mod, "trace_chunks", five_token_chunks)
    asked = []

    def provenance(text):
        asked.append(text)
        return {"snippets": [], "sources": {}}

    panels, err = panels_mod.generation_panels(model, corpus, windows, num_prompts=1,
                                               prompt_len=4, max_new_tokens=20, ig_steps=2,
                                               provenance=provenance)
    assert len(panels) == 1 and len(asked) == 1 and err < 1e-3
    texts = [c["text"] for c in panels[0]["chunks"]]
    assert len(texts) == 4
    # Byte-level BPE decodes token by token, so the chunks' tokens decoded together read as
    # the chunk texts back to back: nothing is inserted where one chunk ends.
    assert asked[0] == "".join(texts)
