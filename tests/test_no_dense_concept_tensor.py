"""Above dense_threshold the forward never materializes a [B*T, C] tensor.

We walk every equation of the forward's jaxpr (sub-jaxprs included: the
fori_loop of the streaming top-k) and check the largest intermediate. The
same check on a model *below* the threshold must find one, so the probe can
fail.
"""


import jax
from flax import nnx

from model_fixtures import make_model, random_tokens, tiny_config
from jaxpr_probe import max_intermediate_with_dim

B, T, C, D = 2, 32, 4000, 16


def _forward_jaxpr(threshold: int):
    cfg = tiny_config(d_model=D, n_heads=2, n_kv_heads=1, mlp_dim=32, concepts=dict(
        n_known=C, known_topk=4, n_unknown=C, unknown_rank=4, unknown_topk=4,
        block_size=256, dense_threshold=threshold))
    model = make_model(cfg)
    graphdef, state = nnx.split(model)
    tokens = random_tokens(cfg, B, T)

    def fwd(state, tokens):
        out = nnx.merge(graphdef, state)(tokens)
        return out.logits, out.known.features, out.unknown.features

    return jax.make_jaxpr(fwd)(state, tokens)


def test_streaming_forward_has_no_tokens_by_concepts_tensor():
    largest = max_intermediate_with_dim(_forward_jaxpr(threshold=1024), C)
    # Nothing larger than a parameter table [C, D] (4x smaller than [B*T, C]).
    assert largest <= C * D, largest


def test_probe_detects_dense_logits_below_threshold():
    largest = max_intermediate_with_dim(_forward_jaxpr(threshold=10**6), C)
    assert largest >= B * T * C
