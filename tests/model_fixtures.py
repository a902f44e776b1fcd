"""Small random models shared by the model tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cbm_lm.config import ConceptConfig, ModelConfig
from cbm_lm.model import ConceptBottleneckLM


def tiny_config(**overrides) -> ModelConfig:
    concepts = overrides.pop("concepts", {})
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64,
                max_seq_len=64, diffusion_block_size=4, init_std=0.2)
    base.update(overrides)
    cc = dict(n_known=40, known_topk=5, n_unknown=70, unknown_rank=8, unknown_topk=6,
              block_size=16, dense_threshold=1000)
    cc.update(concepts)
    return ModelConfig(**base, concepts=ConceptConfig(**cc)).validate()


def make_model(cfg: ModelConfig, seed: int = 0) -> ConceptBottleneckLM:
    return ConceptBottleneckLM(cfg, rngs=nnx.Rngs(seed))


def random_tokens(cfg: ModelConfig, batch: int, length: int, seed: int = 1) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, cfg.vocab_size, jnp.int32)
