"""Steerling tensor names <-> cbm_lm parameter tree.

Steerling (PyTorch) stores ``nn.Linear`` weights as [out, in]; cbm_lm stores
einsum-ready kernels with named axes. The mapping, for D = n_embd, H heads of
hd = D/H, G kv heads, F = mlp_dim, C_pad padded concepts, r = rank:

  transformer.tok_emb.weight [V,D]            backbone.embedding [V,D]
  transformer.lm_head.weight [V,D]            (tied: same tensor; untied: lm_head [V,D])
  blocks.i.attn.c_attn.weight [D+2G*hd, D]    rows [q | k | v] -> q_proj [D,H,hd], k_proj/v_proj [D,G,hd]
  blocks.i.attn.c_proj.weight [D, H*hd]       o_proj [H,hd,D]
  blocks.i.attn.{q,k}_norm.weight [hd]        attn.{q,k}_norm.scale
  blocks.i.mlp.c_fc.weight [2F, D]            rows [up | gate] -> up [D,F], gate [D,F]
  blocks.i.mlp.c_proj.weight [D, F]           down [F,D]
  blocks.i.ln_1 / ln_2 .weight [D]            attn_norm.scale / mlp_norm.scale
  transformer.ln_f.weight [D]                 backbone.final_norm.scale
  known_head.concept_predictor.weight [C,D]   rewrite.known_head.predictor
  known_head.concept_embedding.weight [C,D]   rewrite.known_head.embedding
  unknown_head.predictor_down.weight [r,D]    unknown_head.predictor_down [D,r]
  unknown_head.predictor_up.weight [C,r]      unknown_head.predictor_up [C,r]
  unknown_head.embedding_coef.weight [C,r]    unknown_head.embedding_coef [C,r]
  unknown_head.embedding_basis.weight [D,r]   unknown_head.embedding_basis [r,D]
  (dense unknown head: concept_predictor / concept_embedding like the known head)

(``blocks.i`` is ``transformer.blocks.i``.) cbm_lm stacks the blocks (one
scanned Block, every parameter [L, ...]): block i's tensors are row i of
``backbone.blocks.*`` (``BLOCKS``). Every tensor is checked by name and shape;
errors name the tensor and the shape expected.
"""

from __future__ import annotations

import glob
import os
from typing import Callable, Iterable, NamedTuple

import ml_dtypes
import numpy as np
import safetensors.numpy

from cbm_lm.config import ModelConfig
from cbm_lm.interop.steerling_config import SteerlingFormatError

# Prefixes that training wrappers put in front of the names (DDP, FSDP, HF).
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.", "_fsdp_wrapped_module.")
TOK_EMB = "transformer.tok_emb.weight"
BLOCKS = ("backbone", "blocks")   # the stacked blocks; per-layer paths are BLOCKS + (i, ...)
LM_HEAD = "transformer.lm_head.weight"


class Tensor(NamedTuple):
    """One Steerling tensor: its name and shape, and the cbm_lm params it feeds.

    to_ours(array) -> {our_path: array}; from_ours({our_path: array}) -> array.
    Paths are tuples into ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``.
    """
    name: str
    shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], dict[tuple, np.ndarray]]
    from_ours: Callable[[dict[tuple, np.ndarray]], np.ndarray]


def _same(path: tuple) -> tuple[Callable, Callable]:
    return (lambda a: {path: a}), (lambda p: p[path])


def _transposed(path: tuple) -> tuple[Callable, Callable]:
    return (lambda a: {path: a.T}), (lambda p: p[path].T)


def _tensor(name: str, shape: Iterable[int], fns: tuple[Callable, Callable]) -> Tensor:
    return Tensor(name, tuple(int(s) for s in shape), *fns)


