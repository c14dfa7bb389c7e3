"""Stacks: how the optimizers batch same-shape tensors into one set of ops.

A step groups the parameters of a param group into *stacks*: tensors with the same shape,
dtype, device and step count. Everything a step computes for a stack runs as batched ops
(``bmm``/``baddbmm``, element-wise ops on a ``k x ...`` tensor, ``torch._foreach_*`` on the
parameters), so the number of ops a step dispatches does not grow with the number of
matrices, and nothing reads a tensor's value on the host. A lone parameter (per-layer
updates in backward) is a stack of one: the same code, on a view.

Per-parameter state stays per parameter (``optimizer.state[p]``, the keys of
``state_dict()``) but lives in stacked storage: each parameter's state tensor is the i-th
slice of one ``k x ...`` tensor, so a step reads the stack without copying it
(:func:`stack_state`). Stacks are rebuilt (one copy) only when the members change: after
``load_state_dict``, or when a parameter of the stack got no gradient.

``max_stack_bytes`` (a param-group option, default :data:`MAX_STACK_BYTES` on every device)
bounds the temporaries a stack allocates: the stacked gradients (``k m n`` elements, into
whose buffer the update goes once the projector has taken its products of them) are split
into stacks of at most that many bytes of fp32 gradient. On a CPU stacks of at most 30 MiB
can be faster (glibc maps larger fresh allocations anew, and they page-fault on every step;
README, "Optimizer step"), at the price of more ops per step.
"""

from __future__ import annotations

import torch

MAX_STACK_BYTES = 512 * 2**20  # llama_350m's largest stack (24 x 2736 x 1024 fp32) fits whole
# A lone plain tensor larger than this (an embedding, an output head) is updated in chunks of
# this many values by the elementwise rules, so no temporary of its update (the fp32
# gradient, dequantised 8-bit moments, the update) exceeds 4 MB, and all of a chunk's
# together about 25 MB (osd.memory.PLAIN_TEMPORARIES; the bound for one update is
# 64 MB): a multiple of the 8-bit block size. The same for an 8-bit subspace rule's projected
# gradient (osd.optim.SubspaceOptimizer._subspace_rule).
CHUNK_ELEMENTS = 1 << 20


def stack_state(states: list[dict]) -> dict:
    """The members' state as one dict of stacked tensors whose slices ARE the members'
    tensors (in-place changes to the stack change each member's state). Non-tensor entries
    (an 8-bit moment's ``signed`` flag) are taken from the first member."""
    out = {}
    for key, value in states[0].items():
        if not torch.is_tensor(value):
            out[key] = value
        elif len(states) == 1:
            out[key] = value.unsqueeze(0)
        else:
            out[key] = _stacked([s[key] for s in states], states, key)
    return out


def _stacked(ts: list[torch.Tensor], states: list[dict], key: str) -> torch.Tensor:
    base = ts[0]._base
    if (
        base is not None
        and base.shape[0] == len(ts)
        and base.shape[1:] == ts[0].shape
        and all(
            t._base is base and t.storage_offset() == base.storage_offset() + i * base.stride(0)
            for i, t in enumerate(ts)
        )
    ):
        return base
    stack = torch.stack(ts)
    for state, view in zip(states, stack.unbind(0), strict=True):
        state[key] = view
    return stack


def add_new_state(states: list[dict], stacked: dict) -> None:
    """Give each member its slice of the entries created in ``stacked`` since
    :func:`stack_state` (state initialisation)."""
    for key, value in stacked.items():
        if key in states[0]:
            continue
        if torch.is_tensor(value):
            for state, view in zip(states, value.unbind(0), strict=True):
                state[key] = view
        else:
            for state in states:
                state[key] = value


def put(stacked: dict, key: str, value: torch.Tensor) -> None:
    """Write ``value`` into the stacked state entry ``key`` (in place when it exists)."""
    if key in stacked:
        stacked[key].copy_(value)
    else:
        stacked[key] = value


def stack_grads(grads: list[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The gradients as one ``k x *shape`` tensor of ``dtype`` (a view for a stack of one
    of the right dtype, else one copy)."""
    if len(grads) == 1:
        return grads[0].reshape((1,) + shape).to(dtype)
    if all(g.dtype == dtype for g in grads):
        return torch.stack([g.view(shape) for g in grads])
    out = torch.empty((len(grads),) + shape, dtype=dtype, device=grads[0].device)
    torch._foreach_copy_(list(out.unbind(0)), [g.view(shape) for g in grads])
    return out


def chunk_state(state: dict, start: int, stop: int, block: int) -> dict:
    """Views of a stack-of-one state for the flat values ``[start, stop)`` of its tensor:
    tensors with the tensor's values are sliced there, 8-bit block scales (``KEY.scale``)
    at ``[start / block, stop / block)``; other entries are passed as they are."""
    out = {}
    for key, value in state.items():
        if not torch.is_tensor(value):
            out[key] = value
        elif key.endswith(".scale"):
            out[key] = value.view(1, -1)[:, start // block : stop // block]
        else:
            out[key] = value.view(1, -1)[:, start:stop]
    return out


def split(items: list, nbytes_each: int, max_bytes: int) -> list[list]:
    """``items`` in consecutive chunks of at most ``max_bytes`` (at least one item each)."""
    size = max(1, max_bytes // max(1, nbytes_each))
    return [items[i : i + size] for i in range(0, len(items), size)]


def apply(params: list[torch.Tensor], updates: torch.Tensor, lr: float, weight_decay: float, alpha: float = -1.0):
    """``p <- p (1 - lr wd) + alpha * u`` for every parameter and its slice of ``updates``
    (decoupled weight decay first, as torch.optim.AdamW)."""
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    updates = updates.to(params[0].dtype).view((len(params),) + params[0].shape)
    torch._foreach_add_(params, list(updates.unbind(0)), alpha=alpha)


def lerp(params: list[torch.Tensor], targets: torch.Tensor, weight: float):
    """``p <- p + weight (t - p)`` for every parameter and its slice of ``targets``: decoupled
    weight decay and the update in one pass over the weights, when the update is folded
    into ``targets`` (the subspace step scales its small ``r x k`` update for it)."""
    targets = targets.to(params[0].dtype).view((len(params),) + params[0].shape)
    torch._foreach_lerp_(params, list(targets.unbind(0)), weight)
