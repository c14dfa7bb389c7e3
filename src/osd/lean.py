"""Lean activations for LLaMA: RMSNorm and the SwiGLU MLP with fewer saved tensors, and the
output head's loss in chunks.

Hugging Face's ``LlamaRMSNorm`` and ``LlamaMLP`` are plain compositions of torch ops, so
autograd keeps what each op needs, per token of hidden size h and MLP width i:

* RMSNorm keeps an fp32 copy of its input (4h bytes), the normalised input in the input's
  dtype (e h) and 1 / rms (4): the fp32 copy costs twice a bf16 hidden state;
* the MLP keeps gate, silu(gate), up and their product (4 e i).

:func:`apply` gives those modules a custom autograd function each, with the same forward
values, bit for bit (the same ops in the same order):

* RMSNorm keeps its input and 1 / rms (e h + 4), and recomputes the normalised input in
  backward: 4 h bytes less per token and norm (in bf16, a third of what a norm kept);
* the MLP keeps gate and up and recomputes silu(gate) in backward: e i less per token
  (a quarter of the MLP's activations); its backward makes up's gradient in up's buffer,
  so it allocates one i-wide temporary besides gate's gradient instead of three.

Backward computes what autograd computes through the original ops, in the same dtypes
(the MLP: ``silu_backward`` of ``grad * up``, ``grad * silu(gate)``; the norm: the input
gradient in fp32, as autograd's fp32 ops do), so gradients agree to rounding
(``tests/test_lean.py``). At LLaMA-7B, batch 16 x 256, in bf16: 0.13 GB less per decoder
layer whose activations are kept (32 layers without activation checkpointing: 4.3 GB;
with it, the one layer recomputed at a time) and 0.07 GB less for the final norm.

:func:`chunked_cross_entropy` is the trainer's output head and loss in chunks of token
positions (``osd-train --loss_chunk``), with the gradients made in forward: one chunk's
logits at a time, and one buffer for the head's gradient.

Only ``transformers``' LLaMA classes are changed (by class, so checkpoints, ``state_dict``
and ``save_pretrained`` are unaffected), and the MLP only with the SiLU activation. The
trainer applies it to every model it builds (``osd-train``, ``osd.models.build_model``;
``osd-glue``'s encoders are not LLaMA).
"""

from __future__ import annotations

import functools

import torch
from torch.nn import functional as F


class RMSNormFunction(torch.autograd.Function):
    """``weight * (x / rms(x))`` as ``transformers``' ``LlamaRMSNorm`` computes it, saving
    ``x`` and ``1 / rms`` only."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.to(torch.float32)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(torch.float32) * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:  # autograd's: the product in the output dtype, summed
            reduced = tuple(range(grad.dim() - weight.dim()))
            grad_weight = (grad * normed.to(x.dtype)).sum(reduced).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = (grad * weight).to(torch.float32)
            grad_x = (g - normed * (g * normed).mean(-1, keepdim=True)).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, None


class SwiGLUFunction(torch.autograd.Function):
    """``silu(gate) * up``, saving ``gate`` and ``up`` only (silu(gate) is recomputed).
    Backward overwrites ``up`` with its gradient: for the MLP's own projections, which no
    one else holds (not for tensors a caller keeps)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        # autograd's values with one i-wide temporary instead of three: grad * up, which
        # silu_backward overwrites with gate's gradient; up's gradient, silu(gate) * grad,
        # goes into up's own buffer, which nothing needs after this (a second backward
        # through the same graph raises autograd's in-place error instead)
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:
            grad_gate = grad * up
            torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        if ctx.needs_input_grad[1]:
            grad_up = torch.ops.aten.silu.out(gate, out=up).mul_(grad)
        return grad_gate, grad_up


