"""Update rules: pure functions on a stack of tensors that turn gradients into updates.

A rule knows nothing about projections. Given a stack of gradients ``g`` (leading
dimension k: k parameters of one shape, a lone tensor is a stack of one; full-space for
plain parameters, the projected ``r x k`` matrices for subspace ones), the stacked state
and the step number (1-based, the same for the whole stack), it returns the stacked update
``delta`` to subtract from the parameters, learning rate included (Adafactor's momentum
runs on lr-scaled updates, so the rule must see the lr). Decoupled weight decay is not a
rule's business: the optimizer applies it in full space. Reductions that are per tensor
(Adafactor's factored moments and update clipping) run over every dimension but the first.

State is a dict of stacked tensors, allocated through a ``storage`` (see
:mod:`osd.storage`) so that 8-bit state is a storage choice, not a different algorithm:
rules read a moment with ``storage.load(state, key)`` and write it back with
``storage.store(state, key, value)``; for full-precision state these are no-ops around
in-place arithmetic. Every op a rule dispatches runs once per stack, whatever k is, and no
rule reads a tensor's value on the host.

Under FSDP2 a stack may hold this rank's rows of each tensor (dimension 1 of the stack,
``shard``, see :mod:`osd.shards`): elementwise rules do not care; Adafactor sums its
reductions over rows across the ranks.

Each rule names its ``moments``: (first-moment keys, second-moment keys), so that
subspace state can be carried into a new basis (:func:`osd.projectors.transport`).

The same rules also drive the online-PCA projector's own optimizer (see
:mod:`osd.projectors`), so every rule here can be a weight rule or a basis rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from osd.shards import WHOLE, Whole
from osd.storage import FP32, Storage


def _per_tensor_dims(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, t.dim()))


@dataclass(frozen=True)
class Adam:
    """Adam moments with bias correction on both.

    ``eps_before_correction=False`` is torch.optim.AdamW's arithmetic (eps added to the
    bias-corrected ``sqrt(v)``); ``True`` is GaLore's and the OSD reference's (eps added to
    ``sqrt(v)``, step size ``lr sqrt(1 - b2^t) / (1 - b1^t)``), an eps larger by
    ``1/sqrt(1 - b2^t)`` early on. The difference is visible on near-zero coordinates, which a
    two-sided SVD projection produces (its off-diagonal entries are rounding noise), so
    subspace groups use the reference form and plain groups torch's.
    """

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    eps_before_correction: bool = False

    moments = (("exp_avg",), ("exp_avg_sq",))
    elementwise = True  # every value's update depends on that value only (8-bit fused kernel)
    scales_with_lr = True  # the update is lr times what the state gives: a factor may go into lr

    def init(self, shape, device, storage: Storage = FP32, dtype=torch.float32):
        return {
            **storage.zeros("exp_avg", shape, device, signed=True, dtype=dtype),
            **storage.zeros("exp_avg_sq", shape, device, signed=False, dtype=dtype),
        }

    def step_size(self, lr, step):
        """The factor between the update and its normalised direction: ``m / (sqrt(v) + eps)``
        (eps before correction) or the bias-corrected ``m_hat / (sqrt(v_hat) + eps)``."""
        beta1, beta2 = self.betas
        if self.eps_before_correction:
            return lr * (1 - beta2**step) ** 0.5 / (1 - beta1**step)
        return lr

    def update(self, g, state, lr, step, storage: Storage = FP32, shard: Whole = WHOLE):
        beta1, beta2 = self.betas
        m = storage.load(state, "exp_avg")
        v = storage.load(state, "exp_avg_sq")
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        if _fusable(g, m, v):
            # torch's fused AdamW kernel, applied to a zero "parameter" with lr -> -lr: it
            # becomes the update (2 kernels instead of 7). eps before correction is eps after
            # correction divided by sqrt(bias_correction2)
            eps = self.eps / bias_correction2**0.5 if self.eps_before_correction else self.eps
            delta = torch.zeros_like(g)
            torch._fused_adamw_(
                [delta], [g], [m], [v], [], [step_tensor(step, g.device)],
                lr=-lr, beta1=beta1, beta2=beta2, weight_decay=0.0, eps=eps, amsgrad=False, maximize=False,
            )  # fmt: skip
        else:
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            if self.eps_before_correction:
                delta = (m / v.sqrt().add_(self.eps)).mul_(lr * bias_correction2**0.5 / bias_correction1)
            else:
                delta = (m / (v.sqrt() / bias_correction2**0.5).add_(self.eps)).mul_(lr / bias_correction1)
        storage.store(state, "exp_avg", m)
        storage.store(state, "exp_avg_sq", v)
        return delta


_FUSED_DEVICES = ("cpu", "cuda", "meta", "mps", "xpu")
FUSED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)  # torch's fused AdamW kernel
_STEPS: dict = {}


def _fusable(*tensors: torch.Tensor) -> bool:
    """Whether torch's fused AdamW kernel can take these tensors: one floating dtype, a
    device it supports, contiguous, outside torch.compile (whose graphs keep the arithmetic)."""
    first = tensors[0]
    return (
        first.device.type in _FUSED_DEVICES
        and first.dtype in FUSED_DTYPES
        and all(t.dtype == first.dtype and t.device == first.device and t.is_contiguous() for t in tensors)
        and not torch.compiler.is_compiling()
    )


def step_tensor(step: int, device: torch.device) -> torch.Tensor:
    """``step`` as the 0-d fp32 tensor the fused kernel reads (and never writes), shared by
    every stack at that step on that device: filled once per optimizer step (the weights'
    step and the online-PCA bases' step), as :func:`forget_step_tensors` starts each anew."""
    key = (device, step)
    if key not in _STEPS:
        if len(_STEPS) >= 8:  # updates driven without optimizer.step() (osd.Layerwise)
            _STEPS.clear()
        _STEPS[key] = torch.full((), float(step), device=device)
    return _STEPS[key]


def forget_step_tensors() -> None:
    """Drop the cached step tensors (the optimizers call it at the start of each step, so
    what a step dispatches does not depend on what ran before it)."""
    _STEPS.clear()


class _LrStepSize:
    def step_size(self, lr, step):
        """The factor between the update and its normalised direction: the learning rate."""
        return lr


@dataclass(frozen=True)
class Lion(_LrStepSize):
    """Lion (Chen et al. 2023): ``sign(beta1 m + (1 - beta1) g)``, then ``m <- lerp(m, g, 1 - beta2)``."""

    betas: tuple[float, float] = (0.9, 0.99)
    moments = (("exp_avg",), ())
    elementwise = True
    scales_with_lr = True

    def init(self, shape, device, storage: Storage = FP32, dtype=torch.float32):
        return storage.zeros("exp_avg", shape, device, signed=True, dtype=dtype)

    def update(self, g, state, lr, step, storage: Storage = FP32, shard: Whole = WHOLE):
        beta1, beta2 = self.betas
        m = storage.load(state, "exp_avg")
        delta = torch.lerp(m, g, 1 - beta1).sign_().mul_(lr)
        m.lerp_(g, 1 - beta2)
        storage.store(state, "exp_avg", m)
        return delta


@dataclass(frozen=True)
class Adafactor(_LrStepSize):
    """Adafactor as in ``transformers.optimization.Adafactor`` with ``relative_step=False``,
    ``scale_parameter=False``, ``warmup_init=False``: factored second moment for matrices,
    update RMS clipped to ``clip_threshold``, optional first moment on the lr-scaled update.
    ``eps[1]`` only matters for parameter scaling, which is off; it is kept for parity of
    signatures. Shapes are stacks: ``(k, *tensor_shape)``; tensors of 2 or more dims are
    factored over their last two.
    """

    beta1: float | None = None
    decay_rate: float = -0.8
    eps: tuple[float, float] = (1e-30, 1e-3)
    clip_threshold: float = 1.0
    moments = (("exp_avg",), ())  # the factored second moment is not carried across bases
    elementwise = False  # factored moments and update clipping reduce over each tensor
    scales_with_lr = False  # its first moment accumulates lr-scaled updates

    def init(self, shape, device, storage: Storage = FP32, dtype=torch.float32):
        shape = tuple(shape)
        state = {}
        if len(shape) >= 3:
            state["exp_avg_sq_row"] = torch.zeros(shape[:-1], device=device, dtype=dtype)
            state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:], device=device, dtype=dtype)
        else:
            state["exp_avg_sq"] = torch.zeros(shape, device=device, dtype=dtype)
        if self.beta1 is not None:
            state.update(storage.zeros("exp_avg", shape, device, signed=True, dtype=dtype))
        return state

    def update(self, g, state, lr, step, storage: Storage = FP32, shard: Whole = WHOLE):
        beta2t = 1.0 - math.pow(step, self.decay_rate)
        sq = g.square().add_(self.eps[0])
        if "exp_avg_sq_row" in state:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            rows_sharded = shard.sharded and g.dim() == 3  # the factored rows are this rank's
            row.mul_(beta2t).add_(sq.mean(dim=-1), alpha=1 - beta2t)
            if rows_sharded:
                col.mul_(beta2t).add_(shard.sum(sq.sum(dim=-2)).div_(shard.m), alpha=1 - beta2t)
                row_mean = shard.sum(row.sum(dim=-1, keepdim=True)).div_(shard.m)
            else:
                col.mul_(beta2t).add_(sq.mean(dim=-2), alpha=1 - beta2t)
                row_mean = row.mean(dim=-1, keepdim=True)
            r_factor = (row / row_mean).rsqrt_().unsqueeze(-1)
            c_factor = col.unsqueeze(-2).rsqrt()
            delta = torch.mul(r_factor, c_factor).mul_(g)
        else:
            v = state["exp_avg_sq"]
            v.mul_(beta2t).add_(sq, alpha=1 - beta2t)
            delta = v.rsqrt().mul_(g)
        dims = _per_tensor_dims(delta)
        rms = shard.norm(delta, dim=dims, keepdim=True) / math.sqrt(shard.numel(delta))
        delta.div_((rms / self.clip_threshold).clamp_(min=1.0)).mul_(lr)
        if self.beta1 is not None:
            m = storage.load(state, "exp_avg")
            m.mul_(self.beta1).add_(delta, alpha=1 - self.beta1)
            storage.store(state, "exp_avg", m)
            delta = m  # callers never modify a returned delta in place
        return delta


@dataclass(frozen=True)
class SGD(_LrStepSize):
    """Plain gradient descent, no state (the online-PCA reference's ``continuous_sgd``)."""

    moments = ((), ())
    elementwise = True
    scales_with_lr = True

    def init(self, shape, device, storage: Storage = FP32, dtype=torch.float32):
        return {}

    def update(self, g, state, lr, step, storage: Storage = FP32, shard: Whole = WHOLE):
        return g * lr


Rule = Adam | Lion | Adafactor | SGD
