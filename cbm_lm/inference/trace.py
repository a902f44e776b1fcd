"""GenerationTrace: what a generation committed, when, and what the model saw then.

Layout (numpy, on the host). B sequences, each right-padded to one length L:

  tokens         [B,L] int32   prompt (positions [0,P_b)), then the generated
                               tokens ([P_b, P_b+G_b)), then ``pad_id``
  prompt_lens    [B]   int32   P_b >= 1
  gen_lens       [B]   int32   G_b: generated tokens kept (< max_new_tokens
                               when a stop token ended the sequence early)
  committed_step [B,L] int32   for a generated position, the sampler step s
                               that committed it; -1 for prompt and padding
  window         [B]   int32   P_b + max_new_tokens: the positions the model
                               saw as one document (the rest is padding, in
                               another segment, invisible to attention)

Sampler steps are global and shared by the batch: step s ran one forward pass
over all B sequences. Diffusion commits one or more positions per step (the
most confident masked positions of the current block); autoregressive decoding
commits position P_b + s at step s.

Replay contract. ``snapshot(s)`` is the model input of step s:
  diffusion:      prompt, the tokens with committed_step < s, MASK at the other
                  positions of the window, pad_id after it;
  autoregressive: the same rule (positions >= P_b + s hold MASK, which causal
                  attention never lets the logit position see).
``model_inputs(batch_idx, steps)`` adds the segment ids and the steering the
sampler used at those steps, and ``logit_pos`` says where to read the logits:
the committed position itself for diffusion, the position before it for
autoregressive decoding. Then, for every generated (b, p) with s =
committed_step[b, p]:

  model(**model_inputs([b], [s])).logits[0, logit_pos[b, p]]
      == the logits of the pass that committed tokens[b, p]   (float rounding)

Under jax.jit, keep the Python scalars of model_inputs (inject_layer,
inject_alpha, drop_epsilon) static and pass the arrays as arguments.

With classifier-free guidance (cfg_scale > 0) the sampler combined this
conditional pass with an unconditional one (``unconditional=True``: prompt
masked); the replayed model pass is the conditional one.

Optional commit-time capture (``capture`` dict, None when not requested): the
concept decomposition of the committed token's logit taken from the very pass
that committed it (cbm_lm.attribution.decomposition), per position:
  logit [B,L], known_ids / known_contrib [B,L,S_k], unknown_ids /
  unknown_contrib [B,L,S_u], epsilon_contrib [B,L]   (zeros off generated positions)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cbm_lm.inference.steer_spec import Steering
from cbm_lm.inference.steered_call import diffusion_steered

OBJECTIVES = ("diffusion", "autoregressive")
GRIDS = ("steerling", "training")


@dataclasses.dataclass(frozen=True)
class GenerationTrace:
    tokens: np.ndarray
    prompt_lens: np.ndarray
    gen_lens: np.ndarray
    committed_step: np.ndarray
    objective: str
    mask_id: int
    pad_id: int
    max_new_tokens: int
    num_steps: int
    block_size: int = 1            # diffusion unmasking block (1 for autoregressive)
    grid: str = "steerling"        # diffusion block grid, see diffusion_sampler.py
    steps_per_block: int = 1
    cfg_scale: float = 0.0
    diffusion_shift: bool = False  # the model's model.diffusion_shift (where steering lands)
    steering: Steering = dataclasses.field(default_factory=Steering)
    capture: dict | None = None

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        b, length = self.tokens.shape
        for name in ("prompt_lens", "gen_lens"):
            if getattr(self, name).shape != (b,):
                raise ValueError(f"{name} must have shape [{b}], got {getattr(self, name).shape}")
        if self.committed_step.shape != (b, length):
            raise ValueError(f"committed_step must have shape {(b, length)}")
        if (self.prompt_lens < 1).any() or (self.window > length).any():
            raise ValueError("every prompt needs >= 1 token and prompt + max_new_tokens <= L")

    # -- geometry -------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def length(self) -> int:
        return self.tokens.shape[1]

    @property
    def window(self) -> np.ndarray:
        """[B] end of each sequence's document: P_b + max_new_tokens."""
        return self.prompt_lens + self.max_new_tokens

    def generated_mask(self) -> np.ndarray:
        """[B,L] bool: positions holding a generated token."""
        return self.committed_step >= 0

    def segment_ids(self) -> np.ndarray:
        """[B,L] int32: 1 inside the window, 0 on padding (attention keeps them apart)."""
        pos = np.arange(self.length)[None, :]
        return (pos < self.window[:, None]).astype(np.int32)

    @property
    def logit_pos(self) -> np.ndarray:
        """[B,L] int32: the position whose logits committed each generated token, else -1."""
        shift = 0 if self.objective == "diffusion" else 1
        pos = np.arange(self.length, dtype=np.int32)[None, :] - shift
        return np.where(self.generated_mask(), pos, -1).astype(np.int32)

    def generated(self, b: int) -> np.ndarray:
        """The generated token ids of sequence b [G_b]."""
        p = int(self.prompt_lens[b])
        return self.tokens[b, p: p + int(self.gen_lens[b])]

    def prompt(self, b: int) -> np.ndarray:
        return self.tokens[b, : int(self.prompt_lens[b])]

    # -- replay ---------------------------------------------------------------------
    def snapshot(self, step, batch_idx=None, *, unconditional: bool = False) -> np.ndarray:
        """Model input tokens at sampler ``step`` (int or [N]) for rows ``batch_idx`` [N].

        batch_idx None = all B rows. unconditional: the classifier-free-guidance
        copy, whose prompt is MASK too.
        """
        batch_idx = np.arange(self.batch_size) if batch_idx is None else np.asarray(batch_idx)
        step = np.broadcast_to(np.asarray(step), batch_idx.shape)
        cs = self.committed_step[batch_idx]
        pos = np.arange(self.length)[None, :]
        prompt_lens = self.prompt_lens[batch_idx][:, None]
        in_prompt = pos < prompt_lens
        revealed = (cs >= 0) & (cs < step[:, None])
        in_window = pos < self.window[batch_idx][:, None]
        x = np.where(in_window, self.mask_id, self.pad_id)
        x = np.where(revealed | (in_prompt & (not unconditional)), self.tokens[batch_idx], x)
        return x.astype(np.int32)

    def committed_before(self, step, batch_idx=None) -> np.ndarray:
        """[N] how many tokens of each row were committed before ``step``."""
        batch_idx = np.arange(self.batch_size) if batch_idx is None else np.asarray(batch_idx)
        step = np.broadcast_to(np.asarray(step), batch_idx.shape)
        cs = self.committed_step[batch_idx]
        return ((cs >= 0) & (cs < step[:, None])).sum(-1).astype(np.int32)

    def model_inputs(self, batch_idx, step, *, unconditional: bool = False) -> dict:
        """Keyword arguments of ConceptBottleneckLM.__call__ reproducing step ``step`` [N]
        for rows ``batch_idx`` [N]: tokens, segment_ids, and the steering (numpy arrays)."""
        batch_idx = np.atleast_1d(np.asarray(batch_idx))
        step = np.broadcast_to(np.asarray(step), batch_idx.shape)
        tokens = self.snapshot(step, batch_idx, unconditional=unconditional)
        kw = dict(tokens=tokens, segment_ids=self.segment_ids()[batch_idx])
        st = self.steering
        if st.intervention is not None:
            kw.update(st.intervention.model_kwargs(batch_idx, self.length))
        if st.injection is not None:
            inj = st.injection
            if self.objective == "diffusion":
                alpha = inj.alpha_for(self.committed_before(step, batch_idx))
                steered = diffusion_steered(tokens, kw["segment_ids"], self.mask_id,
                                            self.diffusion_shift)
            else:
                # position P-1+j was the query of decoding step j (see steer_spec.py)
                j = np.arange(self.length)[None, :] - (self.prompt_lens[batch_idx][:, None] - 1)
                alpha = np.where(j >= 0, inj.alpha_for(j), 0.0)
                steered = (j >= 0) & (j <= step[:, None])
            kw.update(injection=inj.field(steered, alpha), inject_layer=inj.layer,
                      inject_alpha=1.0)
        return kw

    def commit_groups(self, b: int) -> list[tuple[int, np.ndarray]]:
        """[(step, positions committed at that step)] for sequence b, in step order."""
        cs = self.committed_step[b]
        steps = np.unique(cs[cs >= 0])
        return [(int(s), np.flatnonzero(cs == s)) for s in steps]
