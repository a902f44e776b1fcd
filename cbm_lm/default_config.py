"""The full default config tree that every gin_configs/<scale>.py starts from.

Each scale file calls ``base_config()`` and overrides what differs, so every
field exists everywhere and ``--config.section.field=value`` works for all of
them. Typed views live in cbm_lm/config.py.
"""

from __future__ import annotations

import ml_collections

# Logical axis -> mesh axes (DESIGN.md section 5). Parameters shard their
# embed axis over fsdp and their wide axes (heads, mlp, vocab, concepts) over
# tensor; activations shard batch over (data, fsdp).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("known_concepts", "tensor"),
    ("unknown_concepts", "tensor"),
    ("rank", None),
    ("keys", None),
    ("activation_embed", None),
    ("norm", None),
    ("layers", None),          # the stacked blocks' leading [L] axis (backbone.py): never sharded
)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Every scale but tiny is a Steerling-shaped block-causal diffusion model; switching
    # one to objective=autoregressive must also set attention=causal (validate_config, in
    # config_validation.py, refuses the pair that would show each token its own target).
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2,
        head_dim=ml_collections.FieldReference(None, field_type=int),
        mlp_dim=512, norm_order="pre", norm_eps=1e-5, qk_norm=True,
        qkv_clip=ml_collections.FieldReference(None, field_type=float),
        rope_base=500000.0, use_rope=True, tie_embeddings=True, max_seq_len=256, attention="block_causal",
        diffusion_block_size=16, objective="diffusion",
        # Dream-style shift: masked token i is predicted from position i-1 (model/lm.py), so
        # next-token (AR) weights carry over to diffusion; False is Steerling's layout.
        diffusion_shift=False,
        mask_token_id=ml_collections.FieldReference(None, field_type=int),
        dtype="float32", param_dtype="float32", init_std=0.02, remat="none",
        scan_layers=True,
    ))
    c.model.concepts = ml_collections.ConfigDict(dict(
        n_known=64, known_topk=8,
        known_report_topk=ml_collections.FieldReference(None, field_type=int),
        n_unknown=128, unknown_rank=16,
        unknown_topk=ml_collections.FieldReference(16, field_type=int),
        unknown_report_topk=ml_collections.FieldReference(None, field_type=int),
        pad_multiple=16, block_size=4096, dense_threshold=8192,
        epsilon_correction=True, logit_clip=15.0,
        # Steerling's values with a gradient past the clip (model/concepts.py cap_logits);
        # imported Steerling checkpoints use "hard".
        clip_mode="straight_through",
        scoring="gather",       # gather | blockwise (no [N,k,D] row gathers; TPU/GPU scale)
        kernels="auto",         # auto (compiled kernels on CPU, model/cpu_kernels.py) | xla
    ))

    c.mesh = ml_collections.ConfigDict(dict(
        data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
    c.rules = [list(r) for r in DEFAULT_RULES]

    c.data = ml_collections.ConfigDict(dict(
        dir="",                 # corpus written by tools/build_corpus.py
        split="train",
        eval_split="heldout",
        batch_size=8,           # global batch, in sequences
        seq_len=256,
        shuffle_seed=0,
        worker_count=0,
        max_chunk_concepts=8,   # K: concept ids per chunk, -1 padded
        mixture=ml_collections.ConfigDict(),  # source name -> weight; empty = natural
        # natural | windows: each source's token share as one window of window_tokens
        # (0: seq_len) per document would give it (cbm_lm/data/source_weighting.py); not
        # with an explicit mixture
        source_weighting="natural",
        window_tokens=0,
        process_split="documents",  # documents | rows (see cbm_lm/train/data_feed.py)
        known_concepts_from_corpus=False,  # size model.concepts.n_known to the corpus's concepts
        packing_bins=0,         # first-fit packing bins; 0 = max(per-process batch, 8)
    ))

    c.train = ml_collections.ConfigDict(dict(
        num_steps=200,
        log_every=10,
        eval_every=100,
        eval_batches=4,
        grad_accum_steps=1,     # micro-batches per step (scan); batch_size must divide
        nan_policy="stop",      # stop | skip: a non-finite loss stops the run or skips the update
        max_skipped_steps=10,   # with nan_policy=skip, stop after this many
        # after the last step: the known keys refit to the final states (train/key_refit.py)
        key_refit_steps=0,      # keys-only AdamW steps; 0 = no refit
        key_refit_batches=250,  # training batches whose states they fit
        key_refit_lr=3e-2,
        key_refit_balance="loss",  # the refit's positive term: "loss" (loss.concept_balance),
                                   # "none" or "concept" (each labelled concept weighed equally)
    ))
    c.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=3e-3, warmup_steps=20, min_lr_ratio=0.1, weight_decay=0.1,
        b1=0.9, b2=0.95, eps=1e-8, grad_clip=1.0,
        known_keys_lr_scale=1.0,   # the known head's key rows: lr x this (train/optimizer.py)
    ))
    # ... and their weight decay: optimizer.weight_decay until set (a derived reference, as
    # loss.schedule_steps below)
    c.optimizer.known_keys_weight_decay = c.optimizer.get_ref("weight_decay") + 0.0
    c.loss = ml_collections.ConfigDict(dict(
        lm_weight=1.0,
        concept_weight=1.0,
        concept_pos_weight=1.0,
        concept_neg_weight=1.0,
        concept_negatives=64,           # sampled negative concepts per batch
        concept_positives="soft_or",    # chunk label: soft-OR over its tokens | "token":
                                        # every labelled token scored -log sigmoid(z)
        concept_balance="none",         # positive term: mean over pairs | "concept": mean
                                        # over the batch's labelled concepts of their means
        concept_pooled_weight=0.0,      # + BCE of each chunk's mean logit vs its labels
        reconstruction_weight=1.0,
        reconstruction_target="predicted",  # sg(h - k_pred) | "labels": sg(h - k_gt) (report)
        independence_weight=0.1,
        epsilon_weight=0.0,             # residual energy ||h - k - u||^2 / ||h||^2 at the LM's
                                        # positions, gradient into the backbone (0 = off;
                                        # eval logs it at any weight)
        independence_normalization="population",  # ||Cov||^2/D^2 | "report": /(D^2 (n-1))
        diffusion_t_min=1e-3,
        diffusion_t_max=1.0,            # training only; eval scores uniform t in [t_min, 1]
        diffusion_noise="uniform",      # per-block t: uniform | gaussian (moving curriculum)
        diffusion_noise_center_start=0.2,   # gaussian: centre moves start -> end over training
        diffusion_noise_center_end=0.8,
        diffusion_noise_sigma=0.3,
        diffusion_weighting="elbo",     # masked CE weighted 1/t (ELBO) | uniform
        diffusion_clean_context=True,   # two-stream [noisy | clean] diffusion training
        context_window=0,               # >0: attention confined to windows of this many
        context_window_until=0.25,      # positions for this fraction of training (curriculum)
        # P(drop epsilon) per sequence; the report's 0.1 (0.5 until measured: docs/fidelity.md
        # "Fidelity: epsilon dropout 0.1 and the backbone baseline")
        epsilon_dropout=0.1,
        cfg_dropout=0.0,                # P(feed no known features) per sequence (report: 0.1)
        teacher_forcing="soft",         # soft: pred + alpha (k_gt - pred) | hard: k_gt w.p. alpha
        teacher_forcing_schedule="linear",  # linear (start/end/steps) | report (hold-cosine-0.5)
        teacher_forcing_start=1.0,      # alpha(step): linear from start to end
        teacher_forcing_end=0.0,
        teacher_forcing_steps=100,
        # optional steering training (objectives/steering_loss.py); 0 = off
        steering_weight=0.0,
        steering_period=10,     # every this many steps
        steering_target=8.0,    # injection strength, logit units
        steering_layer=-1,      # inject from this layer on; -1 = n_layers // 2
        ce_chunk_tokens=0,              # >0: LM cross-entropy this many positions at a time,
                                        # never [B,T,V] whole (objectives/chunked_ce.py)
        unknown_teacher_forcing=False,  # unknown slot -> h - k_gt in epsilon-dropped sequences
        unknown_teacher_forcing_hold=0.25,   # beta = 1 up to this fraction of training,
        unknown_teacher_forcing_until=1.0,   # linear to floor by this fraction
        unknown_teacher_forcing_floor=0.0,
        # AR-to-diffusion adaptation (diffusion models; train/losses.py): next-token training
        # with causal attention for this fraction of training, then masked diffusion ...
        ar_warmup_fraction=0.0,
        # ... whose attention mask widens from causal to block-causal over this fraction
        mask_anneal_fraction=0.0,
    ))
    # Length of the fractional schedules (report teacher forcing, noise curriculum, AR
    # warmup): follows train.num_steps until set. "+ 0" makes it a derived reference: setting
    # it replaces the link, where the shared reference itself (get_ref alone) would carry
    # --config.loss.schedule_steps=N into train.num_steps and shorten the run.
    c.loss.schedule_steps = c.train.get_ref("num_steps") + 0
    c.checkpoint = ml_collections.ConfigDict(dict(
        every_steps=50,
        keep=3,
        async_save=True,
    ))
    # Chunk provenance (DESIGN.md section 7; typed view: config.ProvenanceConfig).
    c.provenance = ml_collections.ConfigDict(dict(
        d_p=256,                 # key dimension (logical axis `keys`)
        head="fixed",            # fixed (seeded projection) | learned (contrastive head)
        seed=0,                  # seed of the fixed projections
        # key = sum of the normalized parts (model/provenance.py), pooled with pool_weights
        known_weight=0.2, unknown_weight=0.2, hidden_weight=0.2, lexical_weight=1.0,
        pool_weights="surprisal",  # surprisal (the model's -log p per token) | uniform
        # lexical part: words (whole lowercased words, from the tokenizer's vocabulary; keys
        # re-keyed and queried with the corpus tokenizer) | tokens (tokens + bigrams; what the
        # train step logs, as it has no tokenizer)
        lexical="words",
        # the per-word / per-bigram vectors of the lexical part, drawn from a hash: signs
        # (+-1/sqrt(d_p) from the hash's random bits, 32 per threefry word) | gaussian (one
        # threefry word per entry). Both are Johnson-Lindenstrauss sketches; at d_p 1024 the
        # gaussian draw cost 77 ms per tiny train step (8 x 256 tokens), signs 3.5 ms
        hashed_vectors="signs",
        max_chunks_per_row=64,   # chunk slots per packed row; extra chunks get no key
        # learned head's InfoNCE weight (> 0 needs head="learned"; objectives/key_contrastive.py)
        contrastive_weight=0.0,
        contrastive_temperature=0.05,
        token_dropout=0.15,      # token-dropout views (AR): fraction of a view's tokens dropped
        log_keys=False,          # training-time key logging to WORKDIR/provenance/keys
        max_sources=64,          # rows of the concept x source mass (source ids must fit)
        exact_max_keys=262144,   # faiss: exact inner product up to this many keys, IVF-PQ above
        ivf_nlist=0,             # IVF lists; 0 = sqrt(N)
        pq_m=16,                 # PQ sub-quantizers (must divide d_p)
        nprobe=16,
        rekey_batch_size=32,     # rows per re-keying batch
        rekey_context="chunk",   # chunk: each chunk keyed alone (as queries are) | document
        # key width of the re-keyed index (0: d_p). The fixed head's tables are seeded, so the
        # one-off re-keying pass (and queries against its index) can key wider than the train
        # step logs, where the per-token [B,T,d_p] work costs every step
        rekey_d_p=0,
    ))
    c.hardware = ml_collections.ConfigDict(dict(
        peak_flops_per_device=0.0,  # for MFU; 0 = look up from the device kind
    ))
    return c


def load_config_file(path) -> ml_collections.ConfigDict:
    """Runs a gin_configs/<scale>.py file and returns its ``get_config()``.

    The same thing ``config_flags.DEFINE_config_file`` does for the CLIs, for
    code that is not an absl binary (tests, benchmarks, notebooks).
    """
    import importlib.util
    import pathlib

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file (expected gin_configs/<scale>.py)")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"{path}: defines no get_config()")
    return module.get_config()
