"""Memory estimator for training a LLaMA decoder with full-rank or subspace optimizers.

``estimate(config, optimizer=...)`` returns the bytes a training step holds, by kind:

* **weights**: every parameter in ``dtype``.
* **gradients**: one per parameter in ``dtype``; with ``per_layer=True`` (each parameter is
  updated in its post-accumulate-grad hook and its gradient freed at once) only the largest
  single parameter's gradient is counted, since at most about one is alive at a time.
* **optimizer state**, following what ``osd.AdamW`` / ``osd.AdamW8bit`` allocate:

  - full-rank AdamW: two moments per parameter in the parameter's dtype (as
    ``torch.optim.AdamW`` and osd's plain groups do);
  - 8-bit: one byte per element plus one fp32 scale per block of 256 (torchao's
    ``OptimState8bit``); a tensor under 4096 elements, or whose size is not a multiple of
    256, stays fp32 (4 bytes per element);
  - subspace (GaLore / OSD) for each targeted matrix W (m x n) at rank r, fp32:
    ``2 max(m,n) r`` moments (8-bit when ``eight_bit``) + ``min(m,n) r`` basis (2 bytes an
    element with ``basis_dtype="bfloat16"``), plus for OSD
    the basis' own optimizer state (``adamw``: ``2 min(m,n) r``). r is clamped to
    ``min(m,n)`` as the optimizer does. Targeted matrices are the attention (q, k, v, o) and
    MLP (gate, up, down) projections: the 2-D weights of ``nn.Linear`` modules whose name
    contains "attn" or "mlp" (``osd.param_groups``). Embeddings, norms and the output head
    keep the plain rule.

* **activations**: what autograd saves in the forward pass of ``osd-train``'s loss
  (``osd.train.TokenLoss``: Hugging Face's ``LlamaForCausalLM``, SDPA attention, no
  dropout, no padding mask, with the lean RMSNorm and SwiGLU of :mod:`osd.lean`; the
  logits are not held), plus the largest transient of backward. Per token, with e = bytes
  of ``dtype``, h hidden, i intermediate, a heads, k key/value heads, d head dim, V vocab::

      decoder layer   2 RMSNorms   2 (2eh + 4)           input, output, 1 / rms
                      attention    e (2ad + 2kd) + 4a    q, k (after RoPE), v, SDPA output, fp32 logsumexp
                      MLP          3ei                   gate, up, silu(gate)*up
      head            final norm   2eh + 4
                      log-softmax  4V                    fp32
                      token ids    16                    int64 input ids and shifted labels
      transient       loss buffers 8V                    fp32 grads of log-probs and logits (first backward op)
                      or a layer's backward: the incoming gradient eh and the MLP's ei

  plus RoPE's cos/sin (2 s d e per sequence, shared by all layers). With activation
  checkpointing each layer keeps only its input (eh per token) and one layer's activations
  are recomputed at a time during backward (its first norm keeps the checkpointed input
  itself, and the incoming gradient takes that place). Transformers' own modules keep 4h
  bytes more per norm and ei more per MLP (``osd.lean``'s docstring).
  With ``loss_chunk`` c (``osd-train --loss_chunk``, :func:`osd.lean.chunked_cross_entropy`)
  the head saves nothing but the final norm's input (eh + 4) and the ids (8): its gradients
  are made in forward, so at forward's end the transient is the head's input and its
  gradient (2 e h per token of the batch), the head's gradient (e V h) and one chunk's
  logits in e and fp32 (``(e + 4) V c``). tests/test_memory.py checks the per-token counts
  against the tensors autograd really keeps.

* **step temporaries**: what the update of the costliest parameter allocates for a moment
  (:func:`update_temporaries`: by phase of a subspace update; 8-bit state is dequantised
  one stack at a time, and a lone plain tensor above ``osd.engine.CHUNK_ELEMENTS`` values,
  an embedding or head, one chunk of that many values at a time). Without per-layer
  updates same-shape matrices are updated as one stack, whose temporaries add up.

* **total**: the estimated peak. Without ``per_layer``: ``weights + optimizer state +
  max(activations, gradients + step temporaries)``: backward frees a layer's saved
  activations as it creates that layer's gradients; for a stack of identical layers the
  live memory moves almost linearly from "all activations" (start of backward) to "all
  gradients" (optimizer step), so the peak is at one end; with gradient accumulation the
  gradients of earlier micro-batches add to the activations. With ``per_layer`` each
  gradient lives only through its own update, and the peak is the larger of two phases
  of backward: the output head's (all activations and the loss's buffers, or the head's
  gradient and update) and the last decoder layer's (every layer's input, that layer's
  recomputed activations and backward, and the costliest update of one of its matrices).
  Not counted: the first step's initial bases (one matrix's SVD at a time: measured at
  most 0.4% above the later steps' peak, per layer and stacked), kernel workspaces
  (LAPACK's and cuSOLVER's for that SVD among them), the CUDA context and allocator
  fragmentation. ``sum`` (every row added) is an upper bound on the tensors alive.
  tests/test_memory.py checks the total against whole steps of the trainer on the meta
  device (``bench/configs.py --device meta``: allocations tracked, FlashAttention's
  kernel) for a 2-layer model of LLaMA-7B's width, to 0.1% for per-layer configs;
  ``bench/memory.py --measure`` and ``bench/configs.py`` against
  ``torch.cuda.max_memory_allocated`` on a GPU (the errors are in the README).

Needs no transformers and allocates nothing: the sizes come from ``osd.models.SIZES``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field

from osd.engine import CHUNK_ELEMENTS, MAX_STACK_BYTES
from osd.groups import TARGET_MODULES
from osd.models import SIZES, resolve
from osd.projectors import CORRECTIONS, PROJ_OPTIMIZERS

VOCAB_SIZE = 32000

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
OPTIMIZERS = ("adamw", "adamw8bit", "galore", "osd")

# torchao OptimState8bit layout, as used by osd.storage.Blockwise8bit
BLOCK_SIZE = 256
MIN_8BIT_NUMEL = 4096
GB = 1e9

# Temporaries of one parameter's update: the peak of what it allocates, in bytes. They follow
# the implementation, not the algorithm.
# Plain updates (m x n values): per element, for (fp32, 16-bit) parameters. AdamW with fp32
# state runs torch's fused kernel: its figure is kept from its H100 fit. 8-bit plain
# dequantises m and v to fp32 and requantises them, a chunk of a large tensor at a time:
# measured like the subspace rows below (eager; the CUDA path fuses it and allocates less).
PLAIN_TEMPORARIES = {"adamw": (8, 4), "adamw8bit": (20.1, 24.1)}
# A subspace update of an m x n matrix at rank r, with P = max(m, n) r and Q = min(m, n) r
# (the projected gradient's and the basis's sizes) and e bytes per weight, peaks in one of
# four phases (osd.optim.SubspaceOptimizer.finish):
# * the rule: the projected gradient, its fp32 copy with 16-bit weights, and the update
#   (RULE_FP32 per P); with 8-bit state also the dequantised moments and the new codes
#   (RULE_8BIT per P); above CHUNK_ELEMENTS values the 8-bit rule runs a chunk at a time
#   (RULE_8BIT per value of a chunk) beside the projected gradient and the whole update,
#   kept in the weights' dtype (e each per P);
# * projecting back: the projected gradient beside the rule's fp32 update and its cast
#   (PROJECTED per P, or e each per P when chunked) and the bases cast to the projection
#   dtype where they differ (e or 4 per Q). A lone matrix (osd.Layerwise, or a stack of
#   one) adds the last product into its weights in place; a stack makes the m x n update
#   in its stacked gradients' buffer, a full-rank correction in the gradient's where the
#   step may reuse it (osd.Layerwise's), else in a new tensor (e m n); before the buffer
#   is reused, online PCA takes its r-wide products of the gradient (4 per Q, fp32);
# * online PCA's basis step, after the update is freed: the projected gradient (e per P)
#   and BASIS_STEP per Q (the PCA gradient, P's optimizer on a scratch copy of its state,
#   the new basis) by P's optimizer, without and with bf16 bases (their fp32 copies); SGD
#   also holds two r x r products (8 r^2).
# With Layerwise's per-parameter clipping a clipped copy of the projected gradient (e per
# P) is alive in the first two. Measured on the CPU with an allocation-tracking dispatch
# mode (tests/test_memory.py checks every kind and dtype against it, at shapes and ranks
# where each phase is the peak); the CUDA path of 8-bit state fuses the weights' moment
# update and allocates less, so the 8-bit figures bound it.
PROJECTED = 8
RULE_FP32 = (8, 10)
RULE_8BIT = (24.1, 26.1)
BASIS_STEP = {"adamw": (16, 20), "adam8bit": (25.1, 29.1), "lion": (12, 20), "adafactor": (16, 20), "sgd": (8, 12)}
# A full-rank correction (osd.corrections) scales the m x n update in place: it adds its
# channel norms and ratios, CORRECTION_TEMPORARIES bytes per row or column of the larger side.
CORRECTION_TEMPORARIES = 8


def update_temporaries(
    shape: tuple[int, int],
    dtype_bytes: int,
    rank: int | None = None,
    eight_bit: bool = False,
    correction: str = "none",
    proj_optimizer: str | None = None,
    basis_dtype: str = "float32",
    stacked: bool = False,
    clipped: bool = False,
    scratch: bool = False,
) -> int:
    """Bytes one update of an m x n parameter allocates at its peak: a subspace update when
    ``rank`` is given (online PCA's basis step when ``proj_optimizer`` is, the name of P's
    optimizer), else a plain one (an 8-bit plain update of a large tensor runs in chunks of
    ``osd.engine.CHUNK_ELEMENTS``). ``stacked``: the matrix is one of a stack updated together
    (without per-layer updates), whose gradients are stacked (a copy, e m n each, alive
    through the update), into whose buffer the update is made before it is applied; a lone
    matrix adds it into its weights in place. ``clipped``: osd.Layerwise clips its
    projected gradient (a copy). ``scratch``: a lone matrix's gradient is the update's to
    reuse (osd.Layerwise's: a correction makes its update there)."""
    m, n = shape
    e, half = dtype_bytes, dtype_bytes != 4
    if rank is None:
        numel = min(m * n, CHUNK_ELEMENTS) if eight_bit else m * n
        return int(numel * PLAIN_TEMPORARIES["adamw8bit" if eight_bit else "adamw"][half])
    r = min(rank, m, n)
    p, q = max(m, n) * r, min(m, n) * r
    bf16_bases = basis_dtype == "bfloat16"
    cast = (4 if bf16_bases else 0) if e == 4 else (0 if bf16_bases else e)
    chunked = eight_bit and p > CHUNK_ELEMENTS  # osd.optim.SubspaceOptimizer._subspace_rule
    copy = e * p if clipped else 0
    # the m x n update: made in the gradient's buffer where it is the step's to reuse (a
    # stack's copy, osd.Layerwise's gradient), after online PCA took its r-wide products
    # of it (y = X C^T, fp32, q), else a new tensor where one is made (a correction)
    in_gradient = stacked or (scratch and correction != "none")
    full = correction != "none" and not in_gradient
    products = 4 * q if in_gradient and proj_optimizer is not None else 0
    projecting_back = (e * m * n if full else 0) + (2 * e if chunked else PROJECTED) * p + cast * q + copy + products
    if correction != "none":
        projecting_back += CORRECTION_TEMPORARIES * max(m, n)
        if correction != "fira" and half and not chunked:  # APOLLO projects nothing back: no 16-bit copy
            projecting_back -= e * p
    if eight_bit:
        rule = 2 * e * p + RULE_8BIT[half] * CHUNK_ELEMENTS if chunked else RULE_8BIT[half] * p
    else:
        rule = RULE_FP32[half] * p
    phases = [projecting_back, rule + copy]
    if proj_optimizer is not None:
        pairs = 8 * r * r if proj_optimizer == "sgd" else 0
        phases.append(e * p + BASIS_STEP[proj_optimizer][bf16_bases] * q + pairs)
    return int(max(phases) + (e * m * n if stacked else 0))


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    heads: int
    layers: int
    vocab: int = VOCAB_SIZE
    kv_heads: int | None = None
    head_dim: int | None = None
    tied: bool = False
    name: str = ""
    positions: int | None = None  # max_position_embeddings, where the config gives it

    @property
    def kv(self) -> int:
        return self.kv_heads or self.heads

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden // self.heads


@dataclass(frozen=True)
class Param:
    name: str  # as in transformers' LlamaForCausalLM
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def targeted(self) -> bool:  # osd.param_groups' rule
        return len(self.shape) == 2 and any(t in self.name for t in TARGET_MODULES)


def model_shape(model: str | os.PathLike | dict | LlamaShape) -> LlamaShape:
    """A LLaMA size name (``llama_60m``, ``60m``), a path to a HF config JSON, or a config dict."""
    if isinstance(model, LlamaShape):
        return model
    if isinstance(model, dict):
        return _from_config(model, "config")
    text = str(model)
    key = text.lower().replace("-", "_")
    key = key if key.startswith("llama_") else "llama_" + key
    if key not in SIZES and not os.path.exists(text):
        names = ", ".join(SIZES)
        raise ValueError(f"unknown model {text!r}: give a LLaMA size ({names}) or a path to a config JSON")
    try:  # the trainer's reading of sizes and config files (GaLore's key names included)
        fields = resolve(key if key in SIZES else text)
    except ValueError as e:
        raise ValueError(f"cannot read model config {text}: {e}") from None
    return _from_config(fields, key if key in SIZES else text)


def _from_config(config: dict, where: str) -> LlamaShape:
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
    missing = [k for k in keys if k not in config]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    values = [config[k] for k in keys]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ValueError(f"{where}: {', '.join(keys)} must be positive integers")
    return LlamaShape(
        *values[:4],
        vocab=values[4],
        kv_heads=config.get("num_key_value_heads"),
        head_dim=config.get("head_dim"),
        tied=bool(config.get("tie_word_embeddings", False)),
        name=str(config.get("_name_or_path") or where),
        positions=config.get("max_position_embeddings"),
    )


def llama_parameters(shape: LlamaShape) -> list[Param]:
    """The parameters of ``LlamaForCausalLM`` (no biases), in ``named_parameters`` order."""
    h, i, d = shape.hidden, shape.intermediate, shape.dim
    params = [Param("model.embed_tokens.weight", (shape.vocab, h))]
    for layer in range(shape.layers):
        p = f"model.layers.{layer}."
        params += [
            Param(p + "self_attn.q_proj.weight", (shape.heads * d, h)),
            Param(p + "self_attn.k_proj.weight", (shape.kv * d, h)),
            Param(p + "self_attn.v_proj.weight", (shape.kv * d, h)),
            Param(p + "self_attn.o_proj.weight", (h, shape.heads * d)),
            Param(p + "mlp.gate_proj.weight", (i, h)),
            Param(p + "mlp.up_proj.weight", (i, h)),
            Param(p + "mlp.down_proj.weight", (h, i)),
            Param(p + "input_layernorm.weight", (h,)),
            Param(p + "post_attention_layernorm.weight", (h,)),
        ]
    params.append(Param("model.norm.weight", (h,)))
    if not shape.tied:
        params.append(Param("lm_head.weight", (shape.vocab, h)))
    return params


def state_tensor_bytes(numel: int, eight_bit: bool, dtype_bytes: int = 4) -> int:
    """Bytes of one optimizer-state tensor (a moment) of ``numel`` elements."""
    if not eight_bit:
        return numel * dtype_bytes
    if numel < MIN_8BIT_NUMEL or numel % BLOCK_SIZE:
        return numel * 4  # osd.storage keeps these fp32
    return numel + 4 * (numel // BLOCK_SIZE)  # uint8 codes + one fp32 scale per block


def _proj_optimizer_bytes(name: str, rows: int, cols: int) -> int:
    """State of the online-PCA basis optimizer for a rows x cols fp32 basis."""
    numel = rows * cols
    if name == "adamw":
        return 2 * numel * 4
    if name == "adam8bit":
        return 2 * state_tensor_bytes(numel, True)
    if name == "lion":
        return numel * 4
    if name == "adafactor":  # factored second moment: one row and one column vector
        return (rows + cols) * 4
    return 0  # sgd


@dataclass
class Estimate:
    """Bytes by kind; ``total`` is the estimated peak (see the module docstring)."""

    model: str
    optimizer: str
    weights: int
    gradients: int
    optimizer_state: int
    activations: int
    step_temporaries: int
    total: int
    # sub-rows: (label, bytes), shown indented under their kind
    details: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def sum(self) -> int:
        return self.weights + self.gradients + self.optimizer_state + self.activations + self.step_temporaries

    def rows(self) -> list[tuple[str, int]]:
        out = []
        for key in ("weights", "gradients", "optimizer_state", "activations", "step_temporaries"):
            out.append((key.replace("_", " "), getattr(self, key)))
            out += [("  " + label, value) for label, value in self.details.get(key, [])]
        out.append(("total (peak estimate)", self.total))
        out.append(("sum of all rows (upper bound)", self.sum))
        return out

    def table(self) -> str:
        rows = self.rows()
        width = max(len(label) for label, _ in rows)
        lines = [f"{self.model}, {self.optimizer}", f"{'':{width}}  {'GB':>9}  {'bytes':>16}"]
        lines += [f"{label:{width}}  {value / GB:9.2f}  {value:16,d}" for label, value in rows]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def estimate(
    config,
    optimizer: str = "adamw",
    rank: int | None = None,
    eight_bit: bool = False,
    per_layer: bool = False,
    gradient_accumulation: int = 1,
    dtype: str = "bfloat16",
    batch_size: int = 1,
    seq_len: int = 256,
    activation_checkpointing: bool = False,
    proj_optimizer: str | None = None,
    correction: str = "none",
    basis_dtype: str = "float32",
    loss_chunk: int = 0,
    grad_clipping: bool = False,
) -> Estimate:
    """Estimate training memory of a LLaMA model; see the module docstring for the formulas.

    ``config``: a LLaMA size name, a path to a HF config JSON, or a config dict.
    ``optimizer``: adamw, adamw8bit (= adamw with ``eight_bit``), galore (SVD basis) or osd
    (online-PCA basis, whose own optimizer is ``proj_optimizer``, default adamw); galore/osd
    need ``rank``. The inputs are checked as ``osd-train`` checks them (float16, a sequence
    longer than the model's positions and a basis optimizer for anything but osd are
    refused); a rank above a matrix's smaller side is clamped, as the optimizer does, with a
    warning. ``correction`` (galore/osd: none, fira, apollo, apollo_mini) adds one fp32 norm
    per matrix of state and ``CORRECTION_TEMPORARIES`` bytes per row or column to the update.
    ``basis_dtype`` (galore/osd: float32, bfloat16) is the bases' storage dtype.
    ``loss_chunk`` (``osd-train --loss_chunk``): token positions per chunk of the output head
    and loss, 0 for the whole micro-batch. ``grad_clipping``: per-parameter clipping with
    ``per_layer`` (``osd.Layerwise(max_grad_norm=...)``, ``osd-train --grad_clipping``), which
    copies each projected gradient.
    """
    shape = model_shape(config)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPE_BYTES)}")
    if DTYPE_BYTES[dtype] == 2 and dtype in ("float16", "fp16"):
        raise ValueError("dtype float16 is not supported (osd-train trains in bfloat16 or float32)")
    if proj_optimizer is not None and optimizer != "osd":
        raise ValueError(f"proj_optimizer is the online-PCA basis optimizer of osd, not of {optimizer}")
    proj_optimizer = proj_optimizer or "adamw"
    if proj_optimizer not in PROJ_OPTIMIZERS:
        raise ValueError(f"unknown proj_optimizer {proj_optimizer!r}; valid: {', '.join(PROJ_OPTIMIZERS)}")
    subspace = optimizer in ("galore", "osd")
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r}; valid: {', '.join(CORRECTIONS)}")
    if basis_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"unknown basis_dtype {basis_dtype!r}; valid: float32, bfloat16")
    if basis_dtype != "float32" and not subspace:
        raise ValueError(f"basis_dtype is for galore/osd projection bases, not {optimizer}")
    if correction != "none" and not subspace:
        raise ValueError(f"a correction is for galore/osd subspace updates, not {optimizer}")
    if subspace and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"optimizer {optimizer} needs a positive integer rank, got {rank!r}")
    if not subspace and rank is not None:
        raise ValueError(f"rank is only for galore/osd, not {optimizer}")
    for key, value in (
        ("batch_size", batch_size),
        ("seq_len", seq_len),
        ("gradient_accumulation", gradient_accumulation),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if isinstance(loss_chunk, bool) or not isinstance(loss_chunk, int) or loss_chunk < 0:
        raise ValueError(f"loss_chunk must be a non-negative integer (0: no chunks), got {loss_chunk!r}")
    if shape.positions is not None and seq_len > shape.positions:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_position_embeddings {shape.positions}")
    eight_bit = eight_bit or optimizer == "adamw8bit"
    e = DTYPE_BYTES[dtype]
    params = llama_parameters(shape)
    if subspace:
        clamped = [p for p in params if p.targeted and rank > min(p.shape)]
        if clamped:
            smallest = min(min(p.shape) for p in clamped)
            warnings.warn(
                f"rank {rank} > the smaller side of {len(clamped)} matrices (smallest {smallest}): "
                "clamped to that side there, as the optimizer does",
                stacklevel=2,
            )

    weights = gradients = sum(p.numel for p in params) * e

    # optimizer state
    plain = moments = bases = basis_opt = norms = 0
    for p in params:
        if subspace and p.targeted:
            m, n = p.shape
            r = min(rank, m, n)
            norms += 4 if correction != "none" else 0
            moments += 2 * state_tensor_bytes(max(m, n) * r, eight_bit)
            bases += min(m, n) * r * (2 if basis_dtype == "bfloat16" else 4)
            if optimizer == "osd":
                basis_opt += _proj_optimizer_bytes(proj_optimizer, min(m, n), r)
        else:
            # osd.AdamW8bit keeps plain moments fp32 when they are not quantised
            plain += 2 * state_tensor_bytes(p.numel, eight_bit, 4 if eight_bit else e)
    state = plain + moments + bases + basis_opt + norms

    # activations, per token (see the module docstring)
    h, i, a, k, d, V = shape.hidden, shape.intermediate, shape.heads, shape.kv, shape.dim, shape.vocab
    tokens = batch_size * seq_len
    norm = 2 * e * h + 4  # osd.lean's RMSNorm: input, output, 1 / rms
    layer = (2 * norm + e * (2 * a * d + 2 * k * d) + 4 * a + 3 * e * i) * tokens
    chunked = 0 < loss_chunk < tokens
    # chunked, the head keeps nothing (osd.lean.chunked_cross_entropy makes its gradients
    # in forward): not the final norm's output, nor the labels
    head = (e * h + 4 + 8 if chunked else norm + 4 * V + 16) * tokens
    rope = 2 * seq_len * d * e
    decoder = shape.layers * (e * h * tokens if activation_checkpointing else layer)
    saved = decoder + head + rope
    if chunked:  # at the end of forward: the head's input, its gradient and the head's
        # gradient (one buffer the chunks add into), one chunk's logits in e and fp32
        loss_buffers = 2 * e * h * tokens + e * V * h + (e + 4) * V * loss_chunk
    else:  # at the start of backward: the loss's fp32 buffers
        loss_buffers = 8 * V * tokens
    # a layer's backward: with checkpointing its recomputed activations (its input is the
    # checkpoint's, and the incoming gradient takes that place), else the incoming
    # gradient; and the MLP's gradient buffers (osd.lean's SwiGLU backward: e i per token)
    layer_backward = (layer if activation_checkpointing else e * h * tokens) + e * i * tokens
    transient = max(loss_buffers, layer_backward)
    activations = saved + transient

    # the update of one parameter allocates temporaries; the largest parameter's set the peak
    clipped = per_layer and grad_clipping

    # without per-layer updates, same-shape matrices are updated as one stack of up to
    # MAX_STACK_BYTES of fp32 gradient (osd.optim: batched), whose temporaries add up
    same_shape = Counter(p.shape for p in params if subspace and p.targeted)

    def step(p):
        shape = (p.shape[0], p.numel // p.shape[0])
        if not (subspace and p.targeted):
            return update_temporaries(shape, e, eight_bit=eight_bit)
        basis_optimizer = proj_optimizer if optimizer == "osd" else None
        stack = 1 if per_layer else min(same_shape[p.shape], max(1, MAX_STACK_BYTES // (p.numel * 4)))
        one = update_temporaries(
            shape,
            e,
            rank,
            eight_bit,
            correction,
            basis_optimizer,
            basis_dtype,
            stacked=stack > 1,
            clipped=clipped,
            scratch=per_layer,
        )
        return stack * one

    accumulating = gradient_accumulation > 1
    if per_layer:
        # Each gradient lives only while its parameter is updated (osd.Layerwise). The peak
        # is in one of two phases of backward:
        # * the output head's: its gradient and update come first, while all activations
        #   and the loss's buffers are alive (chunked: the buffers of forward's end, or the
        #   head's update beside the input's gradient);
        # * the last decoder layer's: every layer's saved activations but the final norm's,
        #   the layer's backward, and the costliest update of one of its matrices (or the
        #   down projection's backward).
        # Between micro-batches (accumulation > 1) osd.Layerwise keeps the plain parameters'
        # gradients and a projected accumulator (max(m,n) x r, in the gradients' dtype) per subspace matrix.
        def kept(p):
            return max(p.shape) * min(rank, *p.shape) * e if subspace and p.targeted else p.numel * e

        held = sum(kept(p) for p in params) if accumulating else 0

        def passing_grad(p):  # accumulating, plain gradients are held, not passing
            return p.numel * e if not accumulating or (subspace and p.targeted) else 0

        def cost(p):
            return passing_grad(p) + step(p)

        head_param = params[-1]  # the output head, or the tied embedding
        in_layer = [p for p in params if ".layers.0." in p.name]
        largest = max(params, key=passing_grad)
        worst = max(params, key=cost)  # the costliest update
        gradients, temporaries = held + passing_grad(largest), step(worst)
        # the head's update runs after the loss's buffers (and, unchunked, its saved
        # log-softmax) are freed, beside the gradient of the head's input
        logsoftmax = 0 if chunked else 4 * V * tokens
        head_phase = max(loss_buffers, e * h * tokens + cost(head_param) - logsoftmax)
        # the MLP's down projection makes its input's and its weight's gradients while its
        # saved input is alive; its update runs after that input is freed
        down = e * i * tokens + e * h * i
        layer_phase = layer_backward - e * i * tokens + max(down, max(cost(p) for p in in_layer))
        in_layers = decoder + rope + 8 * tokens  # the head's saved tensors (and labels) are freed by then
        # accumulating, one of the embedding's and the head's gradients is not held during
        # the layers' backward: the first micro-batch has not made the embedding's yet, the
        # last has updated the head already
        held_in_layers = held - kept(head_param) if accumulating else 0
        total = weights + state + max(held + saved + head_phase, held_in_layers + in_layers + layer_phase)
    else:
        temporaries = max(step(p) for p in params)
        if accumulating:  # the gradients of earlier micro-batches stay through the next forward
            total = weights + state + gradients + max(activations, temporaries)
        else:
            total = weights + state + max(activations, gradients + temporaries)

    name = shape.name or "model"
    label = optimizer + (f" rank {rank}" if subspace else "")
    if optimizer == "osd":
        label += f", basis optimizer {proj_optimizer}"
    if correction != "none":
        label += f", {correction} correction"
    if basis_dtype != "float32":
        label += f", {basis_dtype} bases"
    if eight_bit and optimizer != "adamw8bit":
        label += ", 8-bit state"
    if per_layer:
        label += ", per-layer updates"
    if accumulating:
        label += f", accumulation {gradient_accumulation}"
    label += f", {dtype}, batch {batch_size} x seq {seq_len}"
    if activation_checkpointing:
        label += ", activation checkpointing"
    if chunked:
        label += f", loss in chunks of {loss_chunk} tokens"

    details = {"optimizer_state": [("plain AdamW (embeddings, norms, head)" if subspace else "AdamW moments", plain)]}
    if subspace:
        details["optimizer_state"] += [("subspace moments", moments), ("projection bases", bases)]
        if optimizer == "osd":
            details["optimizer_state"].append((f"basis optimizer ({proj_optimizer})", basis_opt))
        if correction != "none":
            details["optimizer_state"].append((f"{correction} correction norms", norms))
    buffers = "the head's gradients and one chunk's logits" if chunked else "fp32 loss buffers"
    details["activations"] = [
        ("decoder layers" + (" (layer inputs only)" if activation_checkpointing else ""), decoder),
        ("head: final norm, ids" if chunked else "head: final norm, log-softmax, ids", head + rope),
        (f"transient: max({buffers}, one layer's backward)", transient),
    ]
    notes = []
    if per_layer:
        notes.append(
            f"per-layer updates: one gradient at a time (largest {largest.name}, {'x'.join(map(str, largest.shape))}), "
            "freed right after its update"
            + (", plus what waits for the last micro-batch (plain gradients, projected accumulators)" if held else "")
            + "; total = weights + state + the larger of two phases of backward: the output head's "
            "(activations, the loss's buffers, the head's gradient and update) and the last layer's "
            "(layer inputs, its backward, the gradient and update of its costliest matrix)"
        )
    elif accumulating:
        notes.append("total = weights + optimizer state + gradients + max(activations, step temporaries)")
    else:
        notes.append(
            "total = weights + optimizer state + max(activations, gradients + step temporaries): "
            "backward frees activations as it makes gradients"
        )
    notes.append("not counted: kernel workspaces, CUDA context, allocator fragmentation")
    return Estimate(name, label, weights, gradients, state, activations, temporaries, total, details, notes)


def trainer_estimate(args) -> Estimate:
    """The estimate for one process of ``osd-train`` run with ``args`` (its namespace after
    ``osd.train.resolve``): the model, ``--optimizer`` and ``--proj_type`` strings, rank,
    batch, length, dtype, accumulation, checkpointing, loss chunks, bases and correction as
    the trainer reads them. Raises ValueError for optimizers it does not model (Lion,
    Adafactor and SGD rules: it counts Adam's two moments)."""
    from osd import cli_options

    choice = cli_options.parse_optimizer(args.optimizer)
    if choice.class_name not in ("AdamW", "AdamW8bit"):
        raise ValueError(f"--optimizer {args.optimizer}: the estimator counts Adam(W) state only")
    eight_bit = choice.class_name == "AdamW8bit"
    kwargs = {}
    if choice.subspace:
        options = cli_options.subspace_options(args.proj_type)
        online = options["projector"] == "online_pca"
        optimizer = "osd" if online else "galore"  # random bases: GaLore's state and temporaries
        kwargs.update(rank=args.rank, basis_dtype=args.basis_dtype, correction=args.correction)
        if online:
            kwargs["proj_optimizer"] = options["proj_optimizer"]
    else:
        optimizer = "adamw8bit" if eight_bit else "adamw"
    return estimate(
        args.model_config,
        optimizer=optimizer,
        eight_bit=eight_bit,
        per_layer=choice.per_layer,
        gradient_accumulation=args.gradient_accumulation,
        dtype=args.dtype,
        batch_size=args.batch_size,
        seq_len=args.max_length,
        activation_checkpointing=args.activation_checkpointing,
        loss_chunk=args.loss_chunk,
        grad_clipping=bool(args.grad_clipping),
        **kwargs,
    )


def _config_main(argv: list[str]) -> int:
    """``osd-memory --config FILE [osd-train flags]``: the estimate of that training run."""
    from osd import train

    return _print(lambda: trainer_estimate(train.resolve(train.parse_args(argv), world_size=1)), train.UsageError)


def _print(make, *errors) -> int:
    """Print the table of the estimate ``make()`` returns (exit code 0); its ValueError (or
    one of ``errors``) and each warning as one line on stderr (exit code 2)."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = make()
    except (ValueError, *errors) as e:
        print(f"osd-memory: error: {e}", file=sys.stderr)
        return 2
    for w in caught:
        print(f"osd-memory: warning: {w.message}", file=sys.stderr)
    print(result.table())
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like errors from estimate()
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--config" or a.startswith("--config=") for a in argv):
        return _config_main(argv)
    parser = _Parser(
        prog="osd-memory",
        description="Estimate the memory of training a LLaMA model with a full-rank or subspace optimizer. "
        "Or: osd-memory --config FILE [osd-train flags], the estimate of that osd-train run (one process).",
    )
    parser.add_argument("--model", required=True, help=f"LLaMA size ({', '.join(SIZES)}) or a HF config JSON")
    parser.add_argument("--optimizer", default="adamw", help=", ".join(OPTIMIZERS))
    parser.add_argument("--rank", type=int, default=None, help="subspace rank (galore, osd)")
    parser.add_argument("--eight_bit", action="store_true", help="8-bit optimizer moments")
    parser.add_argument("--per_layer", action="store_true", help="per-layer (in-backward) updates")
    parser.add_argument("--proj_optimizer", help=f"osd basis optimizer: {', '.join(PROJ_OPTIMIZERS)} (default adamw)")
    parser.add_argument(
        "--correction", default="none", help="galore/osd full-rank correction: " + ", ".join(CORRECTIONS)
    )
    parser.add_argument("--basis_dtype", default="float32", help="galore/osd bases' storage: float32, bfloat16")
    parser.add_argument("--dtype", default="bfloat16", help=", ".join(DTYPE_BYTES))
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--gradient_accumulation", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--activation_checkpointing", action="store_true")
    parser.add_argument(
        "--loss_chunk", type=int, default=0, help="token positions per chunk of the output head and loss (0: all)"
    )
    parser.add_argument(
        "--grad_clipping", action="store_true", help="per-parameter gradient clipping (with --per_layer)"
    )
    args = parser.parse_args(argv)
    return _print(
        lambda: estimate(
            args.model,
            optimizer=args.optimizer,
            rank=args.rank,
            eight_bit=args.eight_bit,
            per_layer=args.per_layer,
            gradient_accumulation=args.gradient_accumulation,
            dtype=args.dtype,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            activation_checkpointing=args.activation_checkpointing,
            proj_optimizer=args.proj_optimizer,
            correction=args.correction,
            basis_dtype=args.basis_dtype,
            loss_chunk=args.loss_chunk,
            grad_clipping=args.grad_clipping,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
