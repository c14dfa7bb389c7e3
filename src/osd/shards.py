"""Shards: the one place the optimizers meet sharded parameters (FSDP2's DTensors).

A step's maths (:mod:`osd.projectors`, :mod:`osd.rules`, :mod:`osd.corrections`) is written
for a stack of matrices ``k x m x n``. Under ``torch.distributed.fsdp.fully_shard`` each rank
holds rows ``[start, stop)`` of every matrix (placement ``Shard(0)`` on a 1-D mesh, rows as
``torch.chunk`` splits them; a rank may hold none), so a stack of shards is ``k x m_i x n``
and the same maths runs on it, given a *layout* that says where a sum over all rows is
needed:

* :data:`WHOLE`: whole matrices (plain tensors, or replicated DTensors): nothing to do;
* :class:`Rows`: row shards: :meth:`Rows.sum` all-reduces a partial sum over rows,
  :meth:`Rows.gather` all-gathers the rows (an SVD refresh only), :meth:`Rows.rows` takes this
  rank's rows of a replicated ``k x m x r`` tensor.

Where the sums fall, for a row-sharded ``m x n`` gradient ``G`` (README, "Multi-GPU"):

* right basis ``B`` (n x r) replicated: ``G B`` is local; the online-PCA step sums
  ``C C^T`` (r x r) and ``G^T C^T`` (n x r) over the shards;
* left basis ``B`` (m x r) row-sharded like ``G``: ``B^T G`` is a sum over shards (r x n);
  the online-PCA step sums ``B^T B`` (r x r);
* every gradient norm is a sum of per-shard squares (k numbers).

The layout of a stack is read from its parameters (:func:`layout`); this module imports
``torch.distributed`` only when a parameter is a DTensor.
"""

from __future__ import annotations

import functools
import math

import torch


