"""Prompt batching (inference/prompts.py) and intervention positions (steer_spec.py),
against hand-written layouts."""

import jax.numpy as jnp
import numpy as np
import pytest

from cbm_lm.inference.prompts import as_prompt_list, layout
from cbm_lm.inference.steer_spec import Intervention


def test_layout_by_hand_with_and_without_buckets():
    x, lens, seg = layout([[1, 2], [3, 4, 5]], 2, vocab_size=10, fill_id=9, pad_id=0, bucket=0)
    np.testing.assert_array_equal(x, [[1, 2, 9, 9, 0], [3, 4, 5, 9, 9]])
    np.testing.assert_array_equal(lens, [2, 3])
    np.testing.assert_array_equal(seg, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    x4, _, seg4 = layout([[1, 2], [3, 4, 5]], 2, vocab_size=10, fill_id=9, pad_id=0, bucket=4)
    np.testing.assert_array_equal(x4, np.pad(x, ((0, 0), (0, 3))))
    np.testing.assert_array_equal(seg4, np.pad(seg, ((0, 0), (0, 3))))


@pytest.mark.parametrize("one", [[5, 6, 7], (5, 6, 7), np.array([5, 6, 7]),
                                 jnp.array([5, 6, 7]), [np.int32(5), np.int64(6), 7]])
def test_a_flat_sequence_is_one_prompt(one):
    (p,) = as_prompt_list(one)
    np.testing.assert_array_equal(p, [5, 6, 7])


@pytest.mark.parametrize("batch", [np.array([[1, 2], [3, 4]]), jnp.array([[1, 2], [3, 4]]),
                                   [[1, 2], [3, 4]], [np.array([1, 2]), jnp.array([3, 4])]])
def test_a_batch_is_one_prompt_per_row(batch):
    got = as_prompt_list(batch)
    assert len(got) == 2
    np.testing.assert_array_equal(np.stack(got), [[1, 2], [3, 4]])


def test_an_array_of_rank_3_is_refused_not_joined_into_one_prompt():
    with pytest.raises(ValueError, match=r"shape \(2, 1, 3\)"):
        as_prompt_list(np.array([[[1, 2, 3]], [[4, 5, 6]]]))


def test_intervention_positions_narrower_than_the_row():
    """The sampler rounds rows up to a bucket the caller does not know: columns past the
    given positions are not intervened on; a wrong rank or too few rows is refused."""
    iv = Intervention(known={3: 0.5}, positions=np.array([[True, False, True]]))
    ids, vals = iv.model_kwargs(np.array([0]), 5)["intervene_known"]
    np.testing.assert_array_equal(ids[..., 0], [[3, -1, 3, -1, -1]])
    np.testing.assert_array_equal(vals[..., 0], [[0.5, 0, 0.5, 0, 0]])
    with pytest.raises(ValueError, match="Intervention.positions"):
        Intervention(known={3: 0.5}, positions=np.array([True, False])).model_kwargs(
            np.array([0]), 4)
    with pytest.raises(ValueError, match="Intervention.positions"):
        iv.model_kwargs(np.array([0, 1]), 4)
