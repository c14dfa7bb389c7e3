"""The optimizers: one shell that composes a projector with an update rule.

For a parameter W in a *subspace group* (a param group with the key ``rank``), one step is::

    G  = grad as an m x n fp32 matrix          (tensors of more dims: rows x the rest)
    projector.before_update(G)                 (SVD / random refresh, or PCA init at step 0)
    R  = project(G)                            (r x n, m x r or r x r; osd.projectors)
    D  = rule(R, state, lr)                    (Adam / Lion / Adafactor in the subspace)
    W <- W (1 - lr wd) - scale * project_back(D)
    projector.after_update(G)                  (online PCA: one step on P)

A *plain group* (no ``rank``) runs the same rule in full space with no projection: plain
``osd.AdamW`` is ``torch.optim.AdamW``, ``osd.Lion`` the Lion paper's update and
``osd.Adafactor`` ``transformers`` Adafactor with a fixed lr.

Weight decay is decoupled and applied to W in full space BEFORE the update, as
``torch.optim.AdamW`` does. GaLore and the OSD reference apply it after; the difference
per step is ``lr^2 * wd * update``, far below training noise.

Adam's eps: plain groups add it after bias correction (torch.optim.AdamW), subspace groups
before (GaLore and the OSD reference); see :class:`osd.rules.Adam`.

State dtypes: subspace moments and bases are fp32 (all projection maths is fp32, also for
bf16 weights); plain-group moments take the parameter's dtype, as in torch.optim.AdamW;
8-bit storage (``AdamW8bit``) keeps moments as uint8 codes + fp32 block scales. ``step``
is a Python int. ``state_dict()`` holds tensors and Python scalars only and loads with
``torch.load(weights_only=True)``.

When NOT to use a subspace group: for vectors, embeddings and the output head (use
:func:`osd.param_groups`, which leaves them plain), and for small models where optimizer
state is not the memory bottleneck: full-rank AdamW trains better per step.
"""

from __future__ import annotations

import torch

from osd import projectors, storage
from osd.rules import SGD as SGDRule
from osd.rules import Adafactor as AdafactorRule
from osd.rules import Adam, Rule
from osd.rules import Lion as LionRule
from osd.storage import EIGHT_BIT, FP32


class SubspaceOptimizer(torch.optim.Optimizer):
    """Base class: subclasses say which rule a group uses (:meth:`rule`) and which storage
    holds state (``storage``)."""

    storage = FP32

    def rule(self, group: dict) -> Rule:
        raise NotImplementedError

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        # lr_0 of the online-PCA rule proj_lr = (1/T) * lr_t / lr_0; torch's schedulers use
        # the same key (and setdefault it the same way).
        group.setdefault("initial_lr", group["lr"])
        if "rank" in group:
            names = group.get("param_names") or [
                f"#{i} (shape {tuple(p.shape)})" for i, p in enumerate(group["params"])
            ]
            projectors.check_group(group, names)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            rule = self.rule(group)
            projector = projectors.from_group(group) if "rank" in group else None
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if projector is None:
                    self._plain_step(p, group, rule)
                else:
                    self._subspace_step(p, group, rule, projector, seed=index)
        return loss

    def _plain_step(self, p, group, rule, grad=None):
        state = self.state[p]
        if not state:
            dtype = p.dtype if self.storage is FP32 else torch.float32
            state["step"] = 0
            state.update(rule.init(p.shape, p.device, self.storage, dtype))
        state["step"] += 1
        g = p.grad if grad is None else grad
        g = g if self.storage is FP32 else g.float()
        lr = group["lr"]
        delta = rule.update(g, state, lr, state["step"], self.storage)
        _apply(p, delta, lr, group.get("weight_decay", 0.0))

    def _subspace_step(self, p, group, rule, projector, seed):
        g = _matrix(p.grad)
        self._refresh(p, g, group, projector, seed)
        r = projectors.project(g, self.state[p])
        self._subspace_update(p, r, group, rule, projector, g, r)

    def _refresh(self, p, g, group, projector, seed):
        """Start a step: let the projector (re)build the bases from the gradient ``g``."""
        state = self.state[p]
        m, n = g.shape
        sides = projectors.resolve_sides(group["side"], m, n)
        rank = projectors.effective_rank(group["rank"], m, n, sides)
        old = _bases(state)
        projector.before_update(g, state, state.setdefault("step", 0), rank, sides, seed)
        if group["transport"] and state["step"] > 0:
            projectors.transport(state, old, self.rule(group).moments, self.storage)

    def _subspace_update(self, p, r, group, rule, projector, g, g_projected):
        """Finish a step from the projected gradient ``r``. The projector's own update sees
        the gradient ``g`` and its projection (the same as ``r`` unless accumulating)."""
        state = self.state[p]
        step = state["step"]
        if step == 0:
            state.update(rule.init(r.shape, r.device, self.storage))
        lr = group["lr"]
        delta = rule.update(r, state, lr, step + 1, self.storage)
        update = projectors.project_back(delta, state).mul_(group["scale"])
        _apply(p, update.view(p.shape), lr, group.get("weight_decay", 0.0))
        old = _bases(state)
        projector.after_update(g, g_projected, state, step, lr / group["initial_lr"])
        if group["transport"]:
            projectors.transport(state, old, rule.moments, self.storage)
        state["step"] = step + 1

    def state_bytes(self, group: int | None = None) -> int:
        """Bytes of optimizer state (moments, bases, the bases' own optimizer state) held for
        all groups, or for ``param_groups[group]``."""
        groups = self.param_groups if group is None else [self.param_groups[group]]
        return sum(
            storage.nbytes(v)
            for g in groups
            for p in g["params"]
            for v in self.state.get(p, {}).values()
            if torch.is_tensor(v)
        )

    def state_dict(self):
        sd = super().state_dict()
        sd["state"] = {k: storage.pack(v) for k, v in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict):
        # torch casts every state tensor to its parameter's dtype on load, which would turn
        # fp32 subspace state of bf16 weights into bf16; load the groups through torch and
        # the state ourselves, moving tensors to the parameter's device only.
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        params = [p for g in self.param_groups for p in g["params"]]
        for index, param_state in state_dict["state"].items():
            p = params[int(index)]
            self.state[p] = storage.unpack(param_state, p.device)


