"""1B: 16 layers, d=2048, Steerling-shaped; a TPU v5p-32 / 8xH100 host."""

from cbm_lm.default_config import base_config


def get_config():
    c = base_config()
    c.model.vocab_size = 100281
    c.model.d_model = 2048
    c.model.n_layers = 16
    c.model.n_heads = 16
    c.model.n_kv_heads = 4
    c.model.mlp_dim = 8192
    c.model.max_seq_len = 4096
    c.model.diffusion_block_size = 64
    c.model.norm_order = "post"
    c.model.qkv_clip = 10.0
    c.model.mask_token_id = 100280
    c.model.dtype = "bfloat16"
    c.model.remat = "block"
    c.model.concepts.n_known = 33732
    c.model.concepts.known_topk = 32
    c.model.concepts.n_unknown = 32768
    c.model.concepts.unknown_rank = 128
    c.model.concepts.unknown_topk = 64
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.data.seq_len = 4096
    c.data.batch_size = 256
    # Smallest accumulation whose activations fit the intended hardware
    # (tools/plan.py: "smallest fitting train.grad_accum_steps").
    c.train.grad_accum_steps = 32
    # Chunk slots for key logging (provenance.log_keys): a 4096-token row packs about
    # 4096 / 53.5 = 77 chunks of up to 64 tokens (the demo corpus's mean length), past the
    # default 64 slots; chunks past the slots get no key (the key logger warns with the count).
    c.provenance.max_chunks_per_row = 128
    return c
