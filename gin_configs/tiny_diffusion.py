"""Tiny, Steerling-style: block-causal masked diffusion with 16-token blocks.

Same widths as tiny.py; trained with two-stream clean-context diffusion
(loss.diffusion_clean_context). It learns more slowly than the
autoregressive tiny model on CPU budgets (see tiny.py's docstring).
"""

import importlib.util
import pathlib


def get_config():
    spec = importlib.util.spec_from_file_location(
        "tiny", pathlib.Path(__file__).with_name("tiny.py"))
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    c = tiny.get_config()
    c.model.objective = "diffusion"
    c.model.attention = "block_causal"
    c.model.diffusion_block_size = 16
    return c