def _bases(state):
    return {k: state[k] for k in (projectors.ROWS, projectors.COLS) if k in state}


def _matrix(grad):
    """A gradient as the fp32 m x n matrix the projectors work on (rows x the rest)."""
    return grad.reshape(grad.shape[0], -1).float()


def _apply(p, update, lr, weight_decay):
    if weight_decay:
        p.mul_(1 - lr * weight_decay)
    p.sub_(update.to(p.dtype))


class AdamW(SubspaceOptimizer):
    """AdamW; subspace groups keep m and v in the rank-r subspace.

    State of an m x n matrix with rank r (fp32): full rank ``2mn``; subspace
    ``2 max(m,n) r`` moments + ``min(m,n) r`` basis (+ ``2 min(m,n) r`` for the online-PCA
    AdamW on the basis)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        _check_hparams(lr=lr, eps=eps, weight_decay=weight_decay, betas=betas)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def rule(self, group):
        # subspace groups follow GaLore / the OSD reference, plain groups torch.optim.AdamW
        return Adam(tuple(group["betas"]), group["eps"], eps_before_correction="rank" in group)


class AdamW8bit(AdamW):
    """:class:`AdamW` with both moments stored in 8 bits (torchao block-wise quantisation,
    block 256; tensors under 4096 elements stay fp32). Same maths, about 1/4 of the state."""

    storage = EIGHT_BIT


class Lion(SubspaceOptimizer):
    """Lion (Chen et al. 2023): ``W <- W - lr (sign(b1 m + (1-b1) g) + wd W)``; one moment."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        _check_hparams(lr=lr, weight_decay=weight_decay, betas=betas)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    def rule(self, group):
        return LionRule(tuple(group["betas"]))


class Adafactor(SubspaceOptimizer):
    """Adafactor with a fixed learning rate (``transformers`` Adafactor with
    ``relative_step=False, scale_parameter=False, warmup_init=False``): factored second
    moment, update clipping, optional first moment ``beta1``."""

    def __init__(
        self,
        params,
        lr=1e-3,
        beta1=None,
        decay_rate=-0.8,
        eps=(1e-30, 1e-3),
        clip_threshold=1.0,
        weight_decay=0.0,
    ):
        _check_hparams(lr=lr, weight_decay=weight_decay)
        defaults = dict(
            lr=lr,
            beta1=beta1,
            decay_rate=decay_rate,
            eps=tuple(eps),
            clip_threshold=clip_threshold,
            weight_decay=weight_decay,
        )
        super().__init__(params, defaults)

    def rule(self, group):
        return AdafactorRule(group["beta1"], group["decay_rate"], tuple(group["eps"]), group["clip_threshold"])


class SGD(SubspaceOptimizer):
    """Plain SGD without momentum (a baseline; subspace groups project the gradient)."""

    def __init__(self, params, lr=1e-3, weight_decay=0.0):
        _check_hparams(lr=lr, weight_decay=weight_decay)
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    def rule(self, group):
        return SGDRule()


def _check_hparams(lr, weight_decay, eps=0.0, betas=(0.0, 0.0)):
    if not lr >= 0:
        raise ValueError(f"invalid learning rate {lr!r}: must be >= 0")
    if not weight_decay >= 0:
        raise ValueError(f"invalid weight_decay {weight_decay!r}: must be >= 0")
    if not eps >= 0:
        raise ValueError(f"invalid eps {eps!r}: must be >= 0")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"invalid betas {betas!r}: two numbers in [0, 1)")
