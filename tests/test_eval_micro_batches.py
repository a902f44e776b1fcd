"""The eval step runs as the train step does: over train.grad_accum_steps micro-batches of
batch / grad_accum_steps rows (train/loop.py make_micro_eval_step), its metrics combined as the
train step combines them (means weighted by lm_tokens, counts summed)."""

import math

import jax
import numpy as np
from jax.extend.core import jaxprs_in_params
from flax import nnx
from jax.sharding import NamedSharding

from cbm_lm.config import MeshConfig, ModelConfig
from cbm_lm.data.synthetic import synthetic_batch
from cbm_lm.default_config import DEFAULT_RULES, base_config
from cbm_lm.parallel.mesh import make_mesh
from cbm_lm.parallel.sharding import logical_to_spec
from cbm_lm.train.loop import make_micro_eval_step
from cbm_lm.train.optimizer import make_optimizer
from cbm_lm.train.state import init_train_state

B, T = 8, 32


def _config(accum: int):
    c = base_config()
    c.model.vocab_size, c.model.d_model, c.model.n_heads, c.model.n_kv_heads = 384, 32, 2, 1
    c.model.mlp_dim = 64
    c.model.concepts.n_known, c.model.concepts.n_unknown = 32, 32
    c.model.concepts.unknown_rank, c.model.concepts.unknown_topk = 4, 4
    c.model.objective, c.model.attention = "autoregressive", "causal"
    c.data.batch_size, c.data.seq_len = B, T
    c.train.grad_accum_steps = accum
    return c


def _unequally_padded_batch(model_cfg):
    """Odd rows mostly padding (row 3: two short documents): micro-batches of unequal
    token counts, so a plain mean of micro-batch means would differ from the full batch."""
    batch = {k: np.asarray(v) for k, v in synthetic_batch(model_cfg, B, T, 4).items()}
    seg = np.ones((B, T), np.int32)
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
    for r in (1, 5, 7):
        seg[r, 6 + r:] = 0
    seg[3, :3], seg[3, 3:7], seg[3, 7:] = 1, 2, 0
    pos[3, 3:7] = np.arange(4)
    pos[seg == 0] = 0
    return dict(batch, tokens=np.where(seg > 0, batch["tokens"], 0), segment_ids=seg,
                positions=pos,
                concept_ids=np.where((seg > 0)[..., None], batch["concept_ids"], -1),
                chunk_segment_ids=np.where(seg > 0, batch["chunk_segment_ids"], 0),
                source_ids=np.where(seg > 0, 0, -1).astype(np.int32))


def _setup(accum: int):
    c = _config(accum)
    model_cfg = ModelConfig.from_config(c.model)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2), jax.devices()[:4])
    tx, _ = make_optimizer(c.optimizer, 10)
    graphdef, state, shardings = init_train_state(model_cfg, tx, 0, mesh, DEFAULT_RULES)
    batch_sharding = NamedSharding(mesh, logical_to_spec(("batch",), DEFAULT_RULES))
    step = make_micro_eval_step(graphdef, c, model_cfg, shardings.params, batch_sharding)
    batch = jax.device_put(_unequally_padded_batch(model_cfg), batch_sharding)
    return mesh, step, state.params, batch, model_cfg


def test_eval_over_micro_batches_equals_the_single_pass():
    mesh, one_pass, params, batch, _ = _setup(1)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_RULES):
        full = jax.device_get(one_pass(params, batch))
        _, micro_step, _, _, _ = _setup(2)
        micro = jax.device_get(micro_step(params, batch))
    assert set(micro) == set(full)
    # counts: the whole batch's, summed over the micro-batches
    assert float(full["real_tokens"]) == 4 * T + (6 + 1) + 7 + (6 + 5) + (6 + 7)   # rows 0,2,4,6 full
    for k in ("real_tokens", "lm_tokens"):
        assert float(micro[k]) == float(full[k]), k
    # means normalised by the LM's own positions: exact under lm_tokens weighting
    for k in ("lm_loss", "lm_loss_no_epsilon", "next_token_acc", "share_known"):
        np.testing.assert_allclose(micro[k], full[k], rtol=1e-5, err_msg=k)


def _logit_like_shapes(closed_jaxpr, vocab: int) -> list[tuple]:
    """Shapes of every intermediate [rows, T, vocab] (logits, their softmax, ...)."""
    out = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            for v in eqn.outvars:
                shape = getattr(v.aval, "shape", ())
                if len(shape) >= 3 and shape[-1] == vocab:
                    out.append(shape)
            for sub in jaxprs_in_params(eqn.params):
                walk(sub)

    walk(closed_jaxpr.jaxpr)
    return out


def test_eval_step_holds_micro_batch_rows_only():
    """Structural, memory-independent: no [rows, T, vocab] intermediate has more than
    batch / accum rows, and the single pass's do have the whole batch."""
    for accum in (1, 4):
        mesh, step, params, batch, model_cfg = _setup(accum)
        with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_RULES):
            jaxpr = jax.make_jaxpr(step)(params, batch)
        shapes = _logit_like_shapes(jaxpr, model_cfg.vocab_size)
        assert shapes, "no logits found: the probe is blind"
        assert max(s[0] for s in shapes) == B // accum, (accum, sorted(set(shapes)))
        assert math.prod(max(shapes)) <= B // accum * T * model_cfg.vocab_size * 2
