"""Per-device memory and step-time plan of a training config (no allocation).

Everything here is arithmetic on abstract shapes, so a 256-chip plan runs on a
laptop. Quantities are bytes *per device* unless a name says ``global``.

Mesh. ``plan_mesh`` resolves config.mesh for a device count exactly as
``make_mesh`` does (ICI sizes, one -1 filled, times the dcn_* multipliers);
the result can be turned into a ``jax.sharding.AbstractMesh``.

Train state. ``state_bytes`` builds the trainer's own abstract TrainState
(``abstract_train_state``) and its shardings (``train_state_shardings`` with
the config's logical rules) on the abstract mesh, and sums each array's shard
size: for a dim of size n sharded over mesh axes of total size s the shard
holds ceil(n / s) entries (XLA pads uneven dims), so e.g. an embedding
[V, D] with logical axes (vocab, embed) -> (tensor, fsdp) holds
ceil(V/tensor) * ceil(D/fsdp) * 4 bytes in fp32. The optimizer is the
trainer's AdamW: mu and nu mirror the params in fp32 (plus a few scalar
counts), so it is 2x the fp32 parameter bytes.

Activations (``activation_estimate``). An analytic estimate of what the
backward pass needs live at its peak, for one micro-batch of
B = data.batch_size / train.grad_accum_steps / (batch shards) sequences per
device (batch shards = product of the mesh axes the "batch" rule names,
data x fsdp by default) and a model length T = data.seq_len, doubled for
two-stream diffusion training (loss.diffusion_clean_context: the model reads
[noisy | clean]). a = bytes of model.dtype. Each dim is divided by the mesh
axes its logical rule names: H by "heads", G by "kv_heads", F by "mlp", V by
"vocab"; the residual [B,T,D] uses "activation_embed" (replicated by default).

  per block, remat=none (everything the backward reads is kept):
      4 [B,T,D] a            block input, attention output, mid residual, MLP output
      [B,T,H+2G,hd] a        q, k, v projections
      [B,T,H+2G,hd] fp32     q, k, v after clip/QK-norm/RoPE, as the fp32 attention reads them
      [B,T,H,hd] a           attention mix before o_proj
      3 [B,T,F] a            gate, up, silu(gate)*up
      2 [B,H,T,T] fp32       attention scores and softmax probabilities (+ [B,T,T] bool mask)
  per block, remat=block (jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
      the policy cbm_lm/model/backbone.py uses): the block input and the outputs
      of the weight matmuls, 3 [B,T,D] a + [B,T,H+2G,hd] a + 2 [B,T,F] a; the
      attention scores/probabilities (batched dots) and the elementwise work
      are recomputed in the backward pass.
  per block, remat=full (nothing_saveable): the block input [B,T,D] a.
  one block's backward working set: with remat block/full the backward
      re-materializes one block's remat=none set at a time (counted once);
      with remat=none it is already part of the saved total.
  attention scores: 2 [B,H,T,T] fp32 for the layer being processed (scores
      beside the probabilities, or the probability gradient): one layer live
      at a time, but the dense kernel does materialize [T,T].
  outside the blocks (never rematerialized):
      LM logits [B,T,V]: 3 fp32 copies (logits, log-probabilities, gradient)
          + the matmul output in a
      known head: query [B*T,D] fp32 and its top-k gathers, keys and values
          [B*T,k,D] fp32, each with its gradient before the scatter-add into
          the table: 4 [B*T,k,D] fp32
      unknown head: the same at rank r (D when dense): 4 [B*T,k_u,r] fp32
      concept loss on the clean stream (B*T_data tokens): gathered rows and
          their gradient 2 [B*T_data,K+k',D] fp32 (K = data.max_chunk_concepts,
          k' = reported top-k) + teacher-forcing label rows [B*T_data,K,D] fp32
      streaming top-k: one block of logits [B*T,block] fp32 (the larger head)
      rewrite tensors: 6 [B,T,D] a (hidden, known/unknown features, epsilon,
          composed, teacher features)
The estimate sums all terms (forward-only transients are counted as if live
at the backward peak); fused elementwise temporaries, XLA scratch and
fragmentation are not counted. The copy counts above were checked against
XLA buffer assignments of the compiled step (tools/plan.py --compile; tiny,
small, 1b and steerling_8b widths at 2-4 layers on 8 simulated CPU devices):
the remat=none estimate (plus the state terms below) came out 18-50% above
the compiled argument + temp bytes, the gap shrinking with depth and length.
Two caveats: XLA:CPU does not schedule rematerialization to save memory
(its numbers track remat=none whatever the policy; the remat savings here
assume a memory-aware scheduler, as on TPU and GPU), and it runs bf16 dots
in fp32, so bf16 models use more memory there than on an accelerator.

Train step (``memory_plan``): params + optimizer + fp32 gradients + about one
more params-sized set of AdamW update temporaries (a second gradient-sized
accumulator when grad_accum_steps > 1) + FSDP-gathered weights of one block
and of the LM-head table, in the param dtype (XLA gathers the fp32 master and
casts after), x2 for their gradients before the reduce-scatter +
activations. ``fits`` when that total is at most the chip's HBM
(devices.HBM_BYTES): an estimate only. Measured against XLA's TPU compiler
it missed by up to 52% at 8B (the 15% bar of issue 11 was not met), so the
memory verdict is the compiler's (train/aot.py, tools/aot_compile.py,
tools/plan.py --topology); this model stays for what-if sweeps (remat
policies, grad_accum_steps) that would each need a multi-minute compile.

Step time: data tokens per step (batch_size * seq_len) times
planning.model_train_flops_per_token(model, seq_len, two_stream) (3 x forward; a
two-stream row unembeds one stream and attends a band), over n_devices * peak FLOP/s
* assumed MFU (MFU is a ratio of model FLOPs, so the remat recompute is not counted).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from cbm_lm.config import MeshConfig, ModelConfig, logical_rules_from_config
from cbm_lm.parallel.devices import hbm_bytes_per_device, peak_flops_per_device
from cbm_lm.parallel.mesh_plan import (DTYPE_BYTES, MeshPlan, indivisible_dims, plan_mesh,  # noqa: F401
                                       shard_shape, spec_axes, tree_shard_bytes)
from cbm_lm.parallel.sharding import logical_to_spec
from cbm_lm.train.planning import (forward_flops_per_token, hardware_train_flops_per_token,
                                   model_train_flops_per_token)

@dataclasses.dataclass(frozen=True)
class StateBytes:
    params: int             # per device
    optimizer: int          # per device (AdamW mu + nu + counts)
    params_global: int
    optimizer_global: int
    block_gathered: int     # one block's params gathered over the FSDP axes (param dtype)
    head_gathered: int      # the LM-head (embedding) table gathered over FSDP (param dtype)
    problems: tuple[str, ...] = ()   # params whose dims do not divide by their mesh axes


def state_bytes(model_cfg: ModelConfig, tx, mesh: MeshPlan, rules) -> StateBytes:
    """Per-device bytes of the trainer's TrainState params and optimizer state."""
    from cbm_lm.train.state import abstract_train_state, train_state_shardings
    _, abs_state, abs_params = abstract_train_state(model_cfg, tx)
    sh = train_state_shardings(abs_state, abs_params, mesh.abstract_mesh(), rules)
    sizes = mesh.sizes

    def global_bytes(tree):
        return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))

    # FSDP gathers: the axes the "embed" rule names are gathered before use.
    fsdp_axes = set(spec_axes(dict(rules).get("embed")))
    no_fsdp = {a: (1 if a in fsdp_axes else n) for a, n in sizes.items()}

    def gathered(params, shardings):  # XLA gathers the fp32 master, then casts
        return sum(math.prod(shard_shape(x.shape, s.spec, no_fsdp)) * jnp.dtype(x.dtype).itemsize
                   for x, s in zip(jax.tree.leaves(params),
                                   jax.tree.leaves(shardings, is_leaf=lambda x: hasattr(x, "spec"))))

    p, psh = abs_state.params, sh.params
    problems = []
    for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(p),
                            jax.tree.leaves(psh, is_leaf=lambda x: hasattr(x, "spec"))):
        bad = indivisible_dims(x.shape, s.spec, sizes)
        if bad:
            name = ".".join(str(getattr(k, "key", k)) for k in path)
            problems.append(f"{name} {list(x.shape)} {s.spec}: {', '.join(bad)}")
    blocks, sh_blocks = p["backbone"]["blocks"], psh["backbone"]["blocks"]   # stacked [L, ...]
    n_layers = jax.tree.leaves(blocks)[0].shape[0]
    head_p = p.get("lm_head") or p["backbone"]["embedding"]
    head_s = psh.get("lm_head") or psh["backbone"]["embedding"]
    return StateBytes(
        params=tree_shard_bytes(p, psh, sizes),
        optimizer=tree_shard_bytes(abs_state.opt_state, sh.opt_state, sizes),
        params_global=global_bytes(p), optimizer_global=global_bytes(abs_state.opt_state),
        block_gathered=gathered(blocks, sh_blocks) // n_layers, head_gathered=gathered(head_p, head_s),
        problems=tuple(problems))


