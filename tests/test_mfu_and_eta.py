"""MFU counts model FLOPs (3 x forward, remat recompute not counted; hfu counts it), the
two-stream LM head once, no made-up peak for an unknown chip, and the console ETA after
a resume from the steps run in this process."""

import json
import pathlib

import pytest

from cbm_lm.config import ConceptConfig, ModelConfig
from cbm_lm.parallel import devices
from cbm_lm.train import planning
from cbm_lm.train.metrics import MetricsLogger

# d=16, H=2 (hd=8), G=1, F=32, L=2, V=64; known C_k=8 k=2; unknown C_u=16 rank 4 k=4.
D, H, HD, G, F, L, V = 16, 2, 8, 1, 32, 2, 64
CK, KK, CU, QU, KU = 8, 2, 16, 4, 4
T, BLOCK = 32, 8


def _cfg(remat="none"):
    return ModelConfig(vocab_size=V, d_model=D, n_layers=L, n_heads=H, n_kv_heads=G, mlp_dim=F,
                       max_seq_len=64, remat=remat, objective="diffusion",
                       attention="block_causal", diffusion_block_size=BLOCK,
                       concepts=ConceptConfig(n_known=CK, known_topk=KK, n_unknown=CU,
                                              unknown_rank=QU, unknown_topk=KU))


# By hand (2 FLOPs per multiply-add), per token:
PROJ = 2 * (D * H * HD + 2 * D * G * HD + H * HD * D + 3 * D * F)     # q, k, v, o, SwiGLU
HEAD = 2 * V * D                                                       # tied LM head
CONCEPT = 2 * (CK * D + 2 * KK * D) + 2 * (CU * QU + 2 * KU * QU) + 2 * 2 * D * QU
FWD = L * (PROJ + 2 * 2 * T * H * HD) + HEAD + CONCEPT


def test_forward_flops_by_hand():
    assert planning.forward_flops_per_token(_cfg(), T) == FWD


@pytest.mark.parametrize("remat", ["none", "block", "full"])
def test_model_flops_do_not_count_the_remat_recompute(remat):
    cfg = _cfg(remat)
    assert planning.model_train_flops_per_token(cfg, T) == 3 * FWD      # the MFU numerator
    hw = planning.hardware_train_flops_per_token(cfg, T)                 # the HFU numerator
    assert hw == (3 if remat == "none" else 4) * FWD
    assert planning.train_flops_per_token(cfg, T) == hw                  # the planners' count


def test_two_stream_counts_the_lm_head_once():
    """[noisy | clean]: blocks and concept heads on both streams, the LM head on the noisy
    one only; attention clean->clean [T,T], noisy->clean [T,T], noisy band 3 x block."""
    attn = 2 * 2 * H * HD * (2 * T + 3 * BLOCK)
    by_hand = 2 * L * PROJ + L * attn + HEAD + 2 * CONCEPT
    cfg = _cfg()
    two = planning.step_forward_flops_per_token(cfg, T, two_stream=True)
    assert two == by_hand
    assert planning.model_train_flops_per_token(cfg, T, two_stream=True) == 3 * by_hand
    # The old count (2 x one stream of 2T) had the head twice and [2T,2T] attention.
    old = 2 * planning.forward_flops_per_token(cfg, 2 * T)
    assert old - two == HEAD + L * (2 * 2 * 2 * 2 * T * H * HD - attn)
    assert planning.step_forward_flops_per_token(cfg, T) == FWD         # one stream unchanged


def test_unknown_chip_has_no_peak_and_warns_once(monkeypatch):
    warned = []
    monkeypatch.setattr(devices.logging, "warning", lambda msg, *a: warned.append(msg % a))
    monkeypatch.setattr(devices, "_warned_unknown", set())
    assert devices.known_peak_flops_per_device("Mystery XPU 9") is None
    assert devices.known_peak_flops_per_device("Mystery XPU 9") is None
    assert len(warned) == 1
    assert "Mystery XPU 9" in warned[0] and "hardware.peak_flops_per_device" in warned[0]
    assert devices.known_peak_flops_per_device("Mystery XPU 9", 5e14) == 5e14   # the override
    assert devices.known_peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert devices.known_peak_flops_per_device("cpu") == devices.PEAK_FLOPS["cpu"]
    # The planners still get a number (the CPU's nominal), warned only once.
    assert devices.peak_flops_per_device("Mystery XPU 9") == devices.PEAK_FLOPS["cpu"]
    assert len(warned) == 1


def _logger(tmp_path, monkeypatch, clock, **kw):
    monkeypatch.setattr("cbm_lm.train.metrics.time.time", lambda: clock[0])
    return MetricsLogger(tmp_path, 1000, **kw)


def test_eta_after_a_resume_uses_the_steps_run_in_this_process(tmp_path, monkeypatch, capsys):
    clock = [1000.0]
    log = _logger(tmp_path, monkeypatch, clock, start_step=900)
    clock[0] += 10.0                      # 10 steps at 1 s/step: now at step 910
    assert log.eta_seconds(910, clock[0]) == pytest.approx(90.0)
    log.console(910, {"loss": 1.0})
    assert "eta 1m30s" in capsys.readouterr().out
    clock[0] += 5.0                       # later lines: the rate since the previous one
    assert log.eta_seconds(920, clock[0]) == pytest.approx(0.5 * 80)
    log.close()


def test_eta_of_a_fresh_run_is_unchanged(tmp_path, monkeypatch):
    clock = [0.0]
    log = _logger(tmp_path, monkeypatch, clock)
    clock[0] = 20.0
    assert log.eta_seconds(10, clock[0]) == pytest.approx(2.0 * 990)
    log.close()


