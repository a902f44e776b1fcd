"""Range checks on loss schedule fields and hardware.peak_flops_per_device: each bad
value is refused at start-up (validate_config) with the field and the value named."""

import pathlib

import pytest

from cbm_lm.config import ConfigError, Problems
from cbm_lm.config_validation import check_loss_fields, validate_config
from cbm_lm.default_config import load_config_file

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cfg():
    return load_config_file(ROOT / "gin_configs" / "tiny_diffusion.py")


@pytest.mark.parametrize("overrides,field,needles", [
    # hold > until made hold_decay a step function at `hold`.
    ({"unknown_teacher_forcing_hold": 0.9, "unknown_teacher_forcing_until": 0.1},
     "loss.unknown_teacher_forcing_until", ["hold=0.9", "until=0.1"]),
    ({"unknown_teacher_forcing_hold": -0.1}, "loss.unknown_teacher_forcing_hold", ["hold=-0.1"]),
    ({"unknown_teacher_forcing_until": 1.5}, "loss.unknown_teacher_forcing_until", ["until=1.5"]),
    ({"unknown_teacher_forcing_floor": -3}, "loss.unknown_teacher_forcing_floor", ["-3", "[0, 1]"]),
    ({"unknown_teacher_forcing_floor": 1.2}, "loss.unknown_teacher_forcing_floor", ["1.2"]),
    ({"context_window_until": -1}, "loss.context_window_until", ["-1", "[0, 1]"]),
    ({"diffusion_noise_sigma": -0.3}, "loss.diffusion_noise_sigma", ["-0.3", "> 0"]),
    ({"diffusion_noise_sigma": 0.0}, "loss.diffusion_noise_sigma", ["0.0", "> 0"]),
    ({"diffusion_noise_center_start": 5}, "loss.diffusion_noise_center_start", ["5", "[0, 1]"]),
    ({"diffusion_noise_center_end": -0.5}, "loss.diffusion_noise_center_end", ["-0.5"]),
])
def test_bad_loss_range_is_refused_naming_field_and_value(overrides, field, needles):
    cfg = _cfg()
    for k, v in overrides.items():
        cfg.loss[k] = v
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    msg = str(e.value)
    assert f"config field '{field}'" in msg
    for needle in needles:
        assert needle in msg
    # The same rule in check_loss_fields, which train/losses.py applies.
    p = Problems()
    check_loss_fields(dict(cfg.loss), p)
    assert any(field in item for item in p.items)


def test_the_reviewer_config_names_every_bad_field_at_once():
    cfg = _cfg()
    cfg.loss.unknown_teacher_forcing_hold = 0.9
    cfg.loss.unknown_teacher_forcing_until = 0.1
    cfg.loss.unknown_teacher_forcing_floor = -3
    cfg.loss.context_window_until = -1
    cfg.loss.diffusion_noise_sigma = -0.3
    cfg.loss.diffusion_noise_center_start = 5
    cfg.hardware.peak_flops_per_device = -1
    with pytest.raises(ConfigError, match="6 bad config fields") as e:
        validate_config(cfg)
    for field in ("unknown_teacher_forcing_until", "unknown_teacher_forcing_floor",
                  "context_window_until", "diffusion_noise_sigma",
                  "diffusion_noise_center_start", "hardware.peak_flops_per_device"):
        assert field in str(e.value)


def test_negative_peak_flops_is_refused():
    cfg = _cfg()
    cfg.hardware.peak_flops_per_device = -1
    with pytest.raises(ConfigError, match=r"hardware.peak_flops_per_device': must be >= 0, got -1"):
        validate_config(cfg)


@pytest.mark.parametrize("overrides", [
    {},
    {"unknown_teacher_forcing_hold": 0.5, "unknown_teacher_forcing_until": 0.5},   # a step
    {"unknown_teacher_forcing_floor": 1.0, "context_window_until": 0.0,
     "diffusion_noise_center_start": 0.0, "diffusion_noise_center_end": 1.0},
])
def test_edges_of_the_ranges_are_accepted(overrides):
    cfg = _cfg()
    for k, v in overrides.items():
        cfg.loss[k] = v
    cfg.hardware.peak_flops_per_device = 0.0
    validate_config(cfg)
