"""Steerling-8B: the exact dimensions of the released model.

32 layers, d=4096, 32 heads / 4 KV heads, SwiGLU 16384, vocab 100,281
(cl100k_base + pad/bos/endofchunk/mask at 100277-100280), post-norm, QK-norm,
qkv clip 10, RoPE 5e5, block-causal diffusion with 64-token blocks, context
4096, tied embeddings. Concepts: 33,732 known (top-32), 101,196 unknown
factorized at rank 256 (top-128), tables padded to a multiple of 16.
Params: 8,391,778,304 (tools/plan.py).

Targets a TPU v5p-128 slice (topology v5p:4x4x4, 64 chips, 95 GiB HBM each) as
fsdp=16 x tensor=4 (fsdp=-1 fills, so the same file runs on larger v5p slices;
keep data.batch_size divisible by fsdp x grad_accum_steps). Checked on this
CPU with XLA's TPU compiler:
    python tools/aot_compile.py --config gin_configs/steerling_8b.py --topology v5p:4x4x4
gin_configs/steerling_8b_v5e.py is the same model for v5e:16x16 (16 GiB per chip).
"""

from cbm_lm.default_config import base_config


def get_config():
    c = base_config()
    c.model.vocab_size = 100281
    c.model.d_model = 4096
    c.model.n_layers = 32
    c.model.n_heads = 32
    c.model.n_kv_heads = 4
    c.model.mlp_dim = 16384
    c.model.max_seq_len = 4096
    c.model.attention = "block_causal"
    c.model.diffusion_block_size = 64
    c.model.norm_order = "post"
    c.model.qk_norm = True
    c.model.qkv_clip = 10.0
    c.model.rope_base = 500000.0
    c.model.mask_token_id = 100280
    c.model.dtype = "bfloat16"
    c.model.remat = "block"
    c.model.concepts.n_known = 33732
    c.model.concepts.known_topk = 32
    c.model.concepts.n_unknown = 101196
    c.model.concepts.unknown_rank = 256
    c.model.concepts.unknown_topk = 128
    c.model.concepts.pad_multiple = 16
    c.model.concepts.block_size = 4096
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 4
    # vocab 100,281 = 3 x 33,427 divides by no mesh axis and jax.jit needs evenly
    # divided in/out shardings, so the (tied) embedding / LM head is sharded over
    # fsdp (its embed axis) only, not over tensor (tools/plan.py checks this).
    c.rules = [[name, None if name == "vocab" else axes] for name, axes in c.rules]
    c.data.seq_len = 4096
    c.data.batch_size = 1024
    # One 4096-token sequence (8192 model tokens, two-stream) per chip per
    # micro-step on 64 chips: 1024 / (16 fsdp shards x 64) = 1.
    c.train.grad_accum_steps = 64
    # LM cross-entropy 512 positions at a time: [B,T,V] logits (3.3 GB fp32 per
    # sequence, x3 with the gradient) are never whole (objectives/chunked_ce.py).
    c.loss.ce_chunk_tokens = 512
    # Chunk slots for key logging (provenance.log_keys): a 4096-token row packs about
    # 4096 / 53.5 = 77 chunks of up to 64 tokens (the demo corpus's mean length), past the
    # default 64 slots; chunks past the slots get no key (the key logger warns with the count).
    c.provenance.max_chunks_per_row = 128
    return c