def test_console_shows_hfu_and_a_missing_mfu_is_left_out(tmp_path, monkeypatch, capsys):
    clock = [0.0]
    log = _logger(tmp_path, monkeypatch, clock)
    clock[0] = 1.0
    log.console(1, {"loss": 2.0, "tokens_per_sec": 100.0})     # no known peak: no mfu
    out = capsys.readouterr().out
    assert "tokens_per_sec=100" in out and "mfu" not in out
    log.write(1, {"loss": 2.0, "tokens_per_sec": 100.0})
    clock[0] = 2.0
    log.console(2, {"loss": 2.0, "mfu": 0.3, "hfu": 0.4})
    assert "mfu=0.3 hfu=0.4" in capsys.readouterr().out
    log.close()
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert "mfu" not in rec and rec["tokens_per_sec"] == 100.0



def test_trainer_logs_real_tokens_per_sec_and_mfu_hfu(tmp_path):
    """A 2-step two-stream run with remat=block: hfu / mfu = 4/3 (the recompute), mfu from
    the model FLOPs of every slot, tokens_per_sec from the step's real tokens."""
    from cbm_lm.train.checkpoint import read_config
    from train_fixtures import run, tiny_corpus, train_args

    corpus = tiny_corpus(tmp_path / "corpus")
    work = tmp_path / "work"
    run(train_args(corpus, work, **{"train.num_steps": 2, "checkpoint.every_steps": 2,
                                    "model.remat": "block"}))
    config = read_config(work)
    cfg = ModelConfig.from_config(config.model)
    assert cfg.remat == "block" and config.loss.diffusion_clean_context
    flops = planning.model_train_flops_per_token(cfg, config.data.seq_len, two_stream=True)
    peak = config.hardware.peak_flops_per_device
    slots = config.data.batch_size * config.data.seq_len
    recs = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        assert r["hfu"] / r["mfu"] == pytest.approx(4 / 3)
        slots_per_sec = r["mfu"] * peak / flops
        # One step per logged line: real tokens / slots over the same seconds.
        assert r["tokens_per_sec"] / slots_per_sec == pytest.approx(r["real_tokens"] / slots,
                                                                    rel=1e-5)
        assert 0 < r["real_tokens"] <= slots


def test_two_stream_forward_flops_match_xla_cost_analysis():
    """XLA's count of a compiled two-stream forward ([noisy | clean] backbone, both concept
    heads, the noisy stream unembedded) against step_forward_flops_per_token (the old
    2 x forward_flops_per_token(2T) was 13% over at this shape)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from cbm_lm.model import ConceptBottleneckLM

    B, T2 = 2, 128
    cfg = ModelConfig(vocab_size=2048, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2,
                      mlp_dim=1024, max_seq_len=2 * T2, attention="block_causal",
                      objective="diffusion", diffusion_block_size=16, scan_layers=False,
                      concepts=ConceptConfig(n_known=512, known_topk=8, n_unknown=1024,
                                             unknown_rank=32, unknown_topk=8, block_size=512,
                                             dense_threshold=4096))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ConceptBottleneckLM(cfg, rngs=nnx.Rngs(0))))

    def fwd(s, t):
        m = nnx.merge(graphdef, s)
        pos = jnp.broadcast_to(jnp.arange(T2), (B, T2))
        seg = jnp.ones((B, T2), jnp.int32)
        stream = jnp.concatenate([jnp.zeros_like(seg), jnp.ones_like(seg)], 1)
        h = m.backbone(jnp.concatenate([t, t], 1), positions=jnp.concatenate([pos, pos], 1),
                       segment_ids=jnp.concatenate([seg, seg], 1), stream=stream)
        return m.logits_from(m.rewrite(h).composed[:, :T2])

    cost = jax.jit(fwd).lower(state, jax.ShapeDtypeStruct((B, T2), jnp.int32)).compile()
    cost = cost.cost_analysis()
    xla = float((cost[0] if isinstance(cost, list) else cost)["flops"])
    ours = B * T2 * planning.step_forward_flops_per_token(cfg, T2, two_stream=True)
    assert xla / ours == pytest.approx(1.0, abs=0.03)


def test_planned_step_time_counts_model_flops_of_the_data_tokens():
    """tools/plan.py's step time: the remat policy changes the hardware FLOPs (x4/3) but not
    the model FLOPs the assumed MFU is a ratio of, and a two-stream step is planned from its
    data tokens, so its model FLOPs per step are those the AOT report counts."""
    from cbm_lm.default_config import load_config_file
    from cbm_lm.train.memory_plan import step_time_plan

    cfg = load_config_file(str(pathlib.Path(__file__).parents[1] / "gin_configs/steerling_8b.py"))
    plans = {}
    for remat in ("none", "full"):
        cfg.model.remat = remat
        plans[remat] = step_time_plan(cfg, 64, "TPU v5p", 0.4)
    assert plans["none"].flops_per_step == plans["full"].flops_per_step
    assert plans["full"].hardware_flops_per_data_token == pytest.approx(
        plans["full"].model_flops_per_data_token * 4 / 3)
    p = plans["none"]
    assert p.model_len == 2 * cfg.data.seq_len                      # two-stream rows
    assert p.flops_per_step == pytest.approx(p.data_tokens_per_step * p.model_flops_per_data_token)
    # one unembedding per data token, not two: below 3 x the two-stream model tokens' forward
    assert p.flops_per_step < 3 * p.tokens_per_step * p.forward_flops_per_token
