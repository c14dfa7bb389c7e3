"""Projectors: how the rank-r bases of a weight matrix are chosen and kept up to date.

A matrix gradient ``G`` (m x n) is projected with up to two orthonormal bases stored in
the parameter's optimizer state::

    basis_rows  B_r  (m x r)    left side:   R = B_r^T G          (state r x n)
    basis_cols  B_c  (n x r)    right side:  R = G B_c            (state m x r)
    both sides:                              R = B_r^T G B_c      (state r x r)

and an update ``D`` in the subspace goes back as ``B_r D``, ``D B_c^T`` or ``B_r D B_c^T``.
Storing the right-side basis as ``B_c = P^T`` (n x r) lets both sides share one code path:
the right side of G is the left side of G^T.

Which side: ``auto`` is GaLore's "std" rule (m >= n -> right, else left), so the basis is
always (smaller dimension) x r; ``reverse_auto`` the opposite; ``left``, ``right``, ``both``.

Three projectors, selected by name in the param group (``projector=``), resolved here in
one place (:func:`from_group`):

* :class:`SVD` (GaLore): top-r singular vectors of the gradient, recomputed every
  ``update_gap`` steps. Cost O(mn min(m, n)) per refresh.
* :class:`Random`: orthonormalised Gaussian, redrawn every ``update_gap`` steps from a seed
  made of the step and the parameter's index, so data-parallel ranks agree.
* :class:`OnlinePCA` (Online Subspace Descent): initialised by SVD at the first step, then
  after every weight update one step of a small optimizer on the online-PCA loss
  ``L(B) = ||B B^T X - X||_F^2 + orth_reg ||B^T B - I||_F^2`` with ``X = G/||G||_F`` (left)
  or ``X = G^T/||G||_F`` (right). Cost O(mnr) per step. The gradient is computed in closed
  form (tests/test_projectors.py checks it against autograd)::

      C = B^T X,  Y = X C^T
      dL/dB = 2 (B (C C^T) + Y (B^T B) - 2 Y) + 4 orth_reg B (B^T B - I)

  ``C`` is the projected gradient divided by ``||G||``, so a one-sided step needs a single
  extra m x n x r matmul (``Y``).

Every function takes stacks of matrices (a leading dimension k). Bases are stored in the
group's ``basis_dtype`` (fp32 by default; ``bfloat16`` halves their memory), and all basis
maths is fp32 but the products with the gradient, which run in the group's ``proj_dtype``
(:func:`proj_dtype`); an online-PCA step on bf16 bases computes in fp32 and rounds the
result once.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import torch

from osd.engine import put
from osd.rules import SGD, Adafactor, Adam, Lion, Rule
from osd.shards import WHOLE, Whole
from osd.storage import EIGHT_BIT, FP32, Storage

SIDES = ("auto", "reverse_auto", "left", "right", "both")
ROWS, COLS = "basis_rows", "basis_cols"


def resolve_sides(side: str, m: int, n: int) -> tuple[bool, bool]:
    """(project rows?, project columns?) for an m x n matrix."""
    if side == "auto":
        return (m < n, m >= n)
    if side == "reverse_auto":
        return (m >= n, m < n)
    return (side in ("left", "both"), side in ("right", "both"))


def project(g: torch.Tensor, bases: dict, shard: Whole = WHOLE) -> torch.Tensor:
    """Project a (stack of) gradient(s): ``B_r^T G``, ``G B_c`` or ``B_r^T G B_c``. Bases are
    cast to ``g``'s dtype (the projection precision). Row shards (``shard``) sum ``B_r^T G``
    over the ranks (after the right product when both sides: r x r)."""
    if ROWS in bases:
        g = mm(bases[ROWS].to(g.dtype).mT, g)
    if COLS in bases:
        g = mm(g, bases[COLS].to(g.dtype))
    if ROWS in bases:
        g = shard.sum(g)
    return g


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b``; for two stacks ``torch.bmm``, which is one op where ``@`` on 3-d tensors
    adds a reshape copy (``_unsafe_view``)."""
    return torch.bmm(a, b) if a.dim() == 3 and b.dim() == 3 else a @ b


