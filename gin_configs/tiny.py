"""Tiny: 2 layers, d=128, autoregressive. Trains on 2 CPU cores in minutes (make demo).

Why autoregressive: measured on the embedded demo corpus (unigram entropy
6.71 nats/token), 1000 steps of batch 8 x 256 on 2 CPU cores bring the
causal tiny model's held-out loss to 5.47 nats/token, while plain masked
diffusion still sits at its unigram plateau (held-out masked CE 6.69): a
diffusion model must learn to read its context through attention before it
beats unigram statistics. gin_configs/tiny_diffusion.py gets there in
1200 steps by starting from next-token training (AR-to-diffusion
adaptation: held-out masked CE 5.92 with the shipped concept terms, 5.86 with
soft-OR positives), at about 1.5x this config's step cost.
The concept layer, losses and attribution are the same for both objectives.

Concept positives per token at weight 0.2 (docs/fidelity.md "Fidelity: what the eval
measures and what bounds it"): measured by the attribution-eval binary after 1200 steps
against the soft-OR at weight 1: held-out macro concept AUROC 0.798 -> 0.837, dead labelled concepts 54% -> 29%, epsilon
share 0.142 -> 0.095, known share 0.37 -> 0.51, perplexity 279 -> 317. Under the
soft-OR the chunk-level concepts (genre, play, topic, section) sat at z ~ -4 at
every token and never entered the top-8. tiny_diffusion.py inherits both fields.

On the split demo corpus (lexfile:* chunk labels on WordNet gloss documents,
supersense:* token labels from the lexicon; 198 concepts) the known head keeps the
top-16 (issue 13; docs/fidelity.md "Fidelity: trained top-k"). Measured by the attribution-eval
binary after 1200 steps, top-8 (make demo's run) -> top-16 (a run trained with it):
dead labelled concepts 0.429 -> 0.170 (48 -> 19 of 112), chunk AUROC 0.806 -> 0.839
over 62 concepts, perplexity 335.6 -> 310.5, epsilon share 0.093 -> 0.096, known share
0.516 -> 0.577, token-level supersense AUROC 0.646 -> 0.646, steering 1/6 -> 0/6.
loss.concept_balance=concept (each labelled concept of the batch weighed equally) was
measured on top of it and left off: dead 0.304, AUROC 0.841, perplexity 279.8.

Epsilon dropout 0.1 (the report's value, now the default; it was 0.5), measured the same
way against a run of the same recipe without the concept layer's losses
(benchmarks/fidelity.py no_concept_layer, perplexity 228.1): perplexity 331.1 -> 246.8
(ratio to the backbone 1.45 -> 1.08), chunk AUROC 0.820 -> 0.857, dead labelled concepts
0.170 -> 0.054, epsilon share 0.076 -> 0.144, steering 1/6 both. Dropping epsilon in half
the sequences made the backbone's state answer to the top-16 known + top-16 unknown rewrite
alone in those sequences; at 0.1 the LM keeps most of its capacity and the concept terms
still train the rewrite. docs/fidelity.md "Fidelity: epsilon dropout".

Residual energy at weight 0.1 (loss.epsilon_weight: ||h - k - u||^2 / ||h||^2 at the
next-token positions, gradient into the backbone), measured the same way on 2026-12-05
against this recipe without it: epsilon share 0.144 -> 0.104, chunk AUROC 0.857 -> 0.869,
perplexity 246.8 -> 247.3 (1.08 x the backbone), dead labelled concepts 0.054 -> 0.080,
steering 1/6 both; at 0.3: 0.085, 0.850, 242.3, 0.089. tiny_diffusion.py sets 0.3.
docs/fidelity.md "Fidelity: the diffusion objective".
"""

from cbm_lm.default_config import base_config


