"""Tiny, Steerling-style: block-causal masked diffusion with 16-token blocks.

Same widths as tiny.py; trained with two-stream clean-context diffusion
(loss.diffusion_clean_context). It learns more slowly than the
autoregressive tiny model on CPU budgets (see tiny.py's docstring).
"""

import pathlib

from cbm_lm.default_config import load_config_file


def get_config():
    c = load_config_file(pathlib.Path(__file__).with_name("tiny.py"))
    c.model.objective = "diffusion"
    c.model.attention = "block_causal"
    c.model.diffusion_block_size = 16
    return c
