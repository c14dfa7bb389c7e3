"""Per-layer (in-backward) updates that respect gradient accumulation.

:class:`Layerwise` wraps an osd optimizer so that each parameter is updated inside
backward, in its post-accumulate-grad hook, and its gradient freed at once: the full
gradients of the whole model never exist together (GaLore's per-layer mode, which its
authors use to fit 7B training in 24 GB).

Gradient accumulation over ``accumulation_steps`` micro-batches, without full gradients:

* subspace parameters project each micro-batch gradient with the current bases and add it
  to an ``r x k`` accumulator (the ``accum`` state tensor), freeing the ``m x n`` gradient
  at once; at the last micro-batch the rule runs on the summed projection. Because
  projection is linear this equals ordinary accumulation exactly while the bases stay fixed.
  The projector update needs a full gradient, so it uses one micro-batch: an SVD refresh
  (every ``update_gap`` steps) is computed from the FIRST micro-batch gradient of that
  step, and the online-PCA step on P after the update from the LAST micro-batch gradient
  (the PCA loss normalises G, so its scale does not matter). Random bases need no gradient.
  A full-rank correction (Fira, the default; APOLLO) also needs the full gradient: it takes
  the last micro-batch's residual (APOLLO: gradient) times ``accumulation_steps`` for the
  sum's, an estimate.
* plain parameters (embeddings, norms, head) accumulate their full gradient in ``.grad``
  as usual and are updated, then freed, at the last micro-batch.

The wrapper is a ``torch.optim.Optimizer`` sharing ``param_groups`` and ``state`` with the
wrapped optimizer, so one LR scheduler drives it and ``state_dict``/``load_state_dict``
work as usual. ``step()`` marks the end of an optimizer step (the updates already happened
in backward) and checks that every parameter saw exactly ``accumulation_steps``
micro-batches.

Clipping: a global gradient norm needs every gradient at once, which is what this mode
avoids, so :meth:`Layerwise.clip_grad_norm_` raises. ``max_grad_norm`` clips per
parameter instead: the gradient the rule sees (the full accumulated gradient of a plain
parameter, the accumulated projection of a subspace one) is scaled to norm at most
``max_grad_norm``.

Under a Hugging Face ``transformers.Trainer``: Trainer clips after backward, when the
updates have already happened and the gradients are gone, so its clipping would silently do
nothing (and it logs ``grad_norm`` 0). The first :meth:`step` called from a Trainer
therefore raises ValueError unless ``TrainingArguments(max_grad_norm=0)`` (clip per
parameter with ``Layerwise(..., max_grad_norm=...)`` instead) and
``gradient_accumulation_steps`` equals ``accumulation_steps``.

Under FSDP2 (``fully_shard``) each shard is updated in its hook, which FSDP2 calls after
the reduce-scatter, with the reduced gradient of this rank's rows; per-parameter clipping
takes the norm over all ranks. Gradients must be reduce-scattered in every micro-batch
(FSDP2's default: leave ``set_requires_gradient_sync`` on), or the hooks fire once per
step and :meth:`step` says so. Not under DDP: its all-reduce completes after these hooks
fire, so they would see one rank's gradient (``osd-train`` refuses per-layer optimizers
under DDP).
"""

from __future__ import annotations

import torch

from osd import hf, projectors, shards
from osd.optim import SubspaceOptimizer


