"""The concept heads' capped selection kernels against XLA's own ops (the independent truth).

top_k_capped(z, k, clip, mode) must equal lax.top_k(cap_logits(z, clip, mode), k) and
the raw z at those ids, bit for bit (ties at the clip, NaN, signed zeros, infinities and
values whose straight-through cap rounds included). factorized_top_k(q, ut, ...) ranks
z = q ut without forming it: on integer-valued inputs z is exact in any summation order,
so it must equal XLA's product-then-rank bit for bit too; on random inputs it must be a
valid top-k of the float64 product. Both keep sharded rows sharded (no all-gather) and
equal to one device; other platforms' lowerings keep XLA's ops."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from cbm_lm.model import cpu_kernels, factorized_topk_cpu, topk_cpu
from cbm_lm.model.concept_topk import cap_logits, map_row_shards
from cbm_lm.model.factorized_topk_cpu import factorized_top_k
from cbm_lm.model.topk_cpu import top_k_capped

MODES = (None, "hard", "straight_through")


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert topk_cpu.available(), cpu_kernels.errors.get(topk_cpu.SOURCE.name)
    assert factorized_topk_cpu.available(), cpu_kernels.errors.get(
        factorized_topk_cpu.SOURCE.name)


def _reference(z, k, clip, mode):
    z = jnp.asarray(z)
    ranked = z if mode is None else cap_logits(z, clip, mode)
    ids = jax.lax.top_k(ranked, k)[1]
    return np.asarray(ids), np.asarray(jnp.take_along_axis(z, ids, axis=-1))


def _hard_rows(rng, rows, n, clip):
    z = (rng.standard_normal((rows, n)) * 2 * clip).astype(np.float32)
    z[0, : n // 2] = 5 * clip                    # a run of ties at +clip once capped
    z[1, 1], z[1, 3] = -0.0, 0.0
    z[1, 5], z[1, 7] = np.inf, -np.inf
    z[2, 4], z[2, 9] = np.nan, -np.nan
    z[3] = 1e10                                  # v + (clip - v) rounds to 0 here
    z[4, ::3] = -3 * clip
    return z


def _assert_equal(got, want):
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), w)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows,n,k", [(8, 300, 17), (6, 2785, 32), (8, 64, 64), (8, 33, 1)])
def test_capped_matches_xla(mode, rows, n, k):
    z = _hard_rows(np.random.default_rng(n + k), rows, n, 3.0)
    got = jax.jit(lambda v: top_k_capped(v, k, 3.0, mode))(z)
    assert got[0].dtype == jnp.int32 and got[1].dtype == jnp.float32
    _assert_equal(got, _reference(z, k, 3.0, mode))


def test_capped_leading_dims_vmap_and_soft():
    z = np.random.default_rng(0).standard_normal((3, 4, 97)).astype(np.float32) * 4
    want = _reference(z, 9, 2.0, "straight_through")
    _assert_equal(top_k_capped(z, 9, 2.0, "straight_through"), want)
    _assert_equal(jax.vmap(lambda r: top_k_capped(r, 9, 2.0, "straight_through"))(z), want)
    # the soft cap (tanh) is not a clamp: XLA's ops rank it, never the kernel
    text = jax.jit(lambda v: top_k_capped(v, 9, 2.0, "soft")).lower(z).as_text()
    assert topk_cpu._CAPPED not in text
    _assert_equal(top_k_capped(z, 9, 2.0, "soft"), _reference(z, 9, 2.0, "soft"))


def _int_inputs(rng, rows, r, n):
    """Nonzero small integers: every z is exact, and no product is a signed zero (a sum
    that starts from +0, as the kernel's does, would turn 0 x -3 into +0 where a one-term
    product keeps -0; both are right, and they rank apart)."""
    def draw(shape):
        return (rng.integers(1, 4, size=shape) * rng.choice([-1, 1], size=shape)).astype(
            np.float32)
    return draw((rows, r)), draw((r, n))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows,r,n,k", [(21, 32, 1000, 128), (8, 7, 33, 33), (3, 1, 40, 5)])
def test_factorized_exact_inputs_match_xla(mode, rows, r, n, k):
    q, ut = _int_inputs(np.random.default_rng(r * n), rows, r, n)
    got = jax.jit(lambda a, b: factorized_top_k(a, b, k, 15.0, mode))(q, ut)
    z = np.asarray(jnp.asarray(q) @ jnp.asarray(ut))
    np.testing.assert_array_equal(z, q.astype(np.float64) @ ut)   # exact: ties are real ties
    _assert_equal(got, _reference(z, k, 15.0, mode))


def test_factorized_random_inputs_are_a_top_k():
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 37, 32)).astype(np.float32)
    ut = rng.standard_normal((32, 2000)).astype(np.float32)
    ids, vals = factorized_top_k(q, ut, 64, 4.0, "straight_through")
    z64 = q.astype(np.float64) @ ut
    capped = np.clip(z64, -4.0, 4.0)
    ids = np.asarray(ids)
    np.testing.assert_allclose(np.asarray(vals), np.take_along_axis(z64, ids, -1), atol=1e-5)
    picked = np.take_along_axis(capped, ids, -1)
    assert np.all(np.diff(picked, axis=-1) <= 1e-5)                      # best first
    mask = np.zeros(z64.shape, bool)
    np.put_along_axis(mask, ids, True, -1)
    rest = np.where(mask, -np.inf, capped).max(-1)
    assert np.all(picked.min(-1) >= rest - 1e-5)                          # nothing better left
    assert all(len(set(row)) == 64 for row in ids.reshape(-1, 64))


def test_factorized_vmap_and_shapes():
    rng = np.random.default_rng(6)
    q, ut = _int_inputs(rng, 4 * 9, 16, 300)
    q = q.reshape(4, 9, 16)
    want = _reference(np.asarray(jnp.asarray(q) @ jnp.asarray(ut)), 10, 15.0, "hard")
    _assert_equal(jax.vmap(lambda a: factorized_top_k(a, ut, 10, 15.0, "hard"))(q), want)
    uts = np.stack([ut] * 4)                     # a batched table: XLA's form, vmapped
    _assert_equal(jax.vmap(lambda a, b: factorized_top_k(a, b, 10, 15.0, "hard"))(q, uts), want)
    with pytest.raises(ValueError, match=r"q \[\.\.\., r\] and ut \[r, n\]"):
        factorized_top_k(q, ut.T, 10, 15.0, "hard")


@pytest.mark.parametrize("which", ["capped", "factorized"])
def test_sharded_rows_equal_single_device(which):
    rng = np.random.default_rng(7)
    q = rng.standard_normal((64, 32)).astype(np.float32)
    ut = rng.standard_normal((32, 512)).astype(np.float32)
    if which == "capped":
        f = jax.jit(lambda a: top_k_capped(a @ ut, 16, 2.0, "hard"))
    else:   # mapped over the row shards as the concept heads map it
        f = jax.jit(lambda a: map_row_shards(
            lambda a_s, b: factorized_top_k(a_s, b, 16, 2.0, "hard"), a, ut))
    want = [np.asarray(w) for w in f(q)]
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    sharded = jax.device_put(q, NamedSharding(mesh, P("data", None)))
    with jax.set_mesh(mesh), nn.logical_axis_rules([("batch", "data")]):
        got = f(sharded)
        text = f.lower(sharded).compile().as_text()
    _assert_equal(got, want)
    # each device ranks its own rows: no all-gather of the rows, outputs sharded like them
    assert "all-gather" not in text
    assert all(g.sharding.spec[0] == "data" for g in got)


def test_lowerings_choose_by_platform_and_kernel_name():
    q = jax.ShapeDtypeStruct((4, 8), jnp.float32)
    ut = jax.ShapeDtypeStruct((8, 64), jnp.float32)
    f = jax.jit(lambda a, b: factorized_top_k(a, b, 5, 2.0, "hard"))
    assert factorized_topk_cpu._TARGET in f.lower(q, ut).as_text()
    tpu = f.trace(q, ut).lower(lowering_platforms=("tpu",)).as_text()
    assert factorized_topk_cpu._TARGET not in tpu and topk_cpu._CAPPED not in tpu
    xla = jax.jit(lambda a, b: factorized_top_k(a, b, 5, 2.0, "hard", kernel="xla")).lower(
        q, ut).as_text()
    assert factorized_topk_cpu._TARGET not in xla and topk_cpu._CAPPED not in xla
    with pytest.raises(ValueError, match="top-k kernel must be one of"):
        factorized_top_k(jnp.zeros((4, 8)), jnp.zeros((8, 64)), 5, 2.0, "hard", kernel="fast")


def test_unavailable_kernel_falls_back(monkeypatch):
    monkeypatch.setitem(cpu_kernels._registered, factorized_topk_cpu.SOURCE.name, False)
    q, ut = _int_inputs(np.random.default_rng(8), 6, 8, 90)
    text = jax.jit(lambda a: factorized_top_k(a, ut, 7, 15.0, "hard")).lower(q).as_text()
    assert factorized_topk_cpu._TARGET not in text
    _assert_equal(factorized_top_k(q, ut, 7, 15.0, "hard"),
                  _reference(np.asarray(jnp.asarray(q) @ jnp.asarray(ut)), 7, 15.0, "hard"))


def test_ranked_axis_sharded_is_gathered_whole():
    """z sharded along the concepts (as a tensor-sharded key table leaves it): each row's
    ranking must still see all n, not a per-shard top-k."""
    z = np.random.default_rng(9).standard_normal((16, 512)).astype(np.float32) * 4
    mesh = jax.make_mesh((8,), ("tensor",), axis_types=(AxisType.Auto,))
    cols = jax.device_put(z, NamedSharding(mesh, P(None, "tensor")))
    _assert_equal(jax.jit(lambda v: top_k_capped(v, 24, 3.0, "hard"))(cols),
                  _reference(z, 24, 3.0, "hard"))
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda v: topk_cpu.top_k_ids(v, 24))(cols)),
                                  _reference(z, 24, 3.0, None)[0])


def test_bad_arguments_are_refused_when_traced():
    z = jnp.zeros((4, 10))
    with pytest.raises(ValueError, match="top_k_capped: need 0 <= k <= n, got k=11 for n=10"):
        top_k_capped(z, 11, 1.0, "hard")
    with pytest.raises(ValueError, match="factorized_top_k: need 0 <= k <= n"):
        factorized_top_k(jnp.zeros((4, 3)), jnp.zeros((3, 10)), 11, 1.0, "hard")
    with pytest.raises(ValueError, match="top-k kernel must be one of"):   # even where XLA ranks
        top_k_capped(z, 3, 1.0, "soft", kernel="fast")


def test_explicit_mesh_axes_fall_back_to_one_call():
    """shard_map would refuse a q not already sharded over an Explicit axis: map_row_shards
    then calls fn once, with the same result."""
    q, ut = _int_inputs(np.random.default_rng(10), 16, 8, 64)
    want = _reference(np.asarray(jnp.asarray(q) @ jnp.asarray(ut)), 5, 15.0, "hard")
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh), nn.logical_axis_rules([("batch", "data")]):
        got = jax.jit(lambda a: map_row_shards(
            lambda a_s, b: factorized_top_k(a_s, b, 5, 15.0, "hard"), a, ut))(q)
    _assert_equal(got, want)
