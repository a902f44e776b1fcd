"""The compiled CPU top-k kernel against lax.top_k (the independent truth): the same ids,
ties, NaN, signed zeros and infinities included; sharded equals single-device; lowerings
for other platforms keep lax.top_k; a failed build falls back instead of failing."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from cbm_lm.model import cpu_kernels, topk_cpu
from cbm_lm.model.topk_cpu import top_k_ids


def _reference(x, k):
    return np.asarray(jax.lax.top_k(jnp.asarray(x), k)[1])


@pytest.fixture(scope="module", autouse=True)
def kernel():
    assert topk_cpu.available(), cpu_kernels.errors.get(topk_cpu.SOURCE.name)


def _hard_rows(rng, rows, n):
    """Random rows with the cases an order can get wrong."""
    x = rng.standard_normal((rows, n)).astype(np.float32)
    x[0, : n // 2] = 1.0                               # a run of ties across the k boundary
    x[1] = np.round(x[1])                              # few distinct values
    x[2, 1], x[2, 3] = -0.0, 0.0                       # signed zeros
    x[2, 5], x[2, 7] = np.inf, -np.inf
    x[3, 4], x[3, 9] = np.nan, -np.nan                 # NaNs rank above +inf / below -inf
    x[4] = np.sort(x[4])                               # ascending: every element a new best
    x[5] = 3.0                                         # all equal
    return x


@pytest.mark.parametrize("rows,n,k", [(8, 50, 5), (8, 300, 128), (8, 64, 64), (8, 33, 1),
                                      (6, 2785, 32), (8, 1000, 300)])
def test_matches_lax_top_k(rows, n, k):
    x = _hard_rows(np.random.default_rng(n * 7 + k), rows, n)
    got = np.asarray(jax.jit(top_k_ids, static_argnums=1)(x, k))
    assert got.dtype == np.int32 and got.shape == (rows, k)
    np.testing.assert_array_equal(got, _reference(x, k))


def test_leading_dims_and_vmap():
    x = np.random.default_rng(0).standard_normal((3, 4, 97)).astype(np.float32)
    want = _reference(x, 9)
    np.testing.assert_array_equal(np.asarray(top_k_ids(x, 9)), want)
    np.testing.assert_array_equal(np.asarray(jax.vmap(lambda r: top_k_ids(r, 9))(x)), want)


def test_sharded_rows_equal_single_device():
    x = np.random.default_rng(1).standard_normal((64, 512)).astype(np.float32)
    mesh = jax.make_mesh((8,), ("data",))
    sharded = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    f = jax.jit(lambda v: top_k_ids(v, 16))
    got = f(sharded)
    np.testing.assert_array_equal(np.asarray(got), _reference(x, 16))
    # each device ranks its own rows: no all-gather of x, ids sharded like x's rows
    assert "all-gather" not in f.lower(sharded).compile().as_text()
    assert got.sharding.spec[0] == "data"


def test_lowering_chooses_by_platform():
    x = jax.ShapeDtypeStruct((4, 64), jnp.float32)
    cpu_text = jax.jit(lambda v: top_k_ids(v, 8)).lower(x).as_text()
    assert topk_cpu._TARGET in cpu_text
    xla_text = jax.jit(lambda v: top_k_ids(v, 8, kernel="xla")).lower(x).as_text()
    assert topk_cpu._TARGET not in xla_text
    tpu_text = jax.jit(lambda v: top_k_ids(v, 8)).trace(x).lower(
        lowering_platforms=("tpu",)).as_text()
    assert topk_cpu._TARGET not in tpu_text and "chlo.top_k" in tpu_text
    bf16 = jax.jit(lambda v: top_k_ids(v, 8)).lower(
        jax.ShapeDtypeStruct((4, 64), jnp.bfloat16)).as_text()
    assert topk_cpu._TARGET not in bf16


def test_no_gradient_through_ids():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 40)).astype(np.float32))
    g = jax.grad(lambda v: jnp.take_along_axis(v, top_k_ids(v, 5), -1).sum())(x)
    want = np.zeros((4, 40), np.float32)
    np.put_along_axis(want, _reference(x, 5), 1.0, -1)
    np.testing.assert_array_equal(np.asarray(g), want)


def test_bad_kernel_name_is_named():
    with pytest.raises(ValueError, match="top-k kernel must be one of"):
        top_k_ids(jnp.zeros((2, 4)), 2, kernel="fast")


def test_failed_build_names_the_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("CBM_LM_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")
    with pytest.raises(RuntimeError, match="/bin/false"):
        cpu_kernels.build(topk_cpu.SOURCE)
    assert list(tmp_path.iterdir()) == []           # no half-written library left behind


def test_unavailable_kernel_falls_back(monkeypatch):
    monkeypatch.setitem(cpu_kernels._registered, topk_cpu.SOURCE.name, False)
    x = np.random.default_rng(3).standard_normal((4, 30)).astype(np.float32)
    text = jax.jit(lambda v: top_k_ids(v, 6)).lower(x).as_text()
    assert topk_cpu._TARGET not in text
    np.testing.assert_array_equal(np.asarray(top_k_ids(x, 6)), _reference(x, 6))
