"""Config validation names every offending field; the 8B param count by hand
(tests/test_steerling_import.py checks it against Steerling's own module)."""

import pathlib

import pytest

from cbm_lm.config import ConfigError, MeshConfig, ModelConfig
from cbm_lm.config_validation import validate_config
from cbm_lm.default_config import load_config_file
from cbm_lm.parallel.mesh import resolve_axis_sizes
from cbm_lm.train.planning import count_params

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name):
    return load_config_file(ROOT / "gin_configs" / f"{name}.py")


def test_steerling_8b_param_count_by_hand():
    cfg = ModelConfig.from_config(load_config("steerling_8b").model)
    d, f, v, hd = 4096, 16384, 100281, 128
    per_layer = d * (32 * hd) + 2 * d * (4 * hd) + 32 * hd * d + 3 * d * f + 2 * d + 2 * hd
    known = 2 * 33744 * d
    unknown = 2 * 101200 * 256 + 2 * 256 * d
    assert count_params(cfg) == v * d + 32 * per_layer + d + known + unknown


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "gin_configs").glob("*.py")))
def test_every_scale_config_validates(name):
    validate_config(load_config(name))   # the whole tree, as launch/train.py checks it


@pytest.mark.parametrize("name", ["small", "1b", "steerling_8b"])
def test_block_causal_scales_refuse_an_autoregressive_override(name):
    # These scales are Steerling-shaped block-causal diffusion models; overriding only the
    # objective would train next-token prediction with the target visible in its block.
    cfg = load_config(name)
    cfg.model.objective = "autoregressive"
    with pytest.raises(ConfigError, match=r"model\.attention.*attention='causal'"):
        validate_config(cfg)
    cfg.model.attention = "causal"
    validate_config(cfg)


@pytest.mark.parametrize("section,field,value,needles", [
    ("model", "attention", "block_causal", ["model.attention", "causal"]),
    ("train", "log_every", 0, ["train.log_every", ">= 1"]),
    ("checkpoint", "every_steps", 0, ["checkpoint.every_steps", ">= 1"]),
    ("train", "nan_policy", "Skip", ["train.nan_policy", "('stop', 'skip')"]),
    ("train", "grad_accum_steps", 3, ["train.grad_accum_steps",
                                      "must divide data.batch_size={data.batch_size}"]),
    ("optimizer", "b2", 1.0, ["optimizer.b2", "[0, 1)"]),
    ("loss", "epsilon_dropout", 1.5, ["loss.epsilon_dropout", "[0, 1]"]),
    ("data", "process_split", "Rows", ["data.process_split", "('documents', 'rows')"]),
    ("data", "seq_len", 8192, ["data.seq_len", "model.max_seq_len={model.max_seq_len}"]),
    # The weight trains the learned key head's W; the fixed head (the default) has none.
    ("provenance", "contrastive_weight", 0.5,
     ["provenance.contrastive_weight", "provenance.head='learned'", "head='fixed'"]),
    ("provenance", "contrastive_weight", -0.1, ["provenance.contrastive_weight", ">= 0"]),
])
def test_each_bad_field_is_refused_with_its_allowed_values(section, field, value, needles):
    cfg = load_config("tiny")     # autoregressive + causal: valid as shipped
    shipped = {f"{s}.{f}": cfg[s][f] for s, f in (("data", "batch_size"), ("model", "max_seq_len"))}
    cfg[section][field] = value
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    for needle in needles:            # {data.batch_size}: the shipped value, named in the error
        for key, v in shipped.items():
            needle = needle.replace("{" + key + "}", str(v))
        assert needle in str(e.value)


def test_report_topk_above_kept_topk_is_refused():
    cfg = load_config("tiny")
    cfg.model.concepts.known_report_topk = cfg.model.concepts.known_topk + 1
    kept = cfg.model.concepts.known_topk
    with pytest.raises(ConfigError, match=f"known_report_topk.*known_topk={kept}"):
        validate_config(cfg)
    cfg.model.concepts.known_report_topk = cfg.model.concepts.known_topk
    cfg.model.concepts.unknown_report_topk = cfg.model.concepts.unknown_topk + 1
    with pytest.raises(ConfigError, match="unknown_report_topk"):
        validate_config(cfg)


def test_one_error_names_every_bad_field():
    cfg = load_config("tiny")
    cfg.model.attention = "block_causal"
    cfg.train.log_every = 0
    cfg.train.nan_policy = "Skip"
    cfg.model.concepts.known_report_topk = 64
    cfg.checkpoint.every_steps = 0
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    msg = str(e.value)
    assert msg.startswith("5 bad config fields")
    for field in ("model.attention", "train.log_every", "train.nan_policy",
                  "model.concepts.known_report_topk", "checkpoint.every_steps"):
        assert field in msg


