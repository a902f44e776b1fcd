"""cbm_lm's jitted forward against Steerling's PyTorch forward, same weights, same batch.

A random Steerling InterpretableCausalDiffusionLM at the benchmark shape
(benchmarks/configs.py: d 512, 4 layers, vocab 8192, Steerling's concept
proportions) is saved as a Steerling checkpoint, imported with
cbm_lm.interop.import_steerling, and both forwards run on the same ids in
fp32, interleaved round by round so machine noise hits both alike.
``steerling_forward_speedup`` = cbm_lm tokens/s over Steerling tokens/s, each from
its least-disturbed forward (the minimum over rounds: on this shared machine other
work only adds time); the ratio of medians is reported beside it. Threads: torch
uses torch.get_num_threads() (all cores), XLA's CPU client one thread per core.

Both forwards do the same matmuls, F = planning.forward_flops_per_token x tokens
(93 GFLOP at the benchmark shape), so with P this machine's fp32 matmul peak
(a 1024^3 jitted matmul, best of 5 in every round) each side's forward MFU is
F / time / P, and

  speedup_ceiling = Steerling's forward time / (F / P)

is the speedup cbm_lm's forward would have if every matmul ran at the peak and
nothing else took time: no fp32 forward of this model can beat it.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import numpy as np


def _steerling_model(vocab: int, d: int, layers: int, seq_len: int, seed: int = 0):
    import torch
    from steerling.configs.causal_diffusion import CausalDiffusionConfig
    from steerling.configs.concept import ConceptConfig
    from steerling.models.interpretable import InterpretableCausalDiffusionLM

    cfg = CausalDiffusionConfig(n_layers=layers, n_head=8, n_embd=d, n_kv_heads=4,
                                block_size=seq_len, diff_block_size=64, intermediate_size=4 * d)
    ccfg = ConceptConfig(n_concepts=round(0.34 * vocab), n_unknown_concepts=vocab, concept_dim=d,
                         topk_known=32, topk_known_features=32, factorize_rank=max(16, d // 16),
                         unknown_topk=128, block_size=vocab, pad_multiple=16)
    torch.manual_seed(seed)
    model = InterpretableCausalDiffusionLM(cfg, ccfg, vocab_size=vocab).eval()
    return model, cfg, ccfg


def _save(model, cfg, ccfg, vocab: int, path: str) -> None:
    import safetensors.numpy
    arch = cfg.model_dump()
    arch.pop("model_type")
    raw = {**arch, "interpretable": True, "vocab_size": vocab, "concept": ccfg.model_dump()}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f)
    state = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
    safetensors.numpy.save_file(state, os.path.join(path, "model.safetensors"))


def measure_steerling_forward(batch_size: int = 8, seq_len: int = 256, vocab: int = 8192,
                              d: int = 512, layers: int = 4, rounds: int = 5) -> dict:
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from cbm_lm.interop import import_steerling
    from cbm_lm.train.metrics import measured_matmul_flops
    from cbm_lm.train.planning import forward_flops_per_token

    ref, cfg, ccfg = _steerling_model(vocab, d, layers, seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        _save(ref, cfg, ccfg, vocab, tmp)
        ours, _ = import_steerling(tmp)
    ids = np.random.default_rng(0).integers(0, vocab - 1, size=(batch_size, seq_len))
    ids_t, ids_j = torch.from_numpy(ids).long(), jnp.asarray(ids, jnp.int32)

    @nnx.jit
    def fwd(model, x):
        return model(x).logits

    def run_ours():
        fwd(ours, ids_j).block_until_ready()

    def run_ref():
        with torch.no_grad():
            ref(ids_t)

    run_ours(), run_ref()                        # compile / warm up
    ours_s, ref_s, peak = [], [], 0.0
    for _ in range(rounds):
        for fn, out in ((run_ours, ours_s), (run_ref, ref_s)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        peak = max(peak, measured_matmul_flops())
    tokens = batch_size * seq_len
    o, r = min(ours_s), min(ref_s)
    flops = forward_flops_per_token(ours.config, seq_len) * tokens
    return {"steerling_forward_speedup": r / o,
            "median_speedup": statistics.median(ref_s) / statistics.median(ours_s),
            "cbm_forward_tokens_per_sec": tokens / o,
            "steerling_forward_tokens_per_sec": tokens / r, "torch_threads": torch.get_num_threads(),
            "forward_flops": flops, "cpu_peak_matmul_flops": peak,
            "cbm_forward_mfu": flops / o / peak, "steerling_forward_mfu": flops / r / peak,
            "speedup_ceiling": r / (flops / peak)}