class ChunkedCrossEntropy(torch.autograd.Function):
    """The summed next-token cross-entropy of ``hidden @ weight.T`` (an output head without
    bias) over the targets that are not -100, ``chunk`` rows of ``hidden`` at a time, with
    the gradients made in forward (as Liger-Kernel's fused linear cross-entropy does): each
    chunk's logits exist once, in fp32 (the softmax and its gradient are made over them in
    place), and the head's gradient is one buffer the chunks add into. What stays until
    backward is that buffer and the input's gradient, not the logits; backward only scales
    them by the loss's incoming gradient. Computes in ``weight``'s dtype, or autocast's
    when forward runs under it."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, dtype):
        grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        w = weight.to(dtype)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if grads else None
        grad_weight = torch.zeros_like(weight) if grads else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk].to(dtype)
            target = targets[start : start + chunk]
            valid = target != -100
            target = torch.where(valid, target, 0)[:, None]
            logits = torch.mm(h, w.mT).float()
            picked = logits.gather(1, target)[:, 0]
            peak = logits.amax(1, keepdim=True)
            exp = logits.sub_(peak).exp_()  # the logits' buffer from here on
            total = exp.sum(1, keepdim=True)
            lse = peak[:, 0] + total[:, 0].log()
            loss += torch.where(valid, lse - picked, 0).sum()
            if grads:  # softmax - one-hot, zero where ignored
                softmax = exp.div_(total)
                softmax.scatter_add_(1, target, valid[:, None].to(softmax.dtype).neg())
                g = softmax.mul_(valid[:, None]).to(dtype)
                del softmax, exp, logits
                grad_hidden[start : start + chunk] = torch.mm(g, w)
                if grad_weight.dtype == dtype:
                    grad_weight.addmm_(g.mT, h)
                else:  # autocast's fp32 master weights
                    grad_weight += torch.mm(g.mT, h)
                del g  # not alive beside the next chunk's logits
        ctx.grads = (grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.grads
        del ctx.grads  # the buffers are handed on (AccumulateGrad keeps a sole reference)
        grad_hidden = grad_hidden.mul_(grad_loss) if ctx.needs_input_grad[0] else None
        grad_weight = grad_weight.mul_(grad_loss) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
    """``F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")`` for
    ``hidden`` (tokens x h) and ``targets`` (tokens, -100 ignored), ``chunk`` tokens at a
    time (:class:`ChunkedCrossEntropy`): the same value and gradients to rounding, with one
    chunk's logits alive at a time."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"chunk must be a positive number of token positions, got {chunk!r}")
    device = hidden.device.type
    if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
        return ChunkedCrossEntropy.apply(hidden, weight, targets, chunk, weight.dtype)
    with torch.autocast(device, enabled=False):
        return ChunkedCrossEntropy.apply(hidden, weight, targets, chunk, torch.get_autocast_dtype(device))


def _norm_forward(self, hidden_states):
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    return self.down_proj(SwiGLUFunction.apply(self.gate_proj(x), self.up_proj(x)))


@functools.cache
def _lean_classes() -> dict:
    """transformers' LLaMA class -> its lean subclass (made once, registered in this module
    so that they pickle by name)."""
    from transformers.models.llama import modeling_llama as llama

    out = {}
    for base, forward in ((llama.LlamaRMSNorm, _norm_forward), (llama.LlamaMLP, _mlp_forward)):
        name = "Lean" + base.__name__
        cls = type(name, (base,), {"forward": forward, "__module__": __name__, "__doc__": base.__doc__})
        globals()[name] = cls
        out[base] = cls
    return out


def apply(model: torch.nn.Module) -> int:
    """Give ``model``'s LLaMA RMSNorm and SiLU-MLP modules their lean autograd (in place);
    returns how many modules changed. Other modules, and models without LLaMA layers, are
    left as they are."""
    classes = _lean_classes()
    changed = 0
    for module in model.modules():
        lean = classes.get(type(module))
        if lean is None:
            continue
        if hasattr(module, "act_fn") and getattr(module.config, "hidden_act", None) != "silu":
            continue
        module.__class__ = lean
        changed += 1
    return changed