class Whole:
    """Whole matrices: every sum is already complete."""

    sharded = False

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t``, a partial sum over this rank's rows, summed over all ranks (in place)."""
        return t

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """The whole ``k x m x ...`` stack from this rank's ``k x m_i x ...`` rows."""
        return t

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a whole ``k x m x ...`` stack."""
        return t

    def all_true(self, flags: torch.Tensor) -> torch.Tensor:
        """Per-matrix flags (bool, ``(k,)``) that hold on every rank."""
        return flags

    def num_rows(self, g: torch.Tensor) -> int:
        """The whole matrices' row count, from a stack ``g`` of this rank's rows."""
        return g.shape[-2]

    def numel(self, t: torch.Tensor) -> int:
        """The element count of each whole tensor of the stack ``t`` (over every rank's rows)."""
        return t[0].numel()

    def norm(self, t: torch.Tensor, dim=None, keepdim: bool = False, dtype=None) -> torch.Tensor:
        """``torch.linalg.vector_norm`` of ``t`` (this rank's rows: dimension 1 of a stack)
        over ``dim`` (all by default), taken over every rank's rows when it covers them."""
        return torch.linalg.vector_norm(t, dim=dim, keepdim=keepdim, dtype=dtype)


WHOLE = Whole()


class Rows(Whole):
    """Row shards over a process group: this rank holds rows ``[start, stop)`` of ``m``."""

    sharded = True

    def __init__(self, group, m: int):
        import torch.distributed as dist

        self.group, self.m = group, m
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.chunk = -(-m // self.world)  # torch.chunk's split: ceil(m / world) rows a rank
        self.start = min(m, self.rank * self.chunk)
        self.stop = min(m, self.start + self.chunk)

    def sum(self, t):
        import torch.distributed as dist

        if t.dtype in (torch.bfloat16, torch.float16):  # sum 16-bit partial products in fp32
            return t.copy_(self.sum(t.float()))
        dist.all_reduce(t, group=self.group)
        return t

    def gather(self, t):
        import torch.distributed as dist

        local = t.movedim(1, 0)  # rows first: all_gather_into_tensor joins along dim 0
        if local.shape[0] < self.chunk:  # the last ranks may hold fewer rows, or none
            pad = local.new_zeros((self.chunk - local.shape[0],) + tuple(local.shape[1:]))
            local = torch.cat([local, pad])
        out = local.new_empty((self.chunk * self.world,) + tuple(local.shape[1:]))
        dist.all_gather_into_tensor(out, local.contiguous(), group=self.group)
        return out[: self.m].movedim(0, 1).contiguous()  # only ranks after the last full one pad

    def rows(self, t):
        return t[:, self.start : self.stop].contiguous()

    def all_true(self, flags):
        bad = (~flags).to(torch.int32)
        return self.sum(bad) == 0

    def num_rows(self, g):
        return self.m

    def numel(self, t):
        return self.m * math.prod(t.shape[2:])

    def norm(self, t, dim=None, keepdim=False, dtype=None):
        n = torch.linalg.vector_norm(t, dim=dim, keepdim=keepdim, dtype=dtype)
        dims = range(t.dim()) if dim is None else [d % t.dim() for d in (dim if isinstance(dim, tuple) else (dim,))]
        if dim is not None and 1 not in dims:  # the rows are not summed over: a local norm
            return n
        return self.sum(n.square()).sqrt()


@functools.cache
def _rows(group, m: int) -> Rows:
    """One :class:`Rows` per (process group, row count): a step asks for it several times."""
    return Rows(group, m)


def local(t):
    """The tensor this rank computes with: a DTensor's local tensor (a view), else ``t``."""
    return t.to_local() if _is_dtensor(t) else t


def _is_dtensor(t) -> bool:
    # without importing torch.distributed for plain tensors
    return type(t).__name__ == "DTensor" and type(t).__module__.startswith("torch.distributed")


def layout(params: list) -> Whole:
    """The layout of a stack of parameters (one shape, placement and mesh): :data:`WHOLE`
    for plain tensors and replicated DTensors, :class:`Rows` for FSDP2's ``Shard(0)``.
    Raises ValueError for any other placement (2-D meshes: HSDP, tensor parallelism)."""
    p = params[0]
    if not _is_dtensor(p):
        return WHOLE
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(p.placements)
    if placements == (Replicate(),):
        return WHOLE
    if placements != (Shard(0),):
        raise ValueError(
            f"osd optimizers take DTensor parameters sharded on dim 0 over a 1-D mesh "
            f"(torch.distributed.fsdp.fully_shard's default) or replicated; got placements {placements} "
            f"for a parameter of shape {tuple(p.shape)}"
        )
    return _rows(p.device_mesh.get_group(), p.shape[0])


def row_sharded(keys, key: str, ndim: int) -> bool:
    """Whether the state entry ``key`` (of ``ndim`` dimensions) of a row-sharded parameter
    (whose state has ``keys``) holds this rank's rows: a plain parameter's moments, a left
    basis and its optimizer's moments, the rule's moments of a right-only projection
    (m_i x r). Right bases, the moments of a left projection (r x n), per-matrix numbers and
    Adafactor's column factor of a matrix (a mean over all rows) are replicated. An 8-bit
    moment's block scales follow their codes (but do not split at row boundaries)."""
    from osd.corrections import NORM_KEY
    from osd.projectors import COLS, ROWS
    from osd.storage import SCALE

    if key.endswith(SCALE):
        return row_sharded(keys, key[: -len(SCALE)], 2)
    if key.endswith("exp_avg_sq_col") and ndim <= 1:  # Adafactor's of a matrix: over all rows
        return False
    keys = set(keys)
    if ROWS not in keys and COLS not in keys:  # a plain parameter: moments shaped like it
        return True
    if key == ROWS or key.startswith(ROWS + "."):
        return True
    if key == COLS or key.startswith(COLS + ".") or key == NORM_KEY:
        return False
    return ROWS not in keys  # the rule's moments: m_i x r under a right-only basis
