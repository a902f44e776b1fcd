"""Small: 8 layers, d=512, ~51M params. One GPU/TPU host, or a slow CPU run."""

from cbm_lm.default_config import base_config


def get_config():
    c = base_config()
    c.model.vocab_size = 32768
    c.model.d_model = 512
    c.model.n_layers = 8
    c.model.n_heads = 8
    c.model.n_kv_heads = 4
    c.model.mlp_dim = 2048
    c.model.max_seq_len = 1024
    c.model.diffusion_block_size = 64
    c.model.norm_order = "post"
    c.model.qkv_clip = 10.0
    c.model.concepts.n_known = 2048
    c.model.concepts.known_topk = 16
    c.model.concepts.n_unknown = 8192
    c.model.concepts.unknown_rank = 64
    c.model.concepts.unknown_topk = 64
    c.model.concepts.block_size = 1024
    c.data.seq_len = 1024
    c.data.batch_size = 32
    # Smallest accumulation whose activations fit the intended hardware
    # (tools/plan.py: "smallest fitting train.grad_accum_steps").
    c.train.grad_accum_steps = 2
    return c
