"""Regularizers of the concept rewrite (DESIGN.md section 3).

Reconstruction (trains the unknown head to explain what the known head misses):

  L_rec = sum_{valid i} ||u_i - sg(h_i - k_i)||^2 / (n_valid * D)

with k the predicted known features, or (the technical report's target) the pooled
ground-truth label embeddings k_gt: the caller passes which.

Independence (keeps the unknown features from re-encoding the known ones):

  u~ = u - mean_valid(u),  k~ = sg(k) - mean_valid(sg(k))       (centred over valid tokens)
  Cov = u~^T k~ / n_valid                                       [D,D]
  L_ind = ||Cov||_F^2 / D^2                       (normalization="population")
  L_ind = ||u~^T k~||_F^2 / (D^2 (n_valid - 1))   (normalization="report": the technical
                                                 report's form, n^2/(n-1) times the above)

For a factorized unknown head, u = m B (m [N,r] its rank-space mix, B [r,D] its basis),
so u~^T k~ = B^T (m~^T k~) and the same value needs no [N,D]^T [N,D] product:

  X = m~^T k~ [r,D],   u~^T k~ = B^T X [D,D]      (``independence_loss_factorized``)

2 N r D + 2 r D^2 FLOPs instead of 2 N D^2 per pass (the benchmark shape, N 2048, D 512,
r 32: 0.08 against 1.07 GFLOP), and under data parallelism the batch contraction
all-reduces X [r,D] instead of the [D,D] covariance.

Residual energy (pulls the backbone's state into the concepts' span, so epsilon stays small):

  r_i = h_i - k_i - u_i                                          (epsilon before any dropout)
  L_eps = sum_{valid i} ||r_i||^2 / sum_{valid i} ||sg(h_i)||^2

The gradient reaches h (the backbone) and both heads. Holding k (sg(k_i)) measured worse
on every count: the backbone alone then bends h toward the concepts and detection falls
further (docs/fidelity.md "Fidelity: the diffusion objective"). The stop-gradient denominator makes
the term a fraction of the state's energy, so it cannot be lowered by shrinking h as a
whole. Reconstruction cannot do this: its target sg(h - k) moves only the unknown head.

Shapes: unknown_features u, hidden h, known_features k [B,T,D]; valid [B,T]
bool (e.g. segment_ids > 0). Statistics pool all valid tokens of the batch;
computed in fp32. The covariance uses the 1/n (population) normalizer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _flat(x: jax.Array) -> jax.Array:
    return x.reshape(-1, x.shape[-1]).astype(jnp.float32)


def reconstruction_loss(unknown_features: jax.Array, hidden: jax.Array,
                        known_features: jax.Array, valid: jax.Array) -> jax.Array:
    """MSE(unknown, stop_grad(hidden - known)) over valid tokens and D -> scalar."""
    u = _flat(unknown_features)
    target = jax.lax.stop_gradient(_flat(hidden) - _flat(known_features))
    w = valid.reshape(-1).astype(jnp.float32)
    sq = jnp.sum(jnp.square(u - target), axis=-1)
    return jnp.sum(w * sq) / (jnp.maximum(jnp.sum(w), 1.0) * u.shape[-1])


def residual_energy(hidden: jax.Array, known_features: jax.Array,
                    unknown_features: jax.Array, valid: jax.Array) -> jax.Array:
    """sum_valid ||h - k - u||^2 / sum_valid ||sg(h)||^2 -> scalar (module docstring)."""
    h = _flat(hidden)
    r = h - _flat(known_features) - _flat(unknown_features)
    w = valid.reshape(-1).astype(jnp.float32)
    energy = jax.lax.stop_gradient(jnp.sum(w * jnp.sum(jnp.square(h), axis=-1)))
    return jnp.sum(w * jnp.sum(jnp.square(r), axis=-1)) / jnp.maximum(energy, 1e-12)


def _centred_cross(x: jax.Array, known_features: jax.Array, valid: jax.Array):
    """(x~^T k~ [F,D], n): x [...,F] and stop_grad(known) [...,D] each minus its mean over
    the n valid tokens, invalid tokens zeroed; the independence term's cross moment."""
    w = valid.reshape(-1).astype(jnp.float32)[:, None]
    n = jnp.maximum(jnp.sum(w), 1.0)

    def centred(v):
        return (v - jnp.sum(w * v, axis=0) / n) * w

    k = jax.lax.stop_gradient(_flat(known_features))
    return centred(_flat(x)).T @ centred(k), n


def _normalized(cross: jax.Array, n: jax.Array, normalization: str) -> jax.Array:
    """cross = u~^T k~ [D,D] -> L_ind (module docstring), for either normalization."""
    if normalization not in ("population", "report"):
        raise ValueError(f"independence normalization must be 'population' or 'report', "
                         f"got {normalization!r}")
    d2 = cross.shape[0] * cross.shape[1]
    if normalization == "report":
        return jnp.sum(jnp.square(cross)) / (d2 * jnp.maximum(n - 1.0, 1.0))
    return jnp.sum(jnp.square(cross / n)) / d2


def independence_loss(unknown_features: jax.Array, known_features: jax.Array,
                      valid: jax.Array, normalization: str = "population") -> jax.Array:
    """||Cov(unknown, stop_grad(known))||_F^2 / D^2 over valid tokens -> scalar
    (or the report's normalization, see the module docstring)."""
    cross, n = _centred_cross(unknown_features, known_features, valid)              # [D,D]
    return _normalized(cross, n, normalization)


def independence_loss_factorized(mixed: jax.Array, basis: jax.Array,
                                 known_features: jax.Array, valid: jax.Array,
                                 normalization: str = "population") -> jax.Array:
    """``independence_loss(mixed @ basis, known_features, valid)`` computed in rank space:
    mixed [B,T,r] (ConceptActivations.mixed), basis [r,D]; u~^T k~ = B^T (m~^T k~)
    (module docstring). Centring commutes with the right product by B, so the value and
    both gradients are the full form's up to rounding."""
    x, n = _centred_cross(mixed, known_features, valid)                              # [r,D]
    return _normalized(basis.astype(jnp.float32).T @ x, n, normalization)
