"""The compiled gathered-row products against numpy (the independent truth): values and
both gradients, repeated and out-of-range ids, sharded equals single-device, and the
lowerings that must keep XLA's gather (other platforms, other dtypes, kernels="xla")."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from cbm_lm.model import cpu_kernels, sparse_rows_cpu
from cbm_lm.model.sparse_rows_cpu import gather_mix, gather_pick

N, S, C, V = 24, 5, 11, 37     # V not a multiple of the kernel's 16 lanes


@pytest.fixture(scope="module", autouse=True)
def kernel():
    assert sparse_rows_cpu.available(), cpu_kernels.errors.get(sparse_rows_cpu.SOURCE.name)


def _inputs(seed=0, out_of_range=False):
    r = np.random.default_rng(seed)
    ids = r.integers(0, C, (N, S)).astype(np.int32)
    ids[0] = 3                                    # one row picks the same concept 5 times
    if out_of_range:
        ids[1, 0], ids[2, 4] = -1, C              # contribute nothing
    f = lambda *s: r.standard_normal(s).astype(np.float32)   # noqa: E731
    return f(N, S), ids, f(C, V), f(N, V), f(N, V), f(N, S)   # w, ids, T, q, g (N,V), gs (N,S)


def _np_rows(table, ids):
    valid = (ids >= 0) & (ids < table.shape[0])
    return np.where(valid[..., None], table[np.clip(ids, 0, table.shape[0] - 1)], 0.0), valid


def _np_mix(w, ids, table):
    rows, _ = _np_rows(table, ids)
    return np.einsum("ns,nsv->nv", w, rows)


def _np_pick(q, table, ids):
    rows, _ = _np_rows(table, ids)
    return np.einsum("nv,nsv->ns", q, rows)


def _np_scatter(a, ids, b):
    out = np.zeros((C, b.shape[1]), np.float64)
    for n in range(ids.shape[0]):
        for s in range(ids.shape[1]):
            if 0 <= ids[n, s] < C:
                out[ids[n, s]] += a[n, s] * b[n]
    return out


@pytest.mark.parametrize("out_of_range", [False, True])
def test_mix_value_and_gradients(out_of_range):
    w, ids, table, _, g, _ = _inputs(1, out_of_range)
    out, vjp = jax.vjp(lambda w_, t_: gather_mix(w_, jnp.asarray(ids), t_), w, table)
    dw, dt = vjp(jnp.asarray(g))
    np.testing.assert_allclose(out, _np_mix(w, ids, table), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, _np_pick(g, table, ids), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dt, _np_scatter(w, ids, g), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("out_of_range", [False, True])
def test_pick_value_and_gradients(out_of_range):
    _, ids, table, q, _, gs = _inputs(2, out_of_range)
    out, vjp = jax.vjp(lambda q_, t_: gather_pick(q_, t_, jnp.asarray(ids)), q, table)
    dq, dt = vjp(jnp.asarray(gs))
    np.testing.assert_allclose(out, _np_pick(q, table, ids), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dq, _np_mix(gs, ids, table), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dt, _np_scatter(gs, ids, q), rtol=1e-5, atol=1e-5)


def test_table_gradient_is_deterministic():
    w, ids, table, _, g, _ = _inputs(3)
    grad = jax.jit(jax.grad(lambda t_: jnp.sum(gather_mix(w, ids, t_) * g)))
    np.testing.assert_array_equal(np.asarray(grad(table)), np.asarray(grad(table)))


def test_xla_path_agrees():
    w, ids, table, q, _, _ = _inputs(4)
    for f in (lambda k: gather_mix(w, ids, table, k), lambda k: gather_pick(q, table, ids, k)):
        np.testing.assert_allclose(f("auto"), f("xla"), rtol=1e-5, atol=1e-5)


def test_lowerings_choose_the_kernel_only_on_cpu_for_f32():
    w, ids, table, _, _, _ = _inputs(5)

    def text(fn, *args, platforms=None):
        traced = jax.jit(fn).trace(*args)
        return (traced.lower(lowering_platforms=platforms) if platforms else traced.lower()).as_text()

    mix = lambda w_, t_: gather_mix(w_, ids, t_)             # noqa: E731
    assert "cbm_lm_rows_mix" in text(mix, w, table)
    assert "cbm_lm_rows_mix" not in text(mix, w, table, platforms=("tpu",))
    assert "cbm_lm_rows_mix" not in text(mix, w, table.astype(jnp.bfloat16))
    assert "cbm_lm_rows_mix" not in text(lambda w_, t_: gather_mix(w_, ids, t_, "xla"), w, table)
    with pytest.raises(ValueError, match="kernel must be one of"):
        gather_mix(w, ids, table, "fast")


def test_sharded_tokens_equal_single_device():
    w, ids, table, _, g, _ = _inputs(6)
    mesh = jax.make_mesh((8,), ("data",))
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))   # noqa: E731

    def loss(w_, t_, ids_):
        return jnp.sum(gather_mix(w_, ids_, t_) * g[: w_.shape[0]])

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    want = f(w, table, ids)
    got = f(put(w, P("data", None)), put(table, P()), put(ids, P("data", None)))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_vmap_per_example_gradients():
    """Per-example table gradients (provenance/gradient.py vmaps them) equal a loop."""
    w, ids, table, _, g, _ = _inputs(7)

    def grad_one(w_row, ids_row, g_row):
        return jax.grad(lambda t_: jnp.sum(gather_mix(w_row[None], ids_row[None], t_) * g_row))(table)

    got = jax.vmap(grad_one)(w[:4], ids[:4], g[:4])
    for i in range(4):
        np.testing.assert_allclose(got[i], _np_scatter(w[i:i + 1], ids[i:i + 1], g[i:i + 1]),
                                   rtol=1e-5, atol=1e-5)
