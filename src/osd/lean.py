"""Lean activations for LLaMA: RMSNorm and the SwiGLU MLP with fewer saved tensors.

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
  (a quarter of the MLP's activations).

Backward computes what autograd computes through the original ops, in the same dtypes
(the MLP: ``silu_backward`` of ``grad * up``, ``grad * silu(gate)``; the norm: the input
gradient in fp32, as autograd's fp32 ops do), so gradients agree to rounding
(``tests/test_lean.py``). At LLaMA-7B, batch 16 x 256, in bf16: 0.13 GB less per decoder
layer whose activations are kept (32 layers without activation checkpointing: 4.3 GB;
with it, the one layer recomputed at a time) and 0.07 GB less for the final norm.

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
    """``silu(gate) * up``, saving ``gate`` and ``up`` only (silu(gate) is recomputed)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


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
