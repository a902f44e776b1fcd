"""The Explainer API end to end on a tiny random diffusion model: generation with
commit-time capture agrees with the replayed passes, every chunk gets its three
views, steering is explained by the same identity, and the provenance slot is
filled by whatever is attached."""

import numpy as np
import pytest

from cbm_lm import Explainer
from cbm_lm.attribution.concept_attribution import concept_attribution
from cbm_lm.data.concepts import ConceptVocab
from model_fixtures import make_model, tiny_config

pytestmark = pytest.mark.slow        # compiles a sampler and an IG program


@pytest.fixture(scope="module")
def explainer():
    cfg = tiny_config(max_seq_len=64)
    vocab = ConceptVocab.from_names([f"topic:t{i}" for i in range(cfg.concepts.n_known)])
    return Explainer(make_model(cfg), concepts=vocab)


@pytest.fixture(scope="module")
def steered(explainer):
    steering = explainer.steer(amplify={"topic:t3": 6.0}, intervene={"topic:t7": 0.8, "u5": 0.5})
    gen = explainer.generate([[5, 9, 11], [4, 8, 15, 16, 23]], max_new_tokens=8, seed=3,
                             steering=steering)
    return gen, explainer.attribute(gen, n_steps=32)


def test_commit_time_capture_equals_the_replayed_pass(explainer, steered):
    gen, (inputs, concepts) = steered
    assert gen.trace.capture is not None
    assert gen.trace.steering.injection is not None and gen.trace.steering.intervention is not None
    replayed = concept_attribution(explainer.model, gen.trace, source="replay")
    for attr in (concepts, replayed):
        check = attr.verify(atol=1e-4)
        assert check.passed, str(check)
    np.testing.assert_array_equal(concepts.position, replayed.position)
    np.testing.assert_allclose(concepts.logit, replayed.logit, atol=1e-4)
    np.testing.assert_allclose(concepts.epsilon, replayed.epsilon, atol=1e-4)
    np.testing.assert_array_equal(np.sort(concepts.known_ids, -1), np.sort(replayed.known_ids, -1))
    # Concept 7 is held at 0.8 and epsilon is dropped in every steered pass.
    w7 = np.where(concepts.known_ids == 7, concepts.known_weights, 0).sum(-1)
    np.testing.assert_allclose(w7, 0.8, atol=1e-6)
    assert np.abs(concepts.epsilon).max() < 1e-5      # zero up to float rounding
    # IG's f(x) is the same logit, and completeness holds on the steered path.
    np.testing.assert_allclose(inputs.f_input, concepts.logit, atol=1e-4)
    gap = np.abs(inputs.completeness_gap())
    assert np.all(gap <= 0.05 * (1 + np.abs(inputs.f_input - inputs.f_baseline))), gap.max()


def test_explain_gives_three_views_per_chunk(explainer, steered):
    gen, views = steered
    calls = []

    def provenance(ex, g, chunk):
        calls.append((chunk.batch, chunk.start, chunk.end))
        return [{"chunk_id": 1, "score": 0.5}]

    explainer.provenance = provenance
    try:
        chunks = explainer.explain(gen, top_k=3, views=views)
    finally:
        explainer.provenance = None
    trace = gen.trace
    assert {c.batch for c in chunks} == {0, 1}
    for c in chunks:
        p, g = int(trace.prompt_lens[c.batch]), int(trace.gen_lens[c.batch])
        assert p <= c.start < c.end <= p + g
        assert 0 < len(c.top_concepts) <= 3 and -1 <= c.epsilon_share <= 1
        for e in c.top_concepts:
            want = f"topic:t{e['id']}" if e["type"] == "known" else f"u{e['id']}"
            assert e["name"] == want
        assert len(c.top_input_tokens) == 3
        for t in c.top_input_tokens:
            assert t["position"] < p + g and t["token_id"] == trace.tokens[c.batch, t["position"]]
        assert c.training_chunks == [{"chunk_id": 1, "score": 0.5}]
        row = c.to_json()
        assert set(row) >= {"start", "end", "text", "top_concepts", "epsilon_share",
                            "top_input_tokens", "training_chunks"}
    assert sorted(calls) == sorted((c.batch, c.start, c.end) for c in chunks)
    rows = explainer.to_json(gen, chunks)
    assert [len(r["tokens"]) for r in rows] == list(trace.gen_lens)
    assert rows[1]["prompt_ids"] == [4, 8, 15, 16, 23]


