"""Products with a few table rows per token, walked block by block over the table
instead of gathering the rows (the concept heads' top-k scoring and mixing).

  pick(q, T, ids)[n,s] = q[n] . T[ids[n,s]]          q [N,Q], T [C,Q], ids [N,S] -> [N,S]
  mix(w, ids, T)[n]    = sum_s w[n,s] T[ids[n,s]]    w [N,S]                   -> [N,Q]

A row gather forms [N,S,Q] (Steerling-8B's known head: 32 rows of 4096 per
token, 131k floats against the 34k of the token's dense logits over its
33,732 concepts) and its gradient scatters as much back. Here the table is
read in blocks of ``block`` rows:

  pick: Z = q T_blk^T [N,block]; keep the entries whose id falls in the block
  mix:  W = w scattered to its ids inside the block [N,block]; out += W T_blk

and the two are each other's transpose, so the gradients are the same ops:

  pick: dq = mix(g, ids, T),       dT_blk = W(g)^T q
  mix:  dw = pick(g_out, T, ids),  dT_blk = W(w)^T g_out

Memory O(N x block) per step; 2 N C Q FLOPs per op, at dense matmul rate on
TPU/GPU (on a CPU a gather of S << C rows can be cheaper:
model.concepts.scoring chooses). Computed in fp32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _blocks(table: jax.Array, block: int) -> jax.Array:
    """[C,Q] -> [n,block,Q] (zero rows pad the last block)."""
    c = table.shape[0]
    block = min(block, c)
    pad = -c % block
    return jnp.pad(table.astype(jnp.float32), ((0, pad), (0, 0))).reshape(-1, block, table.shape[1])


def _local(ids, start, block):
    """Block-local column of each id and whether it falls in [start, start + block)."""
    local = ids - start
    inside = (local >= 0) & (local < block)
    return jnp.where(inside, local, 0), inside


def _scatter(w, ids, start, block):
    """W [N,block]: w[n,s] added at column ids[n,s] - start (ids outside the block dropped)."""
    local, inside = _local(ids, start, block)
    rows = jnp.arange(w.shape[0])[:, None]
    return jnp.zeros((w.shape[0], block), jnp.float32).at[rows, local].add(
        jnp.where(inside, w.astype(jnp.float32), 0.0))


def _pick(q, table, ids, block):
    tb = _blocks(table, block)
    b = tb.shape[1]

    def body(acc, xs):
        t_blk, start = xs
        z = q.astype(jnp.float32) @ t_blk.T                                   # [N,block]
        local, inside = _local(ids, start, b)
        return acc + jnp.where(inside, jnp.take_along_axis(z, local, axis=1), 0.0), None

    starts = jnp.arange(tb.shape[0], dtype=ids.dtype) * b
    return jax.lax.scan(body, jnp.zeros(ids.shape, jnp.float32), (tb, starts))[0]


def _mix(w, ids, table, block):
    tb = _blocks(table, block)
    b = tb.shape[1]

    def body(acc, xs):
        t_blk, start = xs
        return acc + _scatter(w, ids, start, b) @ t_blk, None

    starts = jnp.arange(tb.shape[0], dtype=ids.dtype) * b
    return jax.lax.scan(body, jnp.zeros((w.shape[0], tb.shape[2]), jnp.float32), (tb, starts))[0]


def _table_grad(w, ids, x, n_rows, block):
    """dT [C,Q]: dT[c] = sum over (n,s) with ids[n,s] == c of w[n,s] x[n], block by block."""
    b = min(block, n_rows)
    n_blocks = -(-n_rows // b)

    def one(start):
        return _scatter(w, ids, start, b).T @ x.astype(jnp.float32)           # [block,Q]

    starts = jnp.arange(n_blocks, dtype=ids.dtype) * b
    return jax.lax.map(one, starts).reshape(n_blocks * b, -1)[:n_rows]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def pick(q: jax.Array, table: jax.Array, ids: jax.Array, block: int) -> jax.Array:
    """[N,S] = q[n] . table[ids[n,s]] (module docstring), fp32."""
    return _pick(q, table, ids, block)


def _pick_fwd(q, table, ids, block):
    return _pick(q, table, ids, block), (q, table, ids)


def _pick_bwd(block, res, g):
    q, table, ids = res
    dq = _mix(g, ids, table, block).astype(q.dtype)
    dt = _table_grad(g, ids, q, table.shape[0], block).astype(table.dtype)
    return dq, dt, None


pick.defvjp(_pick_fwd, _pick_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def mix(w: jax.Array, ids: jax.Array, table: jax.Array, block: int) -> jax.Array:
    """[N,Q] = sum_s w[n,s] table[ids[n,s]] (module docstring), fp32."""
    return _mix(w, ids, table, block)


def _mix_fwd(w, ids, table, block):
    return _mix(w, ids, table, block), (w, ids, table)


def _mix_bwd(block, res, g):
    w, ids, table = res
    dw = _pick(g, table, ids, block).astype(w.dtype)
    dt = _table_grad(w, ids, g, table.shape[0], block).astype(table.dtype)
    return dw, None, dt


mix.defvjp(_mix_fwd, _mix_bwd)
