"""Full-rank corrections: what a subspace update throws away, given back.

A subspace step updates W with ``scale * B D`` only: the residual of the gradient outside the
subspace, ``G - scale * B R`` (R the projected gradient), is dropped. A correction is a
full-space term added to the update, computed for a stack of matrices from the gradients,
their projection and the rule's update in the subspace, so it composes with every
projector (online PCA, SVD, random) and every rule (Adam, Lion, Adafactor, SGD). Selected
by the group option ``correction``:

* ``"none"``: GaLore / Online Subspace Descent (the default);
* ``"fira"`` (Chen et al. 2024, "Fira: Can We Achieve Full-rank Training of LLMs Under
  Low-rank Constraint?"): adds the residual ``G - scale B P`` (P the projected gradient; the
  references subtract the scaled back-projection), scaled per row (right projection), per
  column (left) or per matrix (both sides) by ``phi = ||D_hat|| / (||R|| + 1e-8)``, the norm
  of the rule's normalised update ``D_hat = D / step_size`` over the projected gradient's,
  then limited so its norm grows at most 1.01x per step (the norm-growth limiter), times the
  rule's step size. With the SVD projector and Adam this is ``pytorch_optimizer.Fira``
  (tested to 1e-5).
* ``"apollo"`` (Zhu et al. 2024, "APOLLO: SGD-like Memory, AdamW-level Performance"): the
  update is the whole gradient ``G`` scaled channel-wise by the same ``phi`` (limited the
  same way), times the step size and ``scale``, instead of ``scale B D``: the subspace only
  estimates the per-channel learning rates. The paper uses the random projector, rank 256,
  scale 1. ``pytorch_optimizer.APOLLO`` (4.1) differs from the paper and its official code:
  it scales the projected gradient and projects it back, a rank-r update.
* ``"apollo_mini"``: APOLLO with one scale per matrix (tensor-wise); the paper's APOLLO-Mini
  is this with rank 1 and scale sqrt(128) (its code multiplies by sqrt of its ``scale``).

All keep one fp32 number per matrix of state (the limited norm of the previous step).

Every function takes stacks (leading dimension k) and reads nothing on the host. Under
FSDP2's row shards a norm over the rows of a row-sharded tensor (the gradient, the term;
R and D when only the right side is projected) sums its squares over the ranks.
"""

from __future__ import annotations

import torch

from osd.projectors import COLS, CORRECTIONS, ROWS, project_back_add, projected_layout
from osd.shards import WHOLE, Whole

__all__ = ["CORRECTIONS", "update"]
LIMIT = 1.01  # Fira's norm-growth limit per step
NORM_KEY = "correction_norm"


def _ratio_dims(bases: dict) -> tuple[int, ...]:
    """Where Fira's norm ratio is taken: per row of a right projection (R is k x m x r),
    per column of a left one (k x r x n), per matrix when both sides are projected."""
    if ROWS in bases and COLS in bases:
        return (-2, -1)
    return (-1,) if COLS in bases else (-2,)


def update(
    kind: str,
    g: torch.Tensor,
    g_projected: torch.Tensor,
    r: torch.Tensor,
    delta: torch.Tensor,
    step_size: float,
    bases: dict,
    scale: float,
    state: dict,
    shard: Whole = WHOLE,
    alpha: float = 1.0,
    micro_batches: int = 1,
    in_place: bool = False,
) -> torch.Tensor:
    """``alpha`` times the full-space update of a stack (``W <- W - update``, before weight
    decay), in ``g``'s dtype, for the correction ``kind``; it replaces the plain
    ``scale * B delta``. ``g_projected`` is the projection of ``g``, ``r`` what the rule saw
    (the same unless accumulating), ``delta`` the rule's update of ``r`` and
    ``step_size`` its factor over the normalised direction (``rule.step_size``). Creates or
    updates ``state[NORM_KEY]``, but at a step of learning rate 0, where the rule's update
    says nothing of its direction (the references read the direction before the learning
    rate; the difference: the limiter's first norm comes from the next step).

    ``micro_batches``: ``g`` is the last of this many micro-batches whose projections ``r``
    sums (``osd.Layerwise`` accumulating without full gradients), so the base (the residual,
    or APOLLO's gradient) of the sum is estimated as ``micro_batches`` times ``g``'s.

    The term is never materialised in fp32: its norm (for the limiter) comes from the
    channel norms of its base (``||base * phi||^2 = sum phi^2 ||base channel||^2``), and
    the base (a new tensor for Fira, ``G - scale B P`` in one ``baddbmm``) is scaled in
    place, then the subspace update is added to it (Fira): the update allocates one
    ``m x n`` tensor in ``g``'s dtype, as an update without a correction, and a few fp32
    numbers per row or column (``osd.memory.CORRECTION_TEMPORARIES``). With ``in_place``
    (``g`` is the caller's to lose) the update is made in ``g``'s buffer: no m x n tensor."""
    if step_size == 0:  # lr 0 (a warmup's first step): no update, and no ratio to take
        return g.zero_() if in_place else torch.zeros_like(g)
    dims = _ratio_dims(bases) if kind != "apollo_mini" else (-2, -1)
    if kind == "fira":
        base = project_back_add(g, g_projected.to(g.dtype), bases, -scale, 1.0 if in_place else None)
    else:  # APOLLO: the whole gradient, scaled channel-wise or tensor-wise (and by scale)
        base, alpha = g, alpha * scale
    r_rows = projected_layout(shard, bases)
    # phi times the step size: the rule's update over the projected gradient, per channel
    phi = r_rows.norm(delta, dim=dims, keepdim=True, dtype=torch.float32)
    phi.div_(r_rows.norm(r, dim=dims, keepdim=True, dtype=torch.float32).add_(1e-8))
    if micro_batches != 1:
        phi.mul_(micro_batches)
    # the term's norm (times the step size); channels over rows are complete on every rank
    channels = shard.norm(base, dim=dims, keepdim=True, dtype=torch.float32).mul_(phi)
    norm = (WHOLE if -2 in dims else shard).norm(channels, dim=(-2, -1))
    if NORM_KEY in state:  # Fira's norm-growth limiter: the norm grows at most LIMIT-fold
        previous = state[NORM_KEY]
        limiter = torch.div(norm, previous + 1e-8).clamp_(min=LIMIT * step_size)  # LIMIT step_size x
        torch.div(norm, limiter, out=previous).mul_(LIMIT)
        phi.div_(limiter.view(-1, 1, 1))
        beta = alpha * LIMIT * step_size
    else:
        state[NORM_KEY] = norm.div_(step_size)
        beta = alpha
    if kind == "fira":  # beta (base phi) + alpha scale B delta
        return project_back_add(base.mul_(phi), delta.to(g.dtype), bases, alpha * scale, beta)
    return torch.mul(base, phi, out=g if in_place else torch.empty_like(g)).mul_(beta)  # fp32 maths, g's dtype