class Layerwise(torch.optim.Optimizer):
    def __init__(
        self,
        optimizer: SubspaceOptimizer,
        accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
    ):
        if not isinstance(optimizer, SubspaceOptimizer):
            raise TypeError(f"Layerwise wraps an osd optimizer, got {type(optimizer).__name__}")
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be a positive integer, got {accumulation_steps!r}")
        if getattr(optimizer, "_layerwise_hooks", False):
            raise ValueError("this optimizer is already wrapped by a Layerwise (its hooks would run twice)")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        # torch's __init__ resets param_groups and state (through the properties below, on
        # the wrapped optimizer); let it, on copies, then put the real ones back
        groups, state = optimizer.param_groups, optimizer.state
        super().__init__([dict(g) for g in groups], optimizer.defaults)
        optimizer.param_groups, optimizer.state = groups, state
        self._where = {}  # parameter -> its group's index
        self._seen = {}
        self._handles = []
        self._trainer_checked = False
        optimizer._layerwise_hooks = True
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                self._where[p] = gi
                self._seen[p] = 0
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._hook))

    # param_groups and state are the wrapped optimizer's (also after its load_state_dict,
    # which replaces the group dicts)
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value):
        self.optimizer.state = value

    @torch.no_grad()
    def _hook(self, p):
        self._seen[p] += 1
        if self._seen[p] > self.accumulation_steps:
            raise RuntimeError(
                f"backward number {self._seen[p]} since the last step() but accumulation_steps="
                f"{self.accumulation_steps}: call step() after every accumulation_steps backward passes "
                "(under transformers.Trainer, Layerwise's accumulation_steps must equal "
                "TrainingArguments(gradient_accumulation_steps))"
            )
        micro, last = self._seen[p], self._seen[p] == self.accumulation_steps
        group = self.param_groups[self._where[p]]
        opt = self.optimizer
        layout = shards.layout([p])
        if "rank" not in group:
            if last:
                opt.update([p], [self._clip(shards.local(p.grad), layout, in_place=True)])
                p.grad = None
            return
        g = opt.gradients([p], [p.grad])
        p.grad = None
        if micro == 1:
            opt.refresh([p], g)
        state = opt.state[p]
        g_projected = opt.project([p], g)
        r = state.pop("accum").add_(g_projected[0]).unsqueeze(0) if micro > 1 else g_projected
        if last:  # r holds this rank's rows when only the right side is projected
            # finish is handed the only reference to the clipped copy of r (accumulated, to r
            # itself, clipped in place), and frees it before P's step; the gradient is gone
            # from p.grad, so a correction may make its update in g's buffer
            clipped = [self._clip(r, projectors.projected_layout(layout, state), in_place=micro > 1)]
            del r
            opt.finish([p], clipped.pop(), g, g_projected, micro_batches=self.accumulation_steps, scratch=True)
        else:
            state["accum"] = r[0]

    def _clip(self, g, layout: shards.Whole = shards.WHOLE, in_place: bool = False):
        """``g`` scaled to norm at most ``max_grad_norm`` (decided on the device: no host read);
        ``g`` holds this rank's rows of a row-sharded ``layout``, whose norm sums over ranks.
        ``in_place`` for a gradient about to be freed (no copy of the output head's, or of an
        accumulated projection)."""
        if self.max_grad_norm is None:
            return g
        norm = layout.norm(g, dtype=torch.float32)
        factor = (self.max_grad_norm / norm).clamp(max=1.0).to(g.dtype)
        return g.mul_(factor) if in_place else g * factor

    def step(self, closure=None):
        """End of an optimizer step: the parameters were updated during backward."""
        if not self._trainer_checked:
            _check_trainer(hf.calling_trainer(), self.accumulation_steps)
            self._trainer_checked = True
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pending = [p for p, n in self._seen.items() if n not in (0, self.accumulation_steps)]
        if pending:
            counts = sorted({self._seen[p] for p in pending})
            raise RuntimeError(
                f"step() after {counts} micro-batch backward(s) but accumulation_steps="
                f"{self.accumulation_steps}: call backward accumulation_steps times per step (under FSDP2, "
                "with gradient sync on in every micro-batch: set_requires_gradient_sync(True))"
            )
        for p in self._seen:
            self._seen[p] = 0
        return loss

    def zero_grad(self, set_to_none: bool = True):
        """Gradients are freed in backward already; plain ones are cleared here too."""
        self.optimizer.zero_grad(set_to_none)

    def clip_grad_norm_(self, max_norm):
        raise RuntimeError(
            "global-norm gradient clipping is impossible with per-layer updates (the full "
            "gradients never exist together); use Layerwise(..., max_grad_norm=...) for "
            "per-parameter clipping"
        )

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.optimizer.load_state_dict(state_dict)

    def state_bytes(self, group: int | None = None) -> int:
        return self.optimizer.state_bytes(group)

    def basis_updates_skipped(self) -> int:
        """The wrapped optimizer's count (see :meth:`SubspaceOptimizer.basis_updates_skipped`)."""
        return self.optimizer.basis_updates_skipped()

    def remove_hooks(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.optimizer._layerwise_hooks = False


def _check_trainer(trainer, accumulation_steps: int) -> None:
    """Refuse the ``transformers.Trainer`` settings that per-layer updates cannot honour."""
    args = getattr(trainer, "args", None)
    if args is None:
        return
    max_norm = getattr(args, "max_grad_norm", None) or 0
    if max_norm > 0:
        raise ValueError(
            f"osd.Layerwise under transformers.Trainer with TrainingArguments(max_grad_norm={max_norm}): "
            "Trainer clips gradients after backward, but Layerwise has already applied each update inside "
            "backward and freed its gradient, so this clipping would silently do nothing (and Trainer would "
            "log grad_norm 0). Pass TrainingArguments(max_grad_norm=0), and to clip, clip per parameter "
            f"with osd.Layerwise(optimizer, max_grad_norm={max_norm})"
        )
    micro = getattr(args, "gradient_accumulation_steps", 1)
    if micro != accumulation_steps:
        raise ValueError(
            f"osd.Layerwise(accumulation_steps={accumulation_steps}) under transformers.Trainer with "
            f"TrainingArguments(gradient_accumulation_steps={micro}): set both to the same number"
        )