# ----------------------------------------------------------------------------- activations
@dataclasses.dataclass(frozen=True)
class ActivationEstimate:
    remat: str
    micro_batch: int          # sequences per device per micro-step
    model_len: int            # T the model sees (2 x seq_len for two-stream diffusion)
    terms: tuple[tuple[str, int], ...]   # (description, bytes per device)

    @property
    def total(self) -> int:
        return sum(b for _, b in self.terms)


def model_length(config) -> int:
    two_stream = config.model.objective == "diffusion" and config.loss.diffusion_clean_context
    return config.data.seq_len * (2 if two_stream else 1)


def batch_shards(mesh: MeshPlan, rules) -> int:
    return math.prod(mesh.sizes[a] for a in spec_axes(logical_to_spec(("batch",), rules)[0]))


def batch_problem(config, mesh: MeshPlan, rules) -> str | None:
    """Why data.batch_size cannot be split as the train step splits it, or None."""
    b, accum, shards = config.data.batch_size, config.train.grad_accum_steps, batch_shards(mesh, rules)
    if b % (accum * shards):
        axes = spec_axes(logical_to_spec(("batch",), rules)[0])
        over = " x ".join(f"mesh {a}={mesh.sizes[a]}" for a in axes) or "no mesh axis"
        return (f"data.batch_size={b} does not divide into train.grad_accum_steps={accum} "
                f"micro-batches over {shards} batch shards ({over}): it needs a multiple of "
                f"{accum * shards}")
    return None