def test_text_view_lists_each_chunks_explanation(explainer, steered):
    """to_text (tools/generate.py without --json) shows what explain found for every chunk:
    its text, its top concepts in order with their scores, epsilon's share, and its top
    input tokens with their positions, the same entries as the JSON view."""
    gen, views = steered
    chunks = explainer.explain(gen, top_k=2, views=views)
    text = explainer.to_text(gen, chunks)
    blocks = text.split("--- chunk ")[1:]
    assert len(blocks) == len(chunks)
    for c, block in zip(chunks, blocks):
        lines = block.splitlines()
        assert f"[{c.start}, {c.end}) ---" in lines[0]
        # no tokenizer here: the chunk's ids stand for its text
        assert lines[1] == str([int(t) for t in gen.trace.tokens[c.batch, c.start:c.end]])
        concepts = next(ln for ln in lines if ln.startswith("    concepts: "))
        assert concepts == "    concepts: " + ", ".join(
            f"{e['name']} {e['score']:+.3f}" for e in c.top_concepts) + (
            f"; epsilon {c.epsilon_share:+.3f}")
        inputs = next(ln for ln in lines if ln.startswith("    input tokens: "))
        assert [int(x.split("@")[1].split()[0]) for x in inputs.split(", ")] == [
            t["position"] for t in c.top_input_tokens]
        assert len(c.top_concepts) == 2 and "training chunks" not in block


def test_teacher_forced_refuses_what_the_model_cannot_read(explainer):
    """As the samplers do (inference/prompts.layout): at most max_seq_len (64 here) tokens,
    every id inside the vocabulary (97)."""
    ok = explainer.teacher_forced(np.arange(64) % 90, 3)
    assert ok.trace.length == 64 and list(ok.trace.gen_lens) == [3]
    with pytest.raises(ValueError, match=r"65 tokens; the model's max_seq_len is 64"):
        explainer.teacher_forced(np.arange(65) % 90, 3)
    with pytest.raises(ValueError, match=r"id 97 is outside the vocabulary \[0, 97\)"):
        explainer.teacher_forced([1, 2, 97, 4], 2)


def test_generation_is_deterministic_and_batch_independent(explainer):
    a = explainer.generate([[5, 9, 11], [4, 8, 15, 16, 23]], max_new_tokens=8, seed=3,
                           capture=False)
    b = explainer.generate([[5, 9, 11], [4, 8, 15, 16, 23]], max_new_tokens=8, seed=3,
                           capture=False)
    np.testing.assert_array_equal(a.trace.tokens, b.trace.tokens)
    assert a.trace.capture is None


def test_bad_requests_fail_clearly(explainer):
    with pytest.raises(ValueError, match="no tokenizer"):
        explainer.generate("some text")
    with pytest.raises(ValueError, match="no known concept named 'topic:nope'"):
        explainer.steer(amplify={"topic:nope": 4.0})
    with pytest.raises(ValueError, match="give one"):
        explainer.steer(amplify={"topic:t1": 4.0}, suppress=["topic:t2"])


def test_explaining_one_chunk_attributes_only_its_tokens(explainer, steered):
    gen, views = steered
    full = [c for c in explainer.explain(gen, views=views) if c.batch == 1][0]
    (one,) = explainer.explain(gen, batch=1, chunk=0, n_steps=32)
    assert (one.start, one.end) == (full.start, full.end)
    assert one.top_concepts == full.top_concepts and one.epsilon_share == full.epsilon_share
    assert [t["position"] for t in one.top_input_tokens] == [
        t["position"] for t in full.top_input_tokens]
    np.testing.assert_allclose([t["score"] for t in one.top_input_tokens],
                               [t["score"] for t in full.top_input_tokens], atol=1e-6)
    with pytest.raises(IndexError, match="chunk 5"):
        explainer.explain(gen, batch=1, chunk=5)


def test_chunks_end_at_the_first_stop_token_and_jax_prompts_are_one_sequence(explainer):
    """Steerling's rule: a sequence ends at its first stop token (excluded). A diffusion row
    only stops at the end of the block holding it, so tokens after the stop are in the trace
    but must be in no chunk. A 1-D jax array is one prompt, as a list or numpy array is."""
    import jax.numpy as jnp
    prompts = [[5, 9, 11], [4, 8, 15, 16, 23]]
    free = explainer.generate(prompts, max_new_tokens=8, seed=3, capture=False)
    row = free.trace.generated(0)
    stop = int(row[2])
    first = int(np.flatnonzero(row == stop)[0])
    gen = explainer.generate(prompts, max_new_tokens=8, seed=3, capture=False,
                             stop_ids=(stop,))
    np.testing.assert_array_equal(gen.trace.generated(0)[:first + 1], row[:first + 1])
    p = int(gen.trace.prompt_lens[0])
    assert all(end <= p + first for _, end in gen.chunks[0])
    assert (gen.chunks[0][-1][1] == p + first) if first else gen.chunks[0] == []

    one = explainer.generate(jnp.asarray([5, 9, 11]), max_new_tokens=8, seed=3, capture=False)
    ref = explainer.generate([5, 9, 11], max_new_tokens=8, seed=3, capture=False)
    assert one.trace.batch_size == 1
    np.testing.assert_array_equal(one.trace.tokens, ref.trace.tokens)