def projected_layout(shard: Whole, bases: dict) -> Whole:
    """The layout of a projected gradient (and of the rule's state and update): this rank's
    rows (``m_i x r``) when only the right side is projected, else whole (``r x n``, ``r x r``)."""
    return shard if ROWS not in bases else WHOLE


def _back_factors(d: torch.Tensor, bases: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The last product of projecting ``d`` back, as its two factors: ``(B_r, D)``,
    ``(D, B_c^T)`` or, both sides, ``(B_r D, B_c^T)``; bases cast to ``d``'s dtype."""
    if ROWS in bases and COLS in bases:
        return mm(bases[ROWS].to(d.dtype), d), bases[COLS].to(d.dtype).mT
    if ROWS in bases:
        return bases[ROWS].to(d.dtype), d
    return d, bases[COLS].to(d.dtype).mT


def project_back(d: torch.Tensor, bases: dict, out: torch.Tensor | None = None) -> torch.Tensor:
    """An update in the subspace back to full space: ``B_r D``, ``D B_c^T`` or both (into
    ``out``, a stack of ``d``'s dtype, when given)."""
    if out is not None:
        return torch.bmm(*_back_factors(d, bases), out=out)
    return mm(*_back_factors(d, bases))


def project_back_add(
    out: torch.Tensor, d: torch.Tensor, bases: dict, alpha: float, beta: float | None = None
) -> torch.Tensor:
    """``out + alpha * project_back(d, bases)`` for stacks (``k x ...``), the last product
    fused with the addition (``baddbmm``); with ``beta``, ``beta * out + ...`` in place."""
    left, right = _back_factors(d, bases)
    if beta is None:
        return torch.baddbmm(out, left, right, alpha=alpha)
    return out.baddbmm_(left, right, beta=beta, alpha=alpha)


SVD_METHODS = ("exact", "randomized")
CORRECTIONS = (
    "none",
    "fira",
    "apollo",
    "apollo_mini",
)  # osd.corrections (kept here: the group options are checked here)
OVERSAMPLE, POWER_ITERATIONS = 8, 2  # randomized SVD (Halko, Martinsson & Tropp 2011)


def _svd(g: torch.Tensor, full_matrices: bool = False):
    try:
        return torch.linalg.svd(g, full_matrices=full_matrices)
    except RuntimeError:  # ill-conditioned fp32 input: LAPACK/cuSOLVER may not converge
        u, s, vh = torch.linalg.svd(g.double(), full_matrices=full_matrices)
        return u.float(), s.float(), vh.float()


def _randomized_svd(g: torch.Tensor, rank: int):
    """The top ``rank`` singular triplets of every matrix of the stack ``g``, approximately:
    a Gaussian range finder with ``OVERSAMPLE`` extra columns and ``POWER_ITERATIONS``
    power iterations, then an exact SVD of the small ``q x n`` projection. The Gaussian
    matrix is drawn on the CPU from a fixed seed, so every rank and device gets the same
    bases from the same gradient (as the random projector's)."""
    m, n = g.shape[-2:]
    q = min(rank + OVERSAMPLE, m, n)
    omega = torch.randn(n, q, generator=torch.Generator().manual_seed(m * 1_000_003 + n)).to(g.device)
    y, _ = torch.linalg.qr(g @ omega)  # k x m x q
    for _ in range(POWER_ITERATIONS):
        z, _ = torch.linalg.qr(g.mT @ y)
        y, _ = torch.linalg.qr(g @ z)
    ub, s, vh = _svd(y.mT @ g)  # q x n: cheap
    return y @ ub, s, vh


def _svd_bases(
    g: torch.Tensor,
    rank: int,
    rows: bool,
    cols: bool,
    method: str = "exact",
    shard: Whole = WHOLE,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Top-``rank`` singular vectors of every matrix of the stack ``g`` (computed in fp32,
    stored in ``dtype``): an exact SVD,
    or ``method="randomized"`` (:func:`_randomized_svd`: O(mnr) instead of O(mn min(m,n))).
    Row shards gather ``g`` (every rank computes the same SVD) and keep their rows of the
    left basis.

    One matrix at a time: LAPACK and cuSOLVER decompose a batch of large matrices one by one
    anyway, and this way what the SVD allocates (the gathered fp32 gradient, U, S and Vh,
    several times the gradient) is one matrix's, not the stack's."""
    k, bases = g.shape[0], {}
    for i in range(k):
        x = shard.gather(g[i : i + 1]).float()
        if method == "randomized" and rank + OVERSAMPLE < min(x.shape[-2:]):
            u, _, vh = _randomized_svd(x, rank)
        else:
            u, _, vh = _svd(x)
        tops = {}
        if rows:
            tops[ROWS] = shard.rows(u[..., :rank])
        if cols:
            tops[COLS] = vh[..., :rank, :].mT
        for key, top in tops.items():
            if key not in bases:
                bases[key] = top.new_empty((k,) + top.shape[1:], dtype=dtype)
            bases[key][i : i + 1].copy_(top)
        del x, u, vh, tops
    return bases


class _Periodic:
    """A projector whose bases are rebuilt at steps 0, T, 2T, ... (``update_gap``) and stay
    fixed in between: no step of its own after an update."""

    def refreshes(self, step: int) -> bool:
        return step % self.update_gap == 0

    def prepare(self, g, projected, state, step, shard=WHOLE):
        return None

    def after_update(self, prepared, state, step, lr_ratio, shard=WHOLE):
        return None


@dataclass(frozen=True)
class SVD(_Periodic):
    """GaLore: bases = top-r singular vectors of G at steps 0, T, 2T, ..."""

    update_gap: int = 200
    svd: str = "exact"  # or "randomized"
    basis_dtype: torch.dtype = torch.float32
    from_gradient = True  # the refresh reads G (a non-finite G cannot give a basis)

    def refresh(self, g, state, step, rank, sides, seeds, shard=WHOLE):
        for key, basis in _svd_bases(g, rank, *sides, self.svd, shard, self.basis_dtype).items():
            put(state, key, basis)


@dataclass(frozen=True)
class Random(_Periodic):
    """Orthonormalised Gaussian bases, redrawn at steps 0, T, 2T, ... (deterministic in
    (seed, step), drawn on the CPU so every device and rank gets the same numbers)."""

    update_gap: int = 200
    basis_dtype: torch.dtype = torch.float32
    from_gradient = False

    def refresh(self, g, state, step, rank, sides, seeds, shard=WHOLE):
        draws = {ROWS: [], COLS: []}
        for seed in seeds:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
            for key, on, dim in ((ROWS, sides[0], shard.num_rows(g)), (COLS, sides[1], g.shape[-1])):
                if on:
                    draws[key].append(torch.randn(dim, rank, generator=gen))
        for key, gaussians in draws.items():
            if gaussians:
                q, _ = torch.linalg.qr(torch.stack(gaussians))
                # contiguous (QR returns column-major Q): the same layout as after a reload, so
                # a resumed run multiplies bit for bit as the uninterrupted one
                q = (shard.rows(q) if key == ROWS else q).contiguous()
                put(state, key, q.to(device=g.device, dtype=self.basis_dtype))


# P's own optimizer, by name: (rule, storage, default weight decay). The defaults are those
# of the reference code: torch.optim.AdamW (wd 0.01), bitsandbytes Adam8bit, lion-pytorch,
# transformers Adafactor with fixed lr, and SGD without momentum.
PROJ_OPTIMIZERS: dict[str, tuple[Rule, Storage, float]] = {
    "adamw": (Adam(), FP32, 0.01),
    "adam8bit": (Adam(), EIGHT_BIT, 0.0),
    "lion": (Lion(), FP32, 0.0),
    "adafactor": (Adafactor(), FP32, 0.0),
    "sgd": (SGD(), FP32, 0.0),
}


def pca_grad(
    basis: torch.Tensor,
    x: torch.Tensor,
    c: torch.Tensor | None = None,
    orth_reg: float = 0.0,
    x_scale_sq=1.0,
    shard: Whole = WHOLE,
    rows_sharded: bool = False,
):
    """Closed-form gradient of ``||B B^T X - X||_F^2 + orth_reg ||B^T B - I||_F^2`` in B,
    for ``X = s x`` with ``x_scale_sq`` = s^2 (so a normalised gradient needs no m x n copy),
    for a matrix or a stack (``x_scale_sq`` a number or one per matrix, shaped ``k x 1 x 1``):
    the loss's gradient only sees s^2. ``c`` may pass
    in ``B^T x`` when the caller already has it, in ``x``'s dtype or the basis's: the scale
    goes on the r-wide products, so no scaled copy of it is made. The products with ``x``
    (and ``C C^T`` with a 16-bit ``c``) run in ``x``'s dtype (the projection precision), the
    rest in the basis's (fp32).

    Row shards (``shard``): with ``rows_sharded`` the basis and ``x`` hold this rank's rows
    (a left basis), and ``B^T X`` and ``B^T B`` are sums over the ranks; otherwise ``x``
    holds this rank's columns (``x = G^T``, a right basis, replicated), and ``C C^T`` and
    ``X C^T`` are.

    It is :func:`pca_products` (what needs ``x``) then :func:`pca_grad_from` (the rest)."""
    c, y = pca_products(basis, x, c, shard, rows_sharded)
    return pca_grad_from(basis, c, y, orth_reg, x_scale_sq, shard, rows_sharded)


def pca_products(basis, x, c=None, shard: Whole = WHOLE, rows_sharded: bool = False, dtype=None):
    """The part of :func:`pca_grad` that reads ``x``: ``(c, y)`` with ``c = B^T x`` (``c`` as
    given, else computed) and ``y = x c^T``, in ``dtype`` (the basis step's; by default the
    basis's), each summed over the ranks where it is a partial sum. Both are r-wide: once
    they are taken, ``x``'s buffer may be reused."""
    dtype = dtype or basis.dtype
    if c is None:
        c = mm(basis.to(x.dtype).mT, x).to(dtype)
        if rows_sharded:
            c = shard.sum(c)
    y = mm(x, c.to(x.dtype).mT).to(dtype)  # X C^T over s^2
    if not rows_sharded:
        y = shard.sum(y)
    return c, y


def pca_grad_from(basis, c, y, orth_reg=0.0, x_scale_sq=1.0, shard: Whole = WHOLE, rows_sharded: bool = False):
    """:func:`pca_grad` from :func:`pca_products`' ``(c, y)`` (``y`` is scaled in place)."""
    # C = s c: X C^T and C C^T carry s^2
    y = y.mul_(x_scale_sq)
    gram = mm(basis.mT, basis)
    cct = mm(c, c.mT).to(basis.dtype)
    if rows_sharded:
        gram = shard.sum(gram)
    else:
        cct = shard.sum(cct)
    cct = cct.mul_(x_scale_sq)
    gram.diagonal(dim1=-2, dim2=-1).sub_(2)
    # 2 (B C C^T + X C^T (B^T B - 2 I))
    if basis.dim() == 3:
        grad = mm(basis, cct).baddbmm_(y, gram, beta=2, alpha=2)
    else:
        grad = (basis @ cct).addmm_(y, gram, beta=2, alpha=2)
    if orth_reg:
        gram.diagonal(dim1=-2, dim2=-1).add_(1)
        grad.add_(mm(basis, gram), alpha=4 * orth_reg)
    return grad


@dataclass(frozen=True)
class OnlinePCA:
    """Online Subspace Descent: SVD at the first step, then one optimizer step on the
    online-PCA loss after every weight update (reference behaviour: background.md §3).

    ``lr=None`` is the reference rule ``(1 / update_gap) * (lr_t / lr_0)``: P follows the
    weights' schedule, and with T=200 and lr_0=1e-3 it is 5x the weight lr (the paper's
    alpha = 5).

    A matrix whose gradient is zero or not finite skips its basis step (basis and P's own
    moments unchanged), decided on the device per matrix, without a host read."""

    update_gap: int = 200
    rule: Rule = field(default_factory=Adam)
    storage: Storage = FP32
    lr: float | None = None
    weight_decay: float = 0.01
    orth_reg: float = 0.0
    retract_every: int = 0
    svd: str = "exact"  # the initial basis: or "randomized"
    basis_dtype: torch.dtype = torch.float32
    from_gradient = True

    def refreshes(self, step: int) -> bool:
        return step == 0

    def refresh(self, g, state, step, rank, sides, seeds, shard=WHOLE):
        for key, basis in _svd_bases(g, rank, *sides, self.svd, shard, self.basis_dtype).items():
            put(state, key, basis)
            for name, t in self.rule.init(basis.shape, basis.device, self.storage).items():
                state[f"{key}.{name}"] = t

    def prepare(self, g, projected, state, step, shard=WHOLE):
        """What the basis step takes from the gradients ``g`` and their projection, before
        ``g``'s buffer may take the weights' update: per matrix 1 / ||G||^2 and whether it
        skips its step, per basis the r-wide products of :func:`pca_products`. None at the
        first step (the reference takes no P step at initialisation)."""
        if step == 0:
            return None
        norm = shard.norm(g, dim=(-2, -1), dtype=torch.float32)
        # 1 / ||G||^2 (the PCA loss of G / ||G||), and 0 where ||G|| is 0, not finite (or
        # below 1e-19, whose square is not an fp32 number): those skip their step
        inv_sq = norm.pow_(-2).nan_to_num_(0.0, 0.0, 0.0).view(-1, 1, 1)
        prepared = {"inv_sq": inv_sq, "tf32": _low_precision_cuda(g)}
        one_sided = (ROWS in state) != (COLS in state)
        with _tf32_if(prepared["tf32"]):
            for key, x in ((ROWS, g), (COLS, g.mT)):
                if key in state:
                    # B^T G is the projected gradient already computed (one side projected)
                    c = (projected if key == ROWS else projected.mT) if one_sided else None
                    prepared[key] = pca_products(state[key], x, c, shard, key == ROWS, torch.float32)
        return prepared

    def after_update(self, prepared, state, step, lr_ratio, shard=WHOLE):
        """One step on P for every matrix of the stack, from :meth:`prepare`'s products.
        Returns None when the bases did not move, else a (k,) bool tensor: the matrices that
        skipped their step."""
        if prepared is None:
            return None
        with _tf32_if(prepared["tf32"]):
            return self._step(prepared, state, step, lr_ratio, shard)

    def _step(self, prepared, state, step, lr_ratio, shard):
        inv_sq = prepared["inv_sq"]
        keep = (inv_sq == 0).view(-1)
        lr = self.lr if self.lr is not None else lr_ratio / self.update_gap
        for key in (ROWS, COLS):
            if key not in state:
                continue
            stored = state[key]
            basis = stored.float()  # the stored tensor itself when fp32
            c, y = prepared.pop(key)
            grad = pca_grad_from(basis, c, y, self.orth_reg, inv_sq, shard, rows_sharded=key == ROWS)
            del c, y
            prefix = key + "."
            sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            rows = shard if key == ROWS else WHOLE  # a left basis: this rank's rows
            # B <- (1 - lr wd) B - delta: one op where the rule's update is linear in lr (it
            # returns -delta for -lr)
            linear = self.rule.scales_with_lr
            decay = 1 - lr * self.weight_decay
            if isinstance(self.rule, SGD) and decay == 1:  # no state, no decay: in place
                new = basis.add_(grad.masked_fill_(keep.view(-1, 1, 1), 0), alpha=-lr)
            else:
                delta = self.storage.update(self.rule, grad, sub, -lr if linear else lr, step, rows, keep=keep)
                new = torch.add(delta, basis, alpha=decay) if linear else torch.sub(basis * decay, delta)
            if self.retract_every and step % self.retract_every == 0:
                new = shard.rows(_orthonormalize(shard.gather(new))) if key == ROWS else _orthonormalize(new)
            if new is not basis:  # the skipped keep their basis
                new = torch.where(keep.view(-1, 1, 1), basis, new, out=basis if stored is basis else None)
            if stored is not new:  # 16-bit storage: one rounding of the fp32 result
                stored.copy_(new)
        return keep


PROJECTORS = ("online_pca", "svd", "random")

SUBSPACE_DEFAULTS = {
    "projector": "online_pca",
    "update_gap": 200,
    "scale": 0.25,
    "side": "auto",
    "proj_optimizer": "sgd",
    "proj_lr": None,
    "proj_weight_decay": None,
    "orth_reg": 0.0,
    "retract_every": 0,
    "transport": False,
    "proj_dtype": "auto",
    "svd_method": "exact",
    "correction": "fira",
    "basis_dtype": "float32",
}

PROJ_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BASIS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def proj_dtype(group: dict, grad_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a group's projection matmuls: ``auto`` is the gradient's dtype (as the
    GaLore and OSD references), otherwise the named one. Bases (``basis_dtype``), the rule and P's
    optimizer keep their dtypes whatever this is."""
    return PROJ_DTYPES[group.get("proj_dtype", "auto")] or grad_dtype


def check_group(group: dict, names: list[str]) -> None:
    """Fill a subspace group's defaults and raise ValueError on anything invalid, naming
    the offending parameter. Warns once if ``rank`` has to be clamped."""
    for key, default in SUBSPACE_DEFAULTS.items():
        group.setdefault(key, default)
    rank = group["rank"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r} (parameters: {_few(names)})")
    for key, valid in (
        ("projector", PROJECTORS),
        ("side", SIDES),
        ("proj_optimizer", PROJ_OPTIMIZERS),
        ("proj_dtype", PROJ_DTYPES),
        ("basis_dtype", BASIS_DTYPES),
        ("svd_method", SVD_METHODS),
        ("correction", CORRECTIONS),
    ):
        if group[key] not in valid:
            raise ValueError(f"unknown {key} {group[key]!r}; valid: {', '.join(valid)}")
    for key in ("update_gap", "retract_every"):
        value, least = group[key], 1 if key == "update_gap" else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{key} must be an integer >= {least}, got {value!r}")
    clamped = []
    for p, name in zip(group["params"], names, strict=True):
        if p.dim() < 2:
            raise ValueError(
                f"parameter {name} has shape {tuple(p.shape)}: a subspace group (one with 'rank') "
                "takes matrices only; put vectors and scalars in a plain group (see osd.param_groups)"
            )
        m, n = p.shape[0], p.shape[1:].numel()
        rows, cols = resolve_sides(group["side"], m, n)
        dims = [d for d, on in ((m, rows), (n, cols)) if on]
        if rank >= min(dims):
            clamped.append(f"{name} {m}x{n}")
    if clamped:
        warnings.warn(
            f"rank {rank} >= the projected dimension of {len(clamped)} parameter(s) "
            f"({_few(clamped)}): clamped to the full dimension, so these save no memory",
            stacklevel=4,
        )


def _few(items, k=3):
    items = list(items)
    return ", ".join(items[:k]) + (f" and {len(items) - k} more" if len(items) > k else "")


def from_group(group: dict):
    """The projector a (checked) subspace group asks for."""
    name, gap = group["projector"], group["update_gap"]
    dtype = BASIS_DTYPES[group.get("basis_dtype", "float32")]
    if name == "svd":
        return SVD(gap, group.get("svd_method", "exact"), dtype)
    if name == "random":
        return Random(gap, dtype)
    rule, storage, weight_decay = PROJ_OPTIMIZERS[group["proj_optimizer"]]
    if group["proj_weight_decay"] is not None:
        weight_decay = group["proj_weight_decay"]
    return OnlinePCA(
        gap,
        rule,
        storage,
        group["proj_lr"],
        weight_decay,
        group["orth_reg"],
        group["retract_every"],
        group.get("svd_method", "exact"),
        dtype,
    )


def _low_precision_cuda(g: torch.Tensor) -> bool:
    return g.is_cuda and g.dtype in (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def _tf32_if(on: bool):
    """On CUDA, with projections in a 16-bit dtype (``on``: :func:`_low_precision_cuda` of
    the gradients), let the basis step's fp32 matmuls (the r x r Gram products, P's
    optimizer) use TF32 tensor cores: still more precise than the references, which run the
    whole step in bf16, and several times faster than fp32 on CUDA cores. The global
    precision setting is restored afterwards."""
    if not on:
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _orthonormalize(basis: torch.Tensor) -> torch.Tensor:
    """QR retraction onto orthonormal columns (of each matrix of a stack), signs fixed so it
    is continuous in B."""
    q, r = torch.linalg.qr(basis)
    return q * torch.sign(torch.sign(r.diagonal(dim1=-2, dim2=-1)) + 0.5).unsqueeze(-2)


def transport(state: dict, old: dict, moments: tuple, storage: Storage, shard: Whole = WHOLE) -> None:
    """Carry subspace moments from the bases in ``old`` to the current ones (a matrix or a
    stack).

    Coordinates in a basis are ``c = B^T g``, so with ``Q = B_new^T B_old`` (r x r) a first
    moment maps as ``M <- Q M`` (left side; ``M Q^T`` on the right). A second moment is
    carried as a scale: ``V <- (|Q| sqrt(V))^2``, the bound on the new coordinates that the
    triangle inequality gives. It never raises the largest ratio ``|M| / sqrt(V)`` (so moving
    the basis cannot enlarge Adam's update), is exact for permutations and sign flips,
    and is never smaller than the variance rule ``(Q*Q) V``, which drops the cross-covariances
    and, applied at every online-PCA step, inflated ``M / sqrt(V)`` until training diverged
    (bench/quality.py, llama_9m). Without transport (GaLore, the OSD reference) the old
    coordinates are reused as if they were coordinates in the new basis. Bases in ``old``
    that are the current tensors themselves did not move. Row shards sum ``Q`` of a left
    basis over the ranks."""
    rotations = {k: state[k].float().mT @ b.float() for k, b in old.items() if state[k] is not b}
    if ROWS in rotations:
        rotations[ROWS] = shard.sum(rotations[ROWS])
    if not rotations:
        return
    first, second = moments
    for name in first + second:
        if name not in state:  # e.g. Adafactor without beta1
            continue
        value = storage.load(state, name)
        if name in second:
            value = value.sqrt()
        for key, q in rotations.items():
            q = q.abs() if name in second else q
            value = q @ value if key == ROWS else value @ q.mT
        storage.store(state, name, value.square() if name in second else value)


def effective_rank(rank: int, m: int, n: int, sides: tuple[bool, bool]) -> int:
    return min([rank] + [d for d, on in zip((m, n), sides, strict=True) if on])


__all__ = [
    "SVD",
    "Random",
    "OnlinePCA",
    "PROJECTORS",
    "PROJ_OPTIMIZERS",
    "SIDES",
    "pca_grad",
    "project",
    "project_back",
    "resolve_sides",
]
