"""Attribution: why a concept-bottleneck LM produced a token or a chunk.

Entry points (numpy in/out unless noted; Q explained tokens, L sequence length):

  decomposition.decompose_logits(model, out, b [N], t [N], y [N]) -> LogitDecomposition
      exact per-concept split of out.logits[b, t, y] (known [N,S_k], unknown [N,S_u],
      epsilon [N], logit [N]); the identity every other view rests on.
  integrated_gradients.integrated_gradients(model, LogitQuery(tokens [Q,L], read_pos [Q],
      targets [Q], ...steering), baseline="mask"|"pad"|"zero", n_steps) -> IGResult
      (attributions [Q,L], f_input [Q], f_baseline [Q]); jitted, batched, mesh-shardable.
  replay.replay_for(model, trace) -> ReplaySet: every generated token of a
      cbm_lm.inference GenerationTrace with the exact model call that committed it.
  input_attribution.input_attribution(model, trace, n_steps) -> InputAttribution
      (attributions [Q,L]; chunk_scores(b, start, end, scope) [L]; top_tokens(...)).
  concept_attribution.concept_attribution(model, trace) -> ConceptAttribution
      (per token [Q,S] ids/contributions, epsilon [Q], logit [Q]; verify(atol));
      commit_capture is the sampler's capture_fn that records it at commit time.
  chunk_aggregation.chunk_concepts(attr, b, start, end, labels) -> ChunkConcepts
      (Steerling's per-chunk normalization, epsilon share); concept_rows -> JSON rows.
"""