def test_two_stream_diffusion_needs_block_causal_attention():
    cfg = load_config("tiny_diffusion")
    cfg.model.attention = "causal"
    with pytest.raises(ConfigError, match="loss.diffusion_clean_context.*block_causal"):
        validate_config(cfg)
    cfg.loss.diffusion_clean_context = False     # one-stream diffusion may be causal
    with pytest.raises(ConfigError, match="loss.ar_warmup_fraction.*block_causal"):
        validate_config(cfg)                     # ... but AR-to-diffusion adaptation may not
    cfg.loss.ar_warmup_fraction = cfg.loss.mask_anneal_fraction = 0.0
    validate_config(cfg)


def test_trainer_refuses_before_writing_anything(tmp_path):
    from cbm_lm.train.loop import train
    cfg = load_config("tiny")
    cfg.train.log_every = 0
    with pytest.raises(ConfigError, match="train.log_every"):
        train(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field,value,needle", [
    ("n_kv_heads", 3, "model.n_kv_heads"),
    ("attention", "sliding", "model.attention"),
    ("objective", "mlm", "model.objective"),
    ("norm_order", "sandwich", "model.norm_order"),
])
def test_bad_model_fields_are_named(field, value, needle):
    cfg = load_config("tiny")
    cfg.model[field] = value
    with pytest.raises(ConfigError, match=needle):
        ModelConfig.from_config(cfg.model)


def test_bad_concept_field_and_unknown_field_are_named():
    cfg = load_config("tiny")
    cfg.model.concepts.known_topk = 10**6
    with pytest.raises(ConfigError, match="model.concepts.known_topk"):
        ModelConfig.from_config(cfg.model)
    with pytest.raises(ConfigError, match="unknown field.*'d_modle'"):
        ModelConfig.from_config({**load_config("tiny").model.to_dict(), "d_modle": 3})


def test_mesh_axis_fill():
    assert resolve_axis_sizes((-1, 2, 2), 8, "mesh") == (2, 2, 2)
    with pytest.raises(ConfigError, match="at most one axis"):
        resolve_axis_sizes((-1, -1, 1), 8, "mesh")
    with pytest.raises(ConfigError, match="use 6 devices"):
        resolve_axis_sizes((3, 2, 1), 8, "mesh")
    assert MeshConfig.from_config({"data": 2}).data == 2


@pytest.mark.parametrize("field,value", [("teacher_forcing", "sometimes"),
                                          ("diffusion_noise", "Gaussian"),
                                          ("diffusion_t_max", 0.0),
                                          ("epsilon_weight", -0.3)])
def test_bad_loss_choice_is_refused_at_start_up(field, value):
    """validate_config (run before the workdir exists) applies the loss rules too."""
    cfg = load_config("tiny_diffusion")
    cfg.loss[field] = value
    with pytest.raises(ConfigError, match=f"loss.{field}"):
        validate_config(cfg)


def test_schedule_steps_follows_num_steps_unless_set_and_never_moves_it():
    """loss.schedule_steps follows train.num_steps until set; setting it must not change
    train.num_steps (it was the same reference, so an override shortened the run)."""
    from cbm_lm.config import ModelConfig
    from cbm_lm.default_config import base_config
    from cbm_lm.train.step import step_config
    c = base_config()
    c.train.num_steps = 900
    assert step_config(ModelConfig.from_config(c.model), c)["loss_cfg"].schedule_steps == 900
    c.loss.schedule_steps = 500
    assert c.train.num_steps == 900
    assert step_config(ModelConfig.from_config(c.model), c)["loss_cfg"].schedule_steps == 500


@pytest.mark.parametrize("tool", ["launch/train.py", "tools/plan.py"])
def test_a_stray_word_on_the_command_line_is_refused(tool, tmp_path):
    """`--config.model.qk_norm False` leaves `False` as an argument and qk_norm unchanged:
    refused before anything is written, naming the stray word."""
    import pathlib
    import subprocess
    import sys

    from train_fixtures import env
    root = pathlib.Path(__file__).resolve().parents[1]
    workdir = ["--workdir", str(tmp_path / "run")] if tool.startswith("launch") else []
    proc = subprocess.run([sys.executable, tool, "--config", "gin_configs/tiny.py", *workdir,
                           "--config.model.qk_norm", "False"],
                          cwd=root, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "unexpected arguments ['False']" in proc.stderr + proc.stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field,value,message", [
    ("loss.steering_layer", 99, r"loss\.steering_layer.*\[0, 2\]"),
    ("loss.context_window", -4, r"loss\.context_window.*>= 0"),
    ("loss.context_window", 6, r"multiple of model\.diffusion_block_size=4"),
])
def test_loss_fields_that_need_the_model_are_refused_at_start_up(field, value, message):
    """Accepted until now and failing late (the first step's compile) or never (a steering
    layer past the last block injects nothing)."""
    from cbm_lm.config_validation import validate_config
    c = load_config("tiny_diffusion")
    c.model.diffusion_block_size = 4
    section, name = field.split(".")
    c[section][name] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(c)
