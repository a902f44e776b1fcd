"""Steerling-8B (gin_configs/steerling_8b.py) laid out for a TPU v5e-256 slice.

Topology v5e:16x16: 256 chips with 16 GiB HBM each (a sixth of a v5p chip's),
as fsdp=64 x tensor=4, one 4096-token sequence (8192 model tokens, two-stream)
per chip per micro-step (1024 / (64 x 16) = 1). Activations must shrink about
4x from steerling_8b.py's: every block is rematerialized from its input
(model.remat=full), the concept heads read their top-k rows blockwise instead
of gathering [tokens, k, 4096] fp32 rows (model.concepts.scoring=blockwise),
and the LM cross-entropy runs in chunks (loss.ce_chunk_tokens, from
steerling_8b.py). Checked on this CPU with XLA's TPU compiler:
    python tools/aot_compile.py --config gin_configs/steerling_8b_v5e.py --topology v5e:16x16
XLA's verdict (2026-12-03): FITS at 9.75 GiB per chip of 16 (temp 8.99 GiB), 2.64 PFLOP
per chip per step, MFU bound 0.77. It was 15.62 GiB (98%) before the concept top-k ran
per shard (model/concept_topk.py: the partitioner had all-gathered every block's logits
over the 64 batch shards, an 8 GiB buffer) and before the teacher features mixed their
rows blockwise (a 2 GiB scatter-add gather).
"""

import importlib.util
import pathlib


def get_config():
    path = pathlib.Path(__file__).with_name("steerling_8b.py")
    spec = importlib.util.spec_from_file_location("steerling_8b", path)
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config()
    c.model.remat = "full"
    c.model.concepts.scoring = "blockwise"
    c.mesh.fsdp, c.mesh.tensor = -1, 4
    c.train.grad_accum_steps = 16
    return c
