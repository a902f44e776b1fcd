"""The benchmark shapes: a small model with Steerling's concept proportions.

d 512, 4 layers, vocab 8192, B 8 x T 256 (autoregressive, causal), known
concepts 0.34 x vocab (Steerling: 33,732 / 100,281), unknown 1.0 x vocab
(101,196 / 100,281) factorized at rank D/16 (256 / 4096), top-k 32 / 128.
"""

from __future__ import annotations

import pathlib

from cbm_lm.default_config import load_config_file

ROOT = pathlib.Path(__file__).resolve().parents[1]


def steerling_proportions_config(batch_size: int = 8, seq_len: int = 256):
    c = load_config_file(ROOT / "gin_configs" / "tiny.py")
    m = c.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads = 8192, 512, 4, 8, 4
    m.mlp_dim, m.max_seq_len = 2048, seq_len
    cc = m.concepts
    cc.n_known, cc.known_topk = round(0.34 * 8192), 32
    cc.n_unknown, cc.unknown_rank, cc.unknown_topk = 8192, 512 // 16, 128
    cc.block_size = 8192
    c.data.batch_size, c.data.seq_len = batch_size, seq_len
    return c
