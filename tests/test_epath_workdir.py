"""The trainer's own files reach a gs:// workdir through etils.epath (issue 12 item 4).

Offline stand-in for a bucket (gcs_fixtures.bucket): fsspec's "gs"/"gcs"
protocols (what epath and TensorBoard's gfile use for gs:// without TensorFlow)
are pointed at a local folder. Truth: the files land in that folder, and no
local folder named "gs:" appears (what plain open() did). Orbax writes the checkpoint arrays
through TensorStore's own GCS driver, which needs a real bucket: not tested here.
"""

import json

import pytest

from cbm_lm.default_config import base_config
from cbm_lm.train.checkpoint import read_config, write_config
from cbm_lm.train.loop import _set_aside_metrics, _truncate_metrics
from cbm_lm.train.metrics import MetricsLogger

from gcs_fixtures import bucket  # noqa: F401 (pytest fixture)


def test_run_files_go_to_the_bucket(bucket, tmp_path):
    from etils import epath
    workdir = "gs://my-bucket/run"
    logger = MetricsLogger(workdir, total_steps=3)
    for step in (1, 2, 3):
        logger.write(step, {"loss": 1.0 / step})
    logger.close()
    write_config(workdir, base_config())

    local = bucket / "my-bucket" / "run"
    lines = (local / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1, 2, 3]
    assert read_config(workdir).model.d_model == base_config().model.d_model
    assert list((local / "tensorboard").glob("events.out.tfevents.*"))
    assert not (tmp_path / "gs:").exists()
    from cbm_lm.eval.plots import read_metrics          # the eval report reads them back
    assert [r["loss"] for r in read_metrics(workdir)] == [1.0, 0.5, 1.0 / 3]

    _truncate_metrics(epath.Path(workdir) / "metrics.jsonl", 2)
    assert [json.loads(l)["step"] for l in (local / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2]
    _set_aside_metrics(epath.Path(workdir) / "metrics.jsonl")
    kept = list(local.glob("metrics.jsonl.*"))
    assert len(kept) == 1 and not (local / "metrics.jsonl").exists()
    assert not (tmp_path / "gs:").exists()


def _tiny_model():
    import jax
    import ml_collections
    import numpy as np
    from flax import nnx

    from cbm_lm.config import ModelConfig
    from cbm_lm.interop.steerling import build_model
    from cbm_lm.model import ConceptBottleneckLM
    cfg = ModelConfig.from_config(dict(
        vocab_size=97, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, mlp_dim=48,
        attention="causal", objective="autoregressive", max_seq_len=16, concepts=dict(
            n_known=20, known_topk=4, n_unknown=16, unknown_rank=16, unknown_topk=4,
            pad_multiple=16, block_size=16)))
    abstract = nnx.eval_shape(lambda: ConceptBottleneckLM(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32),
                          nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    return build_model(ml_collections.ConfigDict({"model": cfg.to_dict()}), params), params


def test_tool_outputs_go_to_the_bucket(bucket, tmp_path):
    """explain's report, export_steerling's files and import's directory swap (tools/*)."""
    import numpy as np

    from cbm_lm.atomic_io import replace_dir_atomically
    from cbm_lm.eval.checkpoint_report import write_markdown
    from cbm_lm.interop import export_steerling
    from cbm_lm.interop.steerling import read_steerling

    write_markdown("gs://b/explain/report.md", ["# Report", "line"])
    assert (bucket / "b" / "explain" / "report.md").read_text() == "# Report\nline"

    model, params = _tiny_model()
    export_steerling(model, "gs://b/export")
    local = bucket / "b" / "export"
    assert sorted(p.name for p in local.iterdir()) == ["config.json", "model.safetensors"]
    _, back = read_steerling(str(local))       # the reader needs local files (safetensors)
    import jax
    jax.tree.map(np.testing.assert_array_equal, back, params)   # every tensor, round-tripped

    def write(d, text):
        from etils import epath
        (epath.Path(d)).mkdir(parents=True)
        (epath.Path(d) / "f.txt").write_text(text)

    replace_dir_atomically("gs://b/ckpt", lambda d: write(d, "one"))
    replace_dir_atomically("gs://b/ckpt", lambda d: write(d, "two"))

    def fail(d):
        write(d, "half")
        raise OSError("disk full")
    with pytest.raises(OSError):
        replace_dir_atomically("gs://b/ckpt", fail)
    assert (bucket / "b" / "ckpt" / "f.txt").read_text() == "two"   # the failure kept it
    assert sorted(p.name for p in (bucket / "b").iterdir()) == ["ckpt", "explain", "export"]
    assert not (tmp_path / "gs:").exists()


def test_attribution_eval_output_goes_to_the_bucket(bucket, tmp_path):
    """launch/attribution_eval.py's --out: tmp dir, report.json, then the swap (eval/report.py)."""
    from cbm_lm.eval import report as report_lib

    for run in (1, 2):
        tmp = report_lib.prepare_output("gs://b/eval")
        report_lib.write_json(tmp + "/report.json", {"run": run})
        report_lib.commit_output(tmp, "gs://b/eval")
    assert json.loads((bucket / "b" / "eval" / "report.json").read_text()) == {"run": 2}
    tmp = report_lib.prepare_output("gs://b/eval")
    report_lib.discard_output(tmp)
    assert sorted(p.name for p in (bucket / "b").iterdir()) == ["eval"]
    assert not (tmp_path / "gs:").exists()


def test_a_metrics_line_cut_short_by_a_kill_does_not_block_resume(tmp_path):
    """The last line of metrics.jsonl half-written (the process killed mid-append) is
    dropped on resume; a broken line before it is refused, naming the file and line."""
    from etils import epath
    path = epath.Path(tmp_path) / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    _truncate_metrics(path, 5)
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2]
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not JSON"):
        _truncate_metrics(path, 5)
