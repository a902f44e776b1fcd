"""Tools fail fast with a one-line '<tool>: error: ...' (no traceback) on bad flags or an
existing destination, check paths as the library writes them (gs:// too), and write
their outputs atomically: build_demo_corpus, train_tokenizer, export_steerling,
aot_compile, plan, build_corpus --seqio_task. (init_checkpoint: test_init_checkpoint.py.)"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from cbm_lm.data import demo_corpus, inputs

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tool(name):
    """An argparse tool's module (absl tools run in a subprocess: their flags are global)."""
    spec = importlib.util.spec_from_file_location(f"_fail_fast_{name}",
                                                  ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def _one_line_error(r, tool):
    assert r.returncode != 0, r.stdout[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return r.stderr.strip().splitlines()[-1].removeprefix(f"{tool}: error: ")


# ---------------------------------------------------------------- 1. demo corpus / tokenizer
def _no_gather(monkeypatch):
    def gather(cfg, log):
        raise AssertionError("gathered documents before checking the flags/destination")
    monkeypatch.setattr(demo_corpus, "gather", gather)


def test_build_demo_corpus_refuses_an_existing_corpus_before_any_work(tmp_path, monkeypatch,
                                                                      capsys):
    _no_gather(monkeypatch)
    out = tmp_path / "corpus"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    rc = _tool("build_demo_corpus").main(["--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("build_demo_corpus: error: ") and "--overwrite" in err
    assert (out / "manifest.json").read_text() == "{}"


@pytest.mark.parametrize("flags, match", [
    (["--vocab_size", "0"], "--vocab_size 0: expected an integer > 4"),
    (["--vocab_size", "-5"], "--vocab_size -5"),
    (["--vocab_size", "4"], "--vocab_size 4"),
])
def test_build_demo_corpus_checks_vocab_size_before_any_work(tmp_path, monkeypatch, capsys,
                                                             flags, match):
    _no_gather(monkeypatch)
    rc = _tool("build_demo_corpus").main(["--out", str(tmp_path / "c")] + flags)
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("build_demo_corpus: error: ") and match in err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("flags, match", [
    (["--vocab_size", "0"], "--vocab_size 0: expected an integer > 4"),
    (["--vocab_size", "300", "--heldout_fraction", "1.5"], "--heldout_fraction 1.5"),
    (["--vocab_size", "300", "--input", "nothing/*.jsonl"], "nothing/*.jsonl: no files match"),
])
def test_train_tokenizer_errors_are_one_line(tmp_path, capsys, flags, match):
    src = tmp_path / "a.txt"
    src.write_text("hello world " * 50)
    rc = _tool("train_tokenizer").main(["--input", str(src), "--out", str(tmp_path / "tok")]
                                       + flags)
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("train_tokenizer: error: ") and match in err
    assert not (tmp_path / "tok").exists()


def test_training_texts_max_bytes_counts_utf8_bytes(tmp_path):
    for i, text in enumerate(["é" * 10, "ü" * 10, "x" * 10]):   # 20, 20, 10 bytes
        (tmp_path / f"{i}.txt").write_text(text, encoding="utf-8")
    paths = sorted(tmp_path.glob("*.txt"))
    assert len(list(inputs.training_texts(paths, 0.0, max_bytes=20))) == 1
    assert len(list(inputs.training_texts(paths, 0.0, max_bytes=21))) == 2
    assert len(list(inputs.training_texts(paths, 0.0))) == 3


# ---------------------------------------------------------------- 2. export_steerling
# tools/export_steerling.py under a fake gs:// bucket (gcs_fixtures.register_fake_gcs, in the child).
_FAKE_GS_RUN = f'''
import runpy, sys
sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})
from gcs_fixtures import register_fake_gcs
register_fake_gcs(sys.argv[1])
sys.argv = ["tools/export_steerling.py"] + sys.argv[2:]
runpy.run_path("tools/export_steerling.py", run_name="__main__")
'''


@pytest.mark.parametrize("where", ["local", "gs"])
def test_export_steerling_checks_paths_as_the_library_writes_them(tmp_path, where):
    bucket = tmp_path / "bucket_root"
    root = "gs://b" if where == "gs" else str(tmp_path / "local")
    disk = bucket / "b" if where == "gs" else tmp_path / "local"
    (disk / "ckpt").mkdir(parents=True)
    (disk / "ckpt" / "config.json").write_text(json.dumps({"train": {}}))
    (disk / "exp").mkdir()
    (disk / "exp" / "config.json").write_text("{}")
    script = tmp_path / "run.py"
    script.write_text(_FAKE_GS_RUN)

    def export(*flags):
        return _one_line_error(_run(str(script), str(bucket), *flags), "export_steerling")
    # an existing export is refused (before: os.path never saw gs://, so it was replaced)
    msg = export(f"--checkpoint={root}/ckpt", f"--out={root}/exp")
    assert msg == f"--out {root}/exp already holds a config.json; pass --overwrite"
    assert (disk / "exp" / "config.json").read_text() == "{}"
    # a gs:// checkpoint passes the directory check (before: 'no such checkpoint directory')
    msg = export(f"--checkpoint={root}/ckpt", f"--out={root}/exp", "--overwrite")
    assert "has no 'model' section" in msg
    msg = export(f"--checkpoint={root}/missing", f"--out={root}/exp2")
    assert msg == f"--checkpoint {root}/missing: no such checkpoint directory"


# ---------------------------------------------------------------- 3. aot_compile / plan
@pytest.mark.parametrize("tool, extra, match", [
    ("aot_compile", [], "--topology 'bogus'"),
    ("plan", [], "--topology 'bogus'"),
    # a ConfigError for the topology (before compiling): 3 sequences over 4 batch shards
    ("aot_compile", ["--topology=v5e:2x2", "--config.data.batch_size=3"], "data.batch_size=3"),
])
def test_a_bad_topology_or_config_is_a_one_line_error(tool, extra, match):
    if extra:
        pytest.importorskip("libtpu")
    r = _run(f"tools/{tool}.py", "--config=gin_configs/tiny.py", "--topology=bogus", *extra)
    assert r.stderr.strip().splitlines()[-1].startswith(f"{tool}: error: ")
    assert match in _one_line_error(r, tool)


def _report(hbm_bytes):
    from cbm_lm.config import MeshConfig
    from cbm_lm.train.aot import AotReport
    return AotReport(topology="x:1", device_kind="TPU v9", n_devices=1, mesh=MeshConfig(),
                     notes=[], lower_seconds=0, compile_seconds=0,
                     memory=dict(argument=6 << 30, output=0, alias=0, temp=2 << 30),
                     hbm_bytes=hbm_bytes, flops_per_device=None, model_flops_per_device=1.0,
                     peak_flops=1.0)


def test_the_memory_verdict_handles_unknown_hbm_and_an_override():
    assert _report(None).verdict() == ("HBM of 'TPU v9' unknown: no verdict (pass the HBM per "
                                       "device, e.g. --hbm_gib, where the tool has it)")
    assert _report(16 << 30).verdict().startswith("FITS: 8.")
    assert "50% of" in _report(16 << 30).verdict()
    assert _report(None).verdict(4 << 30).startswith("DOES NOT FIT: ")   # plan --hbm_gib 4
    assert "(given)" in _report(16 << 30).verdict(4 << 30)


def test_with_mesh_overrides_every_mesh_axis():
    from cbm_lm.config import MeshConfig
    from cbm_lm.default_config import load_config_file
    from cbm_lm.train.aot import with_mesh
    c = load_config_file(ROOT / "gin_configs" / "tiny.py")
    m = MeshConfig(data=2, fsdp=4, tensor=2, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)
    out = with_mesh(c, m)
    assert MeshConfig.from_config(out.mesh) == m and out is not c


# ---------------------------------------------------------------- 5. build_corpus --seqio_task
def _fake_task(monkeypatch, examples, calls=None):
    """seqio is an optional extra: the task reader is replaced by a list of examples."""
    from cbm_lm.data import seqio_input

    def read(task, split):
        if calls is not None:
            calls.append((task, split))
        yield from examples
    monkeypatch.setattr(seqio_input, "_examples", read)


def test_seqio_dump_comes_after_the_out_check(tmp_path, monkeypatch, capsys):
    calls = []
    _fake_task(monkeypatch, [{"text": b"a"}], calls)
    out = tmp_path / "o"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    rc = _tool("build_corpus").main(["--out", str(out), "--seqio_task", "t", "--vocab_size",
                                     "300"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("build_corpus: ") and "--overwrite" in err
    assert calls == [] and sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_a_bad_seqio_example_is_a_one_line_error_and_writes_nothing(tmp_path, monkeypatch,
                                                                    capsys):
    from cbm_lm.data import seqio_input
    out = tmp_path / "o"
    dump = seqio_input.jsonl_path("t/x", out)
    dump.write_text('{"text": "earlier"}\n')
    _fake_task(monkeypatch, [{"text": b"fine"}, {"label": 1}])
    rc = _tool("build_corpus").main(["--out", str(out), "--seqio_task", "t/x", "--vocab_size",
                                     "300"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert err.strip() == ("build_corpus: error: --seqio_task 't/x' example 1: no 'text' feature "
                           "(features: ['label']); expected a text task")
    assert dump.read_text() == '{"text": "earlier"}\n'          # the old dump, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == [dump.name]   # no tmp, no out


def test_seqio_to_jsonl_writes_the_examples(tmp_path, monkeypatch):
    from cbm_lm.data import seqio_input
    _fake_task(monkeypatch, [{"text": b"one", "concepts": [b"c:a"]},
                             {"text": "two", "source": b"s"}, {"text": b"three"}])
    path = seqio_input.seqio_to_jsonl("t", "train", tmp_path / "o", max_examples=2)
    assert path == str(tmp_path / "o.seqio-t.jsonl")
    lines = [json.loads(x) for x in pathlib.Path(path).read_text().splitlines()]
    assert lines == [{"text": "one", "source": "t", "concepts": ["c:a"]},
                     {"text": "two", "source": "s"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.seqio-t.jsonl"]