def get_config():
    c = base_config()
    c.model.vocab_size = 4096
    c.model.d_model = 128
    c.model.n_layers = 2
    c.model.n_heads = 4
    c.model.n_kv_heads = 2
    c.model.mlp_dim = 512
    # 512-token rows (see data.seq_len below); the two blocks unrolled: at 2 layers the scan
    # saves no compile time, and its zero-filled per-layer residual stacks cost the step
    # about 11% (185 vs 208 ms at 8 x 256 on 2 cores, same parameters and math)
    c.model.max_seq_len = 512
    c.model.scan_layers = False
    c.model.objective = "autoregressive"
    c.model.attention = "causal"
    c.model.concepts.n_known = 256          # upper bound; resized to the corpus below
    c.model.concepts.known_topk = 16         # top-8: 48 of 112 labelled concepts dead
    c.model.concepts.n_unknown = 512
    c.model.concepts.unknown_rank = 16
    c.model.concepts.unknown_topk = 16
    c.model.concepts.block_size = 128
    # Every known slot a real concept of the corpus (no padding slot is ever dead).
    c.data.known_concepts_from_corpus = True
    c.loss.concept_positives = "token"
    c.loss.concept_weight = 0.2
    c.loss.epsilon_weight = 0.1
    # 256 sampled negative concepts per batch, not 64 (measured 2026-12-05 at 1800 steps,
    # benchmarks/fidelity.py --variants negatives_256,negatives_512, against the same
    # backbone): chunk AUROC 0.887 -> 0.896 (512: 0.895), epsilon share 0.104 -> 0.087,
    # perplexity 1.099 -> 1.083 x the backbone (512: 1.121), dead real concepts 0.018 ->
    # 0.054. The step costs +4.7% (side by side, without the batch AUROC metric, which the
    # train step no longer computes: that alone was 14%).
    c.loss.concept_negatives = 256
    # The chunk labels also scored on each chunk's mean logit, with h held fixed for that
    # term (it trains the known head's keys toward the read-out a probe on the chunk's mean h
    # fits: at 4 x 512 rows such a probe read 0.957 where the head read 0.937). Measured
    # 2026-12-05 at 1800 steps (benchmarks/fidelity.py --variants no_concept_layer,pooled_1,
    # against the same 512-row backbone): chunk AUROC 0.930 -> 0.934 (mean-pooled 0.937 ->
    # 0.939), perplexity 1.098 -> 1.047 x the backbone, dead real concepts 0.054 -> 0.036,
    # epsilon share 0.106 -> 0.109, steering 1/6 -> 0/6 (make demo: the same, in 10m56s).
    # With the term's gradient into the backbone as well, the held-out LM loss was 0.17 nats
    # worse by step 900 (stopped there).
    c.loss.concept_pooled_weight = 1.0
    # Rows of 512 tokens, 4 per batch (the same 2048 tokens per step as 8 x 256; measured
    # 2026-12-05 at 1800 steps, benchmarks/fidelity.py --variants no_concept_layer,seq_512,
    # each against the backbone trained on the same rows): held-out chunk AUROC 0.916 ->
    # 0.929 (mean-pooled 0.933 -> 0.935; lexfile 0.90 -> 0.92), perplexity 1.086 -> 1.070 x
    # the backbone, epsilon share 0.093 -> 0.108, dead real concepts 0.063 -> 0.089,
    # steering 1/6 -> 2/6. The eval reads windows of the model's own context, so a chunk
    # up to 512 tokens into a document is scored with the document before it in view (the
    # same model on 256-token windows: 0.914). make demo on this config (blocks unrolled):
    # AUROC 0.930 (mean-pooled 0.937), epsilon 0.106, dead 0.054, perplexity 189.5 (1.098 x
    # the 512-row backbone: the same recipe's two runs read 1.070 and 1.098), steering 1/6,
    # in 10m24s on 2 cores (9m25s at 8 x 256).
    c.data.seq_len = 512
    c.data.batch_size = 4
    # Sources weighted by one 640-token window per document, not by tokens (measured
    # 2026-12-05 at 1800 steps, each against a backbone trained on the same data without
    # any concept-layer term): the demo corpus's plays are 48% of the tokens in 11% of the
    # documents; at 640 tokens per document Shakespeare / WordNet / fortunes / pydoc get
    # .20 / .35 / .30 / .15 of the steps. Chunk AUROC 0.896 -> 0.916 (lexfile 0.86 -> 0.90),
    # perplexity 1.122 -> 1.086 x the backbone, epsilon share 0.087 -> 0.093, dead real
    # concepts 0.054 -> 0.063, steering 1/6 -> 3/6 (1/6 under the corrected steering
    # read-out; docs/fidelity.md "Fidelity: a fair backbone baseline"; a window of 256
    # tokens: AUROC 0.915 but perplexity 1.172).
    c.data.source_weighting = "windows"
    c.data.window_tokens = 640
    # 1800 steps, not 1200 (measured 2026-12-05, benchmarks/fidelity.py --steps 1800, each
    # against the same backbone without the concept layer trained as long): chunk AUROC
    # 0.869 -> 0.887 (mean-pooled 0.915 -> 0.928), dead real concepts 0.080 -> 0.018,
    # token-level AUROC 0.709, epsilon share 0.104 -> 0.104, perplexity 207.7 against the
    # backbone's 189.0 (1.099 x; 1.08 x at 1200).
    c.train.num_steps = 1800
    # After the last step the known keys are refit to the final backbone's states, and the
    # unknown head to the residual the new keys leave (train/key_refit.py): 3600 keys-only
    # AdamW steps at 3e-2 over the states of 500 more training batches (2000 rows). During
    # training each key chases a moving h at the shared rate and decay (3e-3, 0.1). Measured
    # 2026-12-05 by the attribution-eval binary on the same 1800-step run without and with
    # the refit: held-out chunk AUROC 0.934 -> 0.952 (mean-pooled 0.939 -> 0.950), epsilon
    # share 0.109 -> 0.113, dead real concepts 0.036 -> 0.009, perplexity unchanged (the LM
    # reads h, which the refit does not touch; make demo: 180.69 before and after), steering
    # 0/6 -> 1/6. 1800 steps over 250
    # batches: 0.948; the keys alone (unknown head not refit): AUROC 0.948 but epsilon 0.173;
    # rate 0.1: 0.948, epsilon 0.191. A 10x / 3x rate for the keys during training instead
    # (optimizer.known_keys_lr_scale): LM 0.2 / 0.14 nats worse, perplexity 1.19 x at 3x.
    # make demo with it (before key_refit_balance, with the independence term's covariance
    # form; 11m45s on 2 cores: training 8m42s, the refit 63 s of it):
    # AUROC 0.953 (mean-pooled 0.951), epsilon 0.111, dead 2 of 112, perplexity 180.7
    # (1.047 x the backbone), steering 0/6, decomposition error 6.9e-06.
    c.train.key_refit_steps = 3600
    c.train.key_refit_batches = 500
    # The refit's positive term weighs each labelled concept of the batch equally
    # (train.key_refit_balance: the eval's AUROC is a macro mean over concepts; through
    # training, loss.concept_balance=concept gained nothing, above). Measured 2026-12-05 on
    # two 1800-step trajectories of this recipe (the independence term's covariance and
    # rank-space forms, which round differently), each resumed from step 1500 and refit
    # both ways: held-out chunk AUROC 0.9532 -> 0.9577 and 0.9492 -> 0.9513, epsilon share
    # 0.111 -> 0.131 and 0.102 -> 0.124, dead real concepts 2 -> 4 and 0 -> 2 of 112,
    # perplexity unchanged (the refit does not touch h). At rate 0.1 as well: 0.9571 /
    # 0.9480, epsilon 0.166 / 0.178 (not taken). make demo on this config (the rank-space
    # independence term; 11m46s on 2 cores): AUROC 0.951 (mean-pooled 0.941), epsilon
    # 0.124, dead 2 of 112, perplexity 179.0 (1.037 x the backbone), steering 1/6,
    # decomposition error 6.5e-06.
    c.train.key_refit_balance = "concept"
    c.train.log_every = 50
    c.train.eval_every = 300
    c.checkpoint.every_steps = 300
    # Provenance keys of 1024 dims (the default is 256). The make-demo checkpoint re-keyed at
    # d_p 256 / 512 / 1024 / 2048 (gaussian word vectors): paraphrased planted-fact Recall@10
    # 0.978 / 0.993 / 1.000 / 1.000 (BM25 1.000), so the misses at 256 were the sketch's noise.
    # With the random-sign word vectors (provenance.hashed_vectors, measured 2026-12-04):
    # 1024 -> R@10 0.996 (one of 275 at rank 11; first paraphrases 1.000), key logging +2.4%
    # per step; 2048 -> R@10 1.000, logging +14.4% (per-token [B,T,d_p] work). The demo's exact
    # index holds 4 KiB per chunk (README "Training-data provenance").
    c.provenance.d_p = 1024
    # The re-keyed index (what queries and the eval binary use) keys at 2048: re-keying is one
    # pass, so the wider sketch costs the step nothing. The make-demo checkpoint of
    # 2026-12-04: paraphrased R@10 1.000 at 2048 against 0.996 at 1024 (BM25 1.000).
    c.provenance.rekey_d_p = 2048
    # Chunk slots per row: the demo corpus packs 4.1 chunks into a 256-token row on average,
    # at most 11 (2408 training rows; chunks are up to 64 tokens), so the default 64 slots
    # were 15x the work the keys need: the key head takes 3.9 ms per step at 16 against
    # 8.3 ms at 64, and key logging costs the step +5.5% against +8.9% side by side
    # (benchmarks/provenance.py --compare max_chunks_per_row=64). A row with more chunks
    # keys its first M and the key logger warns with the count of the rest. With 512-token
    # rows (twice the chunks per row, half the rows) 32 slots keep the same [B M] work.
    c.provenance.max_chunks_per_row = 32
    return c