def activation_estimate(config, model_cfg: ModelConfig, mesh: MeshPlan, rules,
                        remat: str | None = None) -> ActivationEstimate:
    """Analytic activation bytes per device at the backward peak (module docstring)."""
    remat = remat or model_cfg.remat
    sizes = mesh.sizes
    a = DTYPE_BYTES[model_cfg.dtype]
    accum = config.train.grad_accum_steps
    bm = -(-config.data.batch_size // accum)      # global micro-batch (sequences)
    t, t_data = model_length(config), config.data.seq_len
    d, f, h, g = model_cfg.d_model, model_cfg.mlp_dim, model_cfg.n_heads, model_cfg.n_kv_heads
    hd, v, n_layers = model_cfg.resolved_head_dim, model_cfg.vocab_size, model_cfg.n_layers
    cc = model_cfg.concepts

    def n(shape, axes):  # per-device element count of an activation with logical axes
        return math.prod(shard_shape(shape, logical_to_spec(axes, rules), sizes))

    btd = n((bm, t, d), ("batch", "length", "activation_embed"))
    q_el = n((bm, t, h, hd), ("batch", "length", "heads", "head_dim"))
    kv_el = n((bm, t, g, hd), ("batch", "length", "kv_heads", "head_dim"))
    btf = n((bm, t, f), ("batch", "length", "mlp"))
    scores = n((bm, h, t, t), ("batch", "heads", None, None)) * 4
    mask = n((bm, t, t), ("batch", None, None))
    per_none = (4 * btd * a + (q_el + 2 * kv_el) * (a + 4) + q_el * a + 3 * btf * a
                + 2 * scores + mask)
    per_block = 3 * btd * a + (q_el + 2 * kv_el) * a + 2 * btf * a
    per_full = btd * a
    saved = {"none": per_none, "block": per_block, "full": per_full}[remat]

    tokens = (bm * t,)
    known_k = cc.known_topk
    report_k = min(cc.known_report_topk if cc.known_report_topk is not None else known_k,
                   cc.n_known)
    k_chunk = config.data.max_chunk_concepts
    tok = n(tokens, ("batch",))                    # model tokens per device
    tok_data = n((bm * t_data,), ("batch",))       # clean-stream tokens per device
    terms = [(f"saved per block x {n_layers} blocks (remat={remat})", n_layers * saved)]
    if remat != "none":
        terms.append(("one block's backward working set (recomputed)", per_none))
    logits = n((bm, t, v), ("batch", "length", "vocab"))
    terms += [
        ("attention scores fp32 [B,H,T,T], one layer, x2", 2 * scores),
        ("LM logits [B,T,V] fp32 x3 (+grad, log-probs) + matmul out",
         logits * (3 * 4 + a)),
        ("known head: query + top-k gathers [B*T,k,D] fp32 x4",
         tok * d * 4 + 4 * tok * known_k * d * 4),
    ]
    if cc.use_unknown:
        k_u = cc.unknown_topk or cc.n_unknown
        q_u = cc.unknown_rank or d
        terms.append(("unknown head: query + top-k gathers [B*T,k,r] fp32 x4",
                      tok * q_u * 4 + 4 * tok * k_u * q_u * 4))
    terms += [
        ("concept loss [B*T,K+k,D] fp32 x2 + teacher rows [B*T,K,D]",
         tok_data * d * 4 + 2 * tok_data * (k_chunk + report_k) * d * 4
         + tok_data * k_chunk * d * 4),
    ]
    topk_block = 0
    for n_c, thresh in ((cc.n_known, cc.dense_threshold),
                        (cc.n_unknown if cc.use_unknown else 0, cc.dense_threshold)):
        if n_c:
            topk_block = max(topk_block, tok * (n_c if n_c <= thresh else min(cc.block_size, n_c)) * 4)
    terms += [
        ("concept top-k logits block [B*T,block] fp32", topk_block),
        ("rewrite tensors 6 x [B,T,D]", 6 * btd * a),
    ]
    per_device_batch = bm / batch_shards(mesh, rules)
    return ActivationEstimate(remat=remat, micro_batch=math.ceil(per_device_batch),
                              model_len=t, terms=tuple(terms))


# ----------------------------------------------------------------------------- totals
@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    mesh: MeshPlan
    state: StateBytes
    activations: ActivationEstimate
    gradients: int
    update_temporaries: int
    grad_accumulator: int
    gathered_weights: int
    hbm: int | None
    device_kind: str

    @property
    def total(self) -> int:
        return (self.state.params + self.state.optimizer + self.gradients
                + self.update_temporaries + self.grad_accumulator + self.gathered_weights
                + self.activations.total)

    @property
    def fits(self) -> bool | None:
        return None if self.hbm is None else self.total <= self.hbm


def optimizer_for(config):
    from cbm_lm.train.optimizer import make_optimizer
    return make_optimizer(config.optimizer, config.train.num_steps)[0]


def memory_plan(config, n_devices: int, device_kind: str, *, hbm_bytes: int | None = None,
                remat: str | None = None, state: StateBytes | None = None) -> MemoryPlan:
    model_cfg = ModelConfig.from_config(config.model)
    mesh = plan_mesh(MeshConfig.from_config(config.mesh), n_devices)
    rules = logical_rules_from_config(config.rules)
    if state is None:
        state = state_bytes(model_cfg, optimizer_for(config), mesh, rules)
    acts = activation_estimate(config, model_cfg, mesh, rules, remat)
    grads = state.params   # fp32 gradients, sharded like the params
    accum = grads if config.train.grad_accum_steps > 1 else 0
    gathered = 2 * (state.block_gathered + state.head_gathered)
    hbm = hbm_bytes if hbm_bytes else hbm_bytes_per_device(device_kind)
    return MemoryPlan(mesh=mesh, state=state, activations=acts, gradients=grads,
                      update_temporaries=grads, grad_accumulator=accum,
                      gathered_weights=gathered, hbm=hbm, device_kind=device_kind)


def smallest_fitting_accum(config, n_devices: int, device_kind: str, *,
                           hbm_bytes: int | None = None, state: StateBytes | None = None,
                           max_steps: int = 1024) -> int | None:
    """Smallest train.grad_accum_steps (dividing the per-shard batch) whose plan fits."""
    model_cfg = ModelConfig.from_config(config.model)
    mesh = plan_mesh(MeshConfig.from_config(config.mesh), n_devices)
    rules = logical_rules_from_config(config.rules)
    per_shard = config.data.batch_size // batch_shards(mesh, rules)
    if state is None:
        state = state_bytes(model_cfg, optimizer_for(config), mesh, rules)
    for accum in range(1, min(per_shard, max_steps) + 1):
        if per_shard % accum:
            continue
        c = config.copy_and_resolve_references()
        with c.unlocked():
            c.train.grad_accum_steps = accum
        plan = memory_plan(c, n_devices, device_kind, hbm_bytes=hbm_bytes, state=state)
        if plan.fits:
            return accum
    return None


# ----------------------------------------------------------------------------- time
@dataclasses.dataclass(frozen=True)
class StepTimePlan:
    tokens_per_step: int          # model tokens (two-stream: 2 x data tokens)
    data_tokens_per_step: int
    model_len: int
    forward_flops_per_token: float       # per model token, one stream's view
    model_flops_per_data_token: float    # planning.model_train_flops_per_token
    hardware_flops_per_data_token: float  # the same with the remat recompute
    peak_flops_per_device: float
    n_devices: int
    assumed_mfu: float

    @property
    def flops_per_step(self) -> float:
        """Model FLOPs of one step (global)."""
        return self.data_tokens_per_step * self.model_flops_per_data_token

    @property
    def step_seconds(self) -> float:
        return self.flops_per_step / (self.n_devices * self.peak_flops_per_device * self.assumed_mfu)


def step_time_plan(config, n_devices: int, device_kind: str, assumed_mfu: float) -> StepTimePlan:
    model_cfg = ModelConfig.from_config(config.model)
    t = model_length(config)
    two_stream = t != config.data.seq_len
    return StepTimePlan(
        tokens_per_step=config.data.batch_size * t,
        data_tokens_per_step=config.data.batch_size * config.data.seq_len, model_len=t,
        forward_flops_per_token=forward_flops_per_token(model_cfg, t),
        model_flops_per_data_token=model_train_flops_per_token(
            model_cfg, config.data.seq_len, two_stream=two_stream),
        hardware_flops_per_data_token=hardware_train_flops_per_token(
            model_cfg, config.data.seq_len, two_stream=two_stream),
        peak_flops_per_device=peak_flops_per_device(device_kind,
                                                    config.hardware.peak_flops_per_device),
        n_devices=n_devices, assumed_mfu=assumed_mfu)


def fmt_flops(n: float, per: str = "") -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}FLOP{per}"
    return f"{n:.0f} FLOP{per}"


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{int(n)} B"


