"""Block-causal and segment masks: a token never sees a later block or another
packed document, and does see every earlier-or-same-block token of its own."""

import jax.numpy as jnp
import numpy as np
import pytest

from cbm_lm.model.attention import attention_mask
from model_fixtures import make_model, random_tokens, tiny_config


def test_block_causal_mask_by_hand():
    pos = jnp.arange(6)[None]
    seg = jnp.ones((1, 6), jnp.int32)
    m = np.asarray(attention_mask(pos, seg, "block_causal", 2))[0, 0].astype(int)
    expected = np.array([[1, 1, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0],
                         [1, 1, 1, 1, 0, 0],
                         [1, 1, 1, 1, 0, 0],
                         [1, 1, 1, 1, 1, 1],
                         [1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(m, expected)
    causal = np.asarray(attention_mask(pos, seg, "causal", 2))[0, 0]
    np.testing.assert_array_equal(causal, np.tril(np.ones((6, 6), bool)))


def test_segment_mask_by_hand():
    pos = jnp.array([[0, 1, 2, 0, 1, 0]])
    seg = jnp.array([[1, 1, 1, 2, 2, 0]])
    m = np.asarray(attention_mask(pos, seg, "block_causal", 2))[0, 0].astype(int)
    expected = np.array([[1, 1, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0],
                         [0, 0, 0, 1, 1, 0],
                         [0, 0, 0, 1, 1, 0],
                         [0, 0, 0, 0, 0, 1]])
    np.testing.assert_array_equal(m, expected)


def _changed_positions(model, tokens, p, **kw):
    """Which output positions change when token p is replaced."""
    other = tokens.at[:, p].set((tokens[:, p] + 1) % model.config.vocab_size)
    a, b = model(tokens, **kw).logits, model(other, **kw).logits
    return np.asarray(jnp.abs(a - b).max(axis=(0, 2)) > 1e-6)


@pytest.mark.parametrize("attention", ["block_causal", "causal"])
def test_model_information_flow(attention):
    cfg = tiny_config(attention=attention, diffusion_block_size=4)
    model = make_model(cfg)
    tokens = random_tokens(cfg, 1, 16)
    changed = _changed_positions(model, tokens, p=5)   # block 1 = positions 4..7
    if attention == "block_causal":
        expected = np.arange(16) >= 4                  # its own block and later blocks
    else:
        expected = np.arange(16) >= 5
    np.testing.assert_array_equal(changed, expected)


def test_packed_documents_do_not_interact():
    cfg = tiny_config(diffusion_block_size=4)
    model = make_model(cfg)
    tokens = random_tokens(cfg, 1, 16)
    seg = jnp.array([[1] * 6 + [2] * 10])
    pos = jnp.array([list(range(6)) + list(range(10))])
    changed = _changed_positions(model, tokens, p=2, positions=pos, segment_ids=seg)
    np.testing.assert_array_equal(changed, np.arange(16) < 6)
    changed = _changed_positions(model, tokens, p=8, positions=pos, segment_ids=seg)
    # doc 2 position 2 -> block 0 of doc 2 = packed positions 6..9; later blocks follow.
    np.testing.assert_array_equal(changed, np.arange(16) >= 6)
    # A packed document gives the same outputs as the document alone.
    alone = model(tokens[:, 6:]).logits
    packed = model(tokens, positions=pos, segment_ids=seg).logits[:, 6:]
    np.testing.assert_allclose(packed, alone, atol=1e-5)


def test_two_stream_mask_by_hand():
    """[noisy | clean] copies, block size 2. Row 0: one 4-token document. Row 1: a
    3-token and a 1-token document packed (positions restart). A noisy token sees the
    noisy tokens of its own block and the clean tokens of earlier blocks of its
    document; a clean token sees clean tokens block-causally."""
    pos = jnp.array([[0, 1, 2, 3] * 2, [0, 1, 2, 0] * 2], jnp.int32)
    seg = jnp.array([[1, 1, 1, 1] * 2, [1, 1, 1, 2] * 2], jnp.int32)
    stream = jnp.array([[0] * 4 + [1] * 4] * 2, jnp.int32)
    #               n0 n1 n2 n3  c0 c1 c2 c3
    one_doc = [[1, 1, 0, 0, 0, 0, 0, 0],   # n0
               [1, 1, 0, 0, 0, 0, 0, 0],   # n1
               [0, 0, 1, 1, 1, 1, 0, 0],   # n2: own noisy block + clean block 0
               [0, 0, 1, 1, 1, 1, 0, 0],   # n3
               [0, 0, 0, 0, 1, 1, 0, 0],   # c0
               [0, 0, 0, 0, 1, 1, 0, 0],   # c1
               [0, 0, 0, 0, 1, 1, 1, 1],   # c2
               [0, 0, 0, 0, 1, 1, 1, 1]]   # c3
    packed = [[1, 1, 0, 0, 0, 0, 0, 0],    # n0 (doc 1, block 0)
              [1, 1, 0, 0, 0, 0, 0, 0],    # n1
              [0, 0, 1, 0, 1, 1, 0, 0],    # n2 (doc 1, block 1)
              [0, 0, 0, 1, 0, 0, 0, 0],    # n3 (doc 2, block 0): itself only
              [0, 0, 0, 0, 1, 1, 0, 0],    # c0
              [0, 0, 0, 0, 1, 1, 0, 0],    # c1
              [0, 0, 0, 0, 1, 1, 1, 0],    # c2
              [0, 0, 0, 0, 0, 0, 0, 1]]    # c3
    got = np.asarray(attention_mask(pos, seg, "block_causal", 2, stream=stream))[:, 0]
    np.testing.assert_array_equal(got.astype(int), np.array([one_doc, packed]))