def _block_tensors(cfg: ModelConfig, i: int) -> list[Tensor]:
    d, h, g, hd, f = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim,
                      cfg.mlp_dim)
    pre, ours = f"transformer.blocks.{i}.", ("backbone", "blocks", i)
    attn = ours + ("attn",)
    q_rows, kv_rows = h * hd, g * hd

    def qkv_to(a):
        q, k, v = a[:q_rows], a[q_rows:q_rows + kv_rows], a[q_rows + kv_rows:]
        return {attn + ("q_proj",): q.T.reshape(d, h, hd),
                attn + ("k_proj",): k.T.reshape(d, g, hd),
                attn + ("v_proj",): v.T.reshape(d, g, hd)}

    def qkv_from(p):
        return np.concatenate([p[attn + ("q_proj",)].reshape(d, q_rows).T,
                               p[attn + ("k_proj",)].reshape(d, kv_rows).T,
                               p[attn + ("v_proj",)].reshape(d, kv_rows).T], axis=0)

    def fc_to(a):
        return {ours + ("mlp", "up"): a[:f].T, ours + ("mlp", "gate"): a[f:].T}

    def fc_from(p):
        return np.concatenate([p[ours + ("mlp", "up")].T, p[ours + ("mlp", "gate")].T], axis=0)

    out = [
        _tensor(pre + "attn.c_attn.weight", (q_rows + 2 * kv_rows, d), (qkv_to, qkv_from)),
        _tensor(pre + "attn.c_proj.weight", (d, q_rows),
                ((lambda a: {attn + ("o_proj",): a.T.reshape(h, hd, d)}),
                 (lambda p: p[attn + ("o_proj",)].reshape(q_rows, d).T))),
        _tensor(pre + "mlp.c_fc.weight", (2 * f, d), (fc_to, fc_from)),
        _tensor(pre + "mlp.c_proj.weight", (d, f), _transposed(ours + ("mlp", "down"))),
        _tensor(pre + "ln_1.weight", (d,), _same(ours + ("attn_norm", "scale"))),
        _tensor(pre + "ln_2.weight", (d,), _same(ours + ("mlp_norm", "scale"))),
    ]
    if cfg.qk_norm:
        out += [_tensor(pre + "attn.q_norm.weight", (hd,), _same(attn + ("q_norm", "scale"))),
                _tensor(pre + "attn.k_norm.weight", (hd,), _same(attn + ("k_norm", "scale")))]
    return out


def steerling_tensors(cfg: ModelConfig) -> list[Tensor]:
    """Every tensor an InterpretableCausalDiffusionLM of ``cfg`` holds, in state_dict order.

    With tied embeddings ``transformer.lm_head.weight`` is listed too (steerling's
    state_dict has both names for the one tensor); readers accept either.
    """
    d, v, cc = cfg.d_model, cfg.vocab_size, cfg.concepts
    out = [_tensor(TOK_EMB, (v, d), _same(("backbone", "embedding")))]
    for i in range(cfg.n_layers):
        out += _block_tensors(cfg, i)
    out.append(_tensor("transformer.ln_f.weight", (d,), _same(("backbone", "final_norm", "scale"))))
    lm_path = ("backbone", "embedding") if cfg.tie_embeddings else ("lm_head",)
    out.append(_tensor(LM_HEAD, (v, d), _same(lm_path)))
    kh = ("rewrite", "known_head")
    cpad = cc.n_known_padded
    out += [_tensor("known_head.concept_embedding.weight", (cpad, d), _same(kh + ("embedding",))),
            _tensor("known_head.concept_predictor.weight", (cpad, d), _same(kh + ("predictor",)))]
    if cc.use_unknown:
        uh, upad, r = ("rewrite", "unknown_head"), cc.n_unknown_padded, cc.unknown_rank
        if r:
            out += [
                _tensor("unknown_head.embedding_coef.weight", (upad, r),
                        _same(uh + ("embedding_coef",))),
                _tensor("unknown_head.embedding_basis.weight", (d, r),
                        _transposed(uh + ("embedding_basis",))),
                _tensor("unknown_head.predictor_down.weight", (r, d),
                        _transposed(uh + ("predictor_down",))),
                _tensor("unknown_head.predictor_up.weight", (upad, r),
                        _same(uh + ("predictor_up",)))]
        else:
            out += [
                _tensor("unknown_head.concept_embedding.weight", (upad, d), _same(uh + ("embedding",))),
                _tensor("unknown_head.concept_predictor.weight", (upad, d), _same(uh + ("predictor",)))]
    return out


