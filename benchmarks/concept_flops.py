"""FLOPs the concept layer adds at 8B: XLA's cost analysis of the train step with and
without the rewrite layer.

Both steps are lowered (not compiled) from abstract inputs at the config's
widths and depth on one device, for one sequence per step. XLA's cost
analysis counts a loop body once, so the measurement removes the loops
(grad_accum_steps 1, the layers unrolled, one concept block covering every
concept, the LM cross-entropy unchunked); the per-token FLOPs depend on none.

The baseline is the same step without the rewrite layer (plain_backbone.py):
the same backbone over the same model tokens (two-stream diffusion: [noisy |
clean], the same two-stream attention), with only the LM stream unembedded,
as the concept step does.

  concept_flops_overhead_8b = flops(concept-bottleneck step) / flops(plain step) - 1
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.plain_backbone import PlainLM, _step
from cbm_lm.config import ModelConfig
from cbm_lm.train.compile_check import abstract_batch
from cbm_lm.train.optimizer import make_optimizer
from cbm_lm.train.state import abstract_train_state
from cbm_lm.train.step import step_config, train_step


def _flops(lowered) -> float:
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def measure_concept_flops(config) -> dict:
    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.data.batch_size, c.train.grad_accum_steps = 1, 1
        c.model.scan_layers, c.loss.ce_chunk_tokens = False, 0
        cc = c.model.concepts
        cc.block_size = max(cc.n_known, cc.n_unknown, cc.block_size)
    model_cfg = ModelConfig.from_config(c.model)
    tx, schedule = make_optimizer(c.optimizer, 10)
    graphdef, abs_state, _ = abstract_train_state(model_cfg, tx)
    batch = abstract_batch(c, None)
    cbm = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule,
                                    config=step_config(model_cfg, c)))
    f_cbm = _flops(cbm.lower(abs_state, batch))

    # The plain step reads the same model tokens: [noisy | clean] for two-stream diffusion.
    two_stream = model_cfg.objective == "diffusion" and c.loss.diffusion_clean_context
    t_model = c.data.seq_len * (2 if two_stream else 1)
    plain_def, plain_params = nnx.split(nnx.eval_shape(lambda: PlainLM(model_cfg, rngs=nnx.Rngs(0))),
                                        nnx.Param)
    plain_params = plain_params.to_pure_dict()
    plain_opt = jax.eval_shape(tx.init, plain_params)
    tok = jax.ShapeDtypeStruct((1, t_model), jnp.int32)
    plain_batch = {"tokens": tok, "positions": tok, "segment_ids": tok}
    if two_stream:
        plain_batch["stream"] = tok
    plain = jax.jit(functools.partial(_step, graphdef=plain_def, tx=tx,
                                      lm_len=c.data.seq_len if two_stream else None))
    f_plain = _flops(plain.lower(plain_params, plain_opt, plain_batch))
    return {"concept_flops_overhead_8b": f_cbm / f_plain - 1.0, "cbm_step_flops_per_seq": f_cbm,
            "plain_step_flops_per_seq": f_plain}
