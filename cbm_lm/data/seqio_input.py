"""Optional input: a registered seqio Task or Mixture (the ``seqio`` extra).

seqio (and TensorFlow) are imported only when this is used. Examples are
written to a JSONL file beside the output, which build_corpus then reads like
any other input: the ``text`` feature (bytes or str) becomes the text, an
optional ``source`` feature the source (default: the task name), and an
optional ``concepts`` feature (list of names) the document-level labels.
"""

from __future__ import annotations

import json
import os

from etils import epath


def _import_seqio():
    try:
        import seqio  # noqa: F401
    except ImportError as e:
        raise ImportError("--seqio_task needs the optional seqio extra (it pulls TensorFlow): "
                          "pip install 'cbm_lm[seqio]'; seqio is not installed") from e
    return seqio


def _str(x) -> str:
    if hasattr(x, "numpy"):
        x = x.numpy()
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _examples(task: str, split: str):
    """The task's examples (dicts of numpy values), in order."""
    seqio = _import_seqio()
    provider = seqio.get_mixture_or_task(task)
    ds = provider.get_dataset(sequence_length=None, split=split, shuffle=False)
    return ds.as_numpy_iterator()


def jsonl_path(task: str, out_dir) -> epath.Path:
    """Where ``seqio_to_jsonl`` dumps ``task``: ``<out_dir>.seqio-<task>.jsonl``."""
    return epath.Path(str(out_dir) + f".seqio-{task.replace('/', '_')}.jsonl")


def seqio_to_jsonl(task: str, split: str, out_dir, max_examples: int = 0) -> str:
    """Dumps the task's examples to ``<out_dir>.seqio-<task>.jsonl``; returns its path.

    The file is written under a temporary sibling name and renamed into place: an
    example without a ``text`` feature (ValueError) or a killed dump leaves any earlier
    dump as it was and no partial file.
    """
    out = jsonl_path(task, out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp.{os.getpid()}"
    try:
        with tmp.open("w") as f:
            for n, ex in enumerate(_examples(task, split)):
                if max_examples and n >= max_examples:
                    break
                if "text" not in ex:
                    raise ValueError(f"--seqio_task {task!r} example {n}: no 'text' feature "
                                     f"(features: {sorted(ex)}); expected a text task")
                doc = {"text": _str(ex["text"]), "source": _str(ex.get("source", task))}
                if "concepts" in ex:
                    doc["concepts"] = [_str(c) for c in ex["concepts"]]
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
        tmp.replace(out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return str(out)