def load_safetensors_dir(src_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of ``src_dir/*.safetensors`` (sharded or not) as numpy arrays.

    bfloat16 / float16 tensors are widened to float32.
    """
    files = sorted(glob.glob(os.path.join(os.fspath(src_dir), "*.safetensors")))
    if not files:
        raise SteerlingFormatError(f"{src_dir}: no *.safetensors files")
    state: dict[str, np.ndarray] = {}
    for path in files:
        try:
            tensors = safetensors.numpy.load_file(path)
        except Exception as e:  # safetensors raises its own error types
            raise SteerlingFormatError(f"{path}: not a readable safetensors file ({e})") from e
        for name, arr in tensors.items():
            if name in state:
                raise SteerlingFormatError(f"{path}: tensor '{name}' also appears in another shard")
            if arr.dtype in (ml_dtypes.bfloat16, np.float16):
                arr = arr.astype(np.float32)
            state[name] = arr
    return state


def strip_wrapper_prefix(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Removes one common wrapper prefix (``module.``, ``model.`` ...) shared by all names.

    Applied repeatedly (``module.model.x`` -> ``x``) while every name carries it.
    """
    changed = True
    while changed and state:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _set_layer(tree: dict, path: tuple, value: np.ndarray, n_layers: int) -> None:
    """Writes per-layer ``BLOCKS + (i, ...)`` into row i of the stacked [L, ...] array."""
    i, rest = path[len(BLOCKS)], BLOCKS + path[len(BLOCKS) + 1:]
    node = tree
    for key in rest[:-1]:
        node = node.setdefault(key, {})
    if rest[-1] not in node:
        node[rest[-1]] = np.empty((n_layers,) + value.shape, value.dtype)
    node[rest[-1]][i] = value


def _unstack_layers(flat: dict[tuple, np.ndarray]) -> dict[tuple, np.ndarray]:
    """Stacked ``BLOCKS + (...)`` [L, ...] -> per-layer ``BLOCKS + (i, ...)`` views."""
    out = {}
    for k, v in flat.items():
        if k[:len(BLOCKS)] == BLOCKS:
            for i in range(v.shape[0]):
                out[BLOCKS + (i,) + k[len(BLOCKS):]] = v[i]
        else:
            out[k] = v
    return out


def _flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = np.asarray(v)
    return out


def steerling_to_params(state: dict[str, np.ndarray], cfg: ModelConfig,
                        *, dtype=np.float32, consume: bool = False) -> dict:
    """Steerling state dict -> nested dict for ``nnx.replace_by_pure_dict`` (float32 arrays).

    Tolerates a wrapper prefix and a missing tied copy (``lm_head`` or
    ``tok_emb``); raises on missing, unexpected or mis-shaped tensors.
    consume: empty ``state`` as its tensors are converted, so a large
    checkpoint is not held twice in host memory.
    """
    source = state
    state = strip_wrapper_prefix(dict(state))
    if consume:
        source.clear()
    specs = steerling_tensors(cfg)
    if cfg.tie_embeddings:
        if TOK_EMB not in state and LM_HEAD in state:
            state[TOK_EMB] = state[LM_HEAD]
        want = (cfg.vocab_size, cfg.d_model)
        if LM_HEAD in state and tuple(state[LM_HEAD].shape) != want:
            raise SteerlingFormatError(
                f"tensor '{LM_HEAD}' has shape {list(state[LM_HEAD].shape)}, expected {list(want)}")
        if LM_HEAD in state and state[LM_HEAD] is not state[TOK_EMB] \
                and not np.array_equal(state[LM_HEAD], state[TOK_EMB]):
            raise SteerlingFormatError(
                f"config ties the embeddings (weight_sharing=true) but '{TOK_EMB}' and "
                f"'{LM_HEAD}' differ; set weight_sharing=false to import an untied head")
        specs = [s for s in specs if s.name != LM_HEAD]
        state.pop(LM_HEAD, None)
    expected = {s.name for s in specs}
    missing = [s for s in specs if s.name not in state]
    if missing:
        raise SteerlingFormatError(
            f"missing {len(missing)} tensor(s): " + "; ".join(
                f"'{s.name}' (expected shape {list(s.shape)})" for s in missing[:8])
            + (" ..." if len(missing) > 8 else ""))
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise SteerlingFormatError(
            f"unexpected tensor(s) for this config: {unexpected[:8]}"
            + (" ..." if len(unexpected) > 8 else "")
            + " (does config.json match the weights?)")
    params: dict = {}
    for s in specs:
        arr = np.asarray(state.pop(s.name) if consume else state[s.name])
        if tuple(arr.shape) != s.shape:
            raise SteerlingFormatError(
                f"tensor '{s.name}' has shape {list(arr.shape)}, expected {list(s.shape)} "
                f"for this config")
        if arr.dtype.kind != "f" and arr.dtype != ml_dtypes.bfloat16:
            raise SteerlingFormatError(f"tensor '{s.name}' has dtype {arr.dtype}, expected a float type")
        for path, value in s.to_ours(arr.astype(np.float32, copy=False)).items():
            value = np.ascontiguousarray(value, dtype=dtype)
            if path[:len(BLOCKS)] == BLOCKS:
                _set_layer(params, path, value, cfg.n_layers)
            else:
                _set(params, path, value)
    return params


def params_to_steerling(params: dict, cfg: ModelConfig, *, dtype=np.float32) -> dict[str, np.ndarray]:
    """Nested param dict (``nnx.to_pure_dict(nnx.state(model, nnx.Param))``) -> Steerling state dict.

    Tied models get both ``tok_emb`` and ``lm_head`` (separate copies, as
    safetensors cannot store aliased tensors), which is what
    ``load_state_dict(strict=True)`` expects.
    """
    flat = _unstack_layers(_flatten(params))
    flat = {k: v.astype(np.float32) for k, v in flat.items()}
    out = {}
    for s in steerling_tensors(cfg):
        try:
            arr = s.from_ours(flat)
        except KeyError as e:
            raise SteerlingFormatError(f"param {e} needed for Steerling tensor '{s.name}' is missing") from e
        if tuple(arr.shape) != s.shape:
            raise SteerlingFormatError(
                f"Steerling tensor '{s.name}' came out as {list(arr.shape)}, expected {list(s.shape)}")
        out[s.name] = np.ascontiguousarray(arr).astype(dtype)
    return out
