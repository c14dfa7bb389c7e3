"""Full-rank corrections: what a subspace update throws away, given back.

A subspace step updates W with ``scale * B D`` only: the residual of the gradient outside the
subspace, ``G - scale * B R`` (R the projected gradient), is dropped. A correction is a
full-space term added to the update, computed for a stack of matrices from the gradients,
their projection and the rule's update in the subspace, so it composes with every
projector (online PCA, SVD, random) and every rule (Adam, Lion, Adafactor, SGD). Selected
by the group option ``correction``:

* ``"none"``: GaLore / Online Subspace Descent (the default);
* ``"fira"`` (Chen et al. 2024, "Fira: Can We Achieve Full-rank Training of LLMs Under
  Low-rank Constraint?"): the residual scaled, per row (right projection), per column (left)
  or per matrix (both sides), by the norm ratio ``||D_hat|| / (||R|| + 1e-8)`` of the rule's
  normalised update ``D_hat = D / step_size`` to the projected gradient, then limited so its
  norm grows at most 1.01x per step (the norm-growth limiter), then multiplied by the rule's
  step size. With the SVD projector and Adam this is ``pytorch_optimizer.Fira`` (tested to
  1e-5). Its state: one fp32 number per matrix (the limited norm of the previous step).

Every function takes stacks (leading dimension k) and reads nothing on the host.
"""

from __future__ import annotations

import torch

from osd.projectors import COLS, CORRECTIONS, ROWS, project_back

__all__ = ["CORRECTIONS", "fira"]
LIMIT = 1.01  # Fira's norm-growth limit per step
NORM_KEY = "fira_norm"


def _ratio_dims(bases: dict) -> tuple[int, ...]:
    """Where Fira's norm ratio is taken: per row of a right projection (R is k x m x r),
    per column of a left one (k x r x n), per matrix when both sides are projected."""
    if ROWS in bases and COLS in bases:
        return (-2, -1)
    return (-1,) if COLS in bases else (-2,)


def fira(
    g: torch.Tensor,
    g_projected: torch.Tensor,
    r: torch.Tensor,
    delta: torch.Tensor,
    step_size: float,
    bases: dict,
    scale: float,
    state: dict,
) -> torch.Tensor:
    """Fira's term for a stack, in ``g``'s dtype: ``step_size * phi * (G - scale B P) / limiter``
    with ``P`` the projection of ``g`` (``g_projected``) and ``phi = ||delta / step_size|| /
    (||R|| + 1e-8)``, ``R`` what the rule saw (``r``: the same as ``P`` unless
    accumulating). Creates or updates ``state[NORM_KEY]`` (k fp32 norms)."""
    dims = _ratio_dims(bases)
    normalised = torch.linalg.vector_norm(delta, dim=dims, keepdim=True) / step_size
    phi = normalised / (torch.linalg.vector_norm(r.float(), dim=dims, keepdim=True) + 1e-8)
    residual = g - project_back(g_projected.to(g.dtype), bases) * scale
    term = residual.float().mul_(phi)
    norm = torch.linalg.vector_norm(term, dim=(-2, -1))
    if NORM_KEY in state:
        limiter = (norm / (state[NORM_KEY] + 1e-8)).clamp_(min=LIMIT) / LIMIT
        term.div_(limiter.view(-1, 1, 1))
        state[NORM_KEY].copy_(norm / limiter)
    else:
        state[NORM_KEY] = norm
    return term.mul_(step_size).to(g.dtype)
