"""GenerationTrace replay rules and output chunking (against Steerling's find_chunk_boundaries)."""

import numpy as np
import pytest

from cbm_lm.inference.chunks import find_chunks, trace_chunks
from cbm_lm.inference.steer_spec import Injection, Intervention, Steering
from cbm_lm.inference.trace import GenerationTrace

MASK, PAD, EOC = 9, 8, 7


def _trace(objective="diffusion", steering=None):
    # two sequences: prompts of 2 and 3 tokens, 3 new tokens each, L = 7
    tokens = np.array([[1, 2, 5, 7, 6, PAD, PAD],
                       [1, 2, 3, 4, 4, 5, PAD]], np.int32)
    cs = np.full((2, 7), -1, np.int32)
    if objective == "diffusion":
        cs[0, 2:5] = [1, 0, 2]
        cs[1, 3:6] = [0, 0, 1]
    else:
        cs[0, 2:5] = [0, 1, 2]
        cs[1, 3:6] = [0, 1, 2]
    return GenerationTrace(tokens=tokens, prompt_lens=np.array([2, 3]), gen_lens=np.array([3, 3]),
                           committed_step=cs, objective=objective, mask_id=MASK, pad_id=PAD,
                           max_new_tokens=3, num_steps=3, steering=steering or Steering())


def test_snapshot_reveals_only_earlier_commits():
    t = _trace()
    np.testing.assert_array_equal(t.snapshot(0), [[1, 2, MASK, MASK, MASK, PAD, PAD],
                                                  [1, 2, 3, MASK, MASK, MASK, PAD]])
    np.testing.assert_array_equal(t.snapshot(1), [[1, 2, MASK, 7, MASK, PAD, PAD],
                                                  [1, 2, 3, 4, 4, MASK, PAD]])
    np.testing.assert_array_equal(t.snapshot([2], [0], unconditional=True),
                                  [[MASK, MASK, 5, 7, MASK, PAD, PAD]])
    np.testing.assert_array_equal(t.segment_ids(), [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0]])
    assert t.logit_pos[0, 3] == 3 and t.logit_pos[0, 0] == -1
    assert [(s, p.tolist()) for s, p in t.commit_groups(1)] == [(0, [3, 4]), (1, [5])]


def test_autoregressive_logit_position_and_injection():
    inj = Injection(direction=np.array([0.6, 0.8], np.float32), alpha=2.0, layer=1, cutoff_tokens=2)
    t = _trace("autoregressive", Steering(injection=inj))
    assert t.logit_pos[1, 3] == 2
    kw = t.model_inputs([1], [2])
    # positions P-1+j = 2,3,4 were queries of steps 0,1,2; step 2 is past the cutoff
    alpha = kw["injection"][0, :, 0] / 0.6
    np.testing.assert_allclose(alpha, [0, 0, 2, 2, 0, 0, 0], atol=1e-6)


def test_diffusion_injection_at_masked_positions_with_cutoff():
    inj = Injection(direction=np.array([1.0, 0.0], np.float32), alpha=3.0, layer=1, cutoff_tokens=2)
    iv = Intervention(known={4: 1.5}, positions=np.array([[0, 0, 1, 1, 1, 0, 0]] * 2, bool))
    t = _trace(steering=Steering(injection=inj, intervention=iv))
    kw = t.model_inputs([0, 1], [1, 1])
    np.testing.assert_allclose(kw["injection"][0, :, 0], [0, 0, 3, 0, 3, 0, 0])
    np.testing.assert_allclose(kw["injection"][1, :, 0], 0)   # 2 tokens committed: cut off
    ids, vals = kw["intervene_known"]
    assert ids.shape == (2, 7, 1) and ids[0, :, 0].tolist() == [-1, -1, 4, 4, 4, -1, -1]
    assert kw["drop_epsilon"] is True


def _steerling_chunks(ids, start, eoc, stops):
    from steerling.attribution.utils import find_chunk_boundaries
    return find_chunk_boundaries(ids, eoc, start_index=start, stop_ids=stops or None,
                                 include_final_chunk=True)


@pytest.mark.parametrize("seed", range(20))
def test_chunks_match_steerling(seed):
    pytest.importorskip("steerling.attribution.utils")
    rng = np.random.default_rng(seed)
    ids = rng.choice([1, 2, 3, EOC, 11], size=rng.integers(1, 30), p=[.3, .3, .1, .25, .05]).tolist()
    start = int(rng.integers(0, len(ids)))
    stops = [11] if seed % 2 else []
    assert find_chunks(ids, start, len(ids), EOC, stops) == _steerling_chunks(ids, start, EOC, stops)


def test_trace_chunks_end_at_generation_end():
    t = _trace()
    assert trace_chunks(t, EOC) == [[(2, 3), (4, 5)], [(3, 6)]]
