"""Flax NNX modules of the concept-bottleneck LM (DESIGN.md section 2)."""

from cbm_lm.model.lm import ConceptBottleneckLM, LMOutput, abstract_lm  # noqa: F401
