"""Tiny: 2 layers, d=128. Trains on 2 CPU cores in minutes (make demo)."""

from cbm_lm.default_config import base_config


def get_config():
    c = base_config()
    c.model.vocab_size = 4096
    c.model.d_model = 128
    c.model.n_layers = 2
    c.model.n_heads = 4
    c.model.n_kv_heads = 2
    c.model.mlp_dim = 512
    c.model.max_seq_len = 256
    c.model.diffusion_block_size = 16
    c.model.concepts.n_known = 256
    c.model.concepts.known_topk = 8
    c.model.concepts.n_unknown = 512
    c.model.concepts.unknown_rank = 16
    c.model.concepts.unknown_topk = 16
    c.model.concepts.block_size = 128
    c.data.seq_len = 256
    c.data.batch_size = 8
    return c
