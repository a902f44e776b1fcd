"""Does a saved checkpoint fit the target? Compared before anything is restored.

tree_differences(saved, target): saved is orbax's metadata tree (namedtuples
saved as dicts, tuples as lists), target a pytree of ShapeDtypeStructs. Both
are flattened to {"a.b.0.c": (shape, dtype)} and compared leaf by leaf.

config_differences(saved, current): the dotted config fields whose values
differ, written as the --config override that produces the current value;
fields that shape the state (model.*, optimizer.*) come first.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np

# Config sections whose fields decide parameter and optimizer-state shapes.
SHAPING_SECTIONS = ("model.", "optimizer.")


def _key_str(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _flat_leaves(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
        dtype = getattr(leaf, "dtype", None)
        out[".".join(_key_str(p) for p in path)] = (shape, str(np.dtype(dtype)) if dtype else "?")
    return out


def tree_differences(saved: Any, target: Any, *, dtypes: bool = True) -> list[str]:
    """Human-readable differences between two trees, one line per leaf ([] = they fit).

    dtypes=False compares structure and shapes only (a restore that casts)."""
    have, want = _flat_leaves(saved), _flat_leaves(target)
    lines = []
    per_layer = re.compile(r"(^|\.)backbone\.blocks\.\d+\.")
    if any(per_layer.search(k) for k in have) and not any(per_layer.search(k) for k in want):
        lines.append("backbone.blocks.<i>.*: the checkpoint holds one subtree per layer, written "
                     "before the blocks were stacked into one scanned Block (params [L, ...]); "
                     "this version cannot restore it (retrain, or re-import Steerling weights)")
    for key in sorted(set(have) | set(want)):
        if key not in want:
            lines.append(f"{key}: in the checkpoint {have[key][0]}, not in the model")
        elif key not in have:
            lines.append(f"{key}: wanted {want[key][0]}, not in the checkpoint")
        elif have[key][0] != want[key][0]:
            lines.append(f"{key}: shape {have[key][0]} saved vs {want[key][0]} wanted")
        elif dtypes and "?" not in (have[key][1], want[key][1]) and have[key][1] != want[key][1]:
            lines.append(f"{key}: dtype {have[key][1]} saved vs {want[key][1]} wanted")
    return lines


def _flat_config(cfg, prefix: str = "") -> dict[str, Any]:
    items = cfg.items() if hasattr(cfg, "items") else []
    out = {}
    for k, v in items:
        if hasattr(v, "items"):
            out.update(_flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved, current) -> list[str]:
    """["--config.model.d_model=64 (checkpoint: 32)", ...], state-shaping fields first."""
    have, want = _flat_config(saved), _flat_config(current)
    keys = [k for k in sorted(set(have) | set(want))
            if _normalize(have.get(k, "<unset>")) != _normalize(want.get(k, "<unset>"))]
    keys.sort(key=lambda k: not k.startswith(SHAPING_SECTIONS))
    return [f"--config.{k}={want.get(k, '<unset>')} (checkpoint: {have.get(k, '<unset>')})"
            for k in keys]


def _normalize(v):
    """config.json turns tuples into lists; compare them as equal."""
    if isinstance(v, (list, tuple)):
        return [_normalize(x) for x in v]
    return v
