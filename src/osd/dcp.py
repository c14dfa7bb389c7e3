"""Distributed checkpoints of a model and its osd optimizer, through
``torch.distributed.checkpoint`` (DCP).

``save(path, model, optimizer)`` on every rank writes one checkpoint directory; ``load``
on every rank of a later run puts everything back:

* each weight and each full-precision optimizer state tensor is saved as the global tensor
  it is a piece of: a row-sharded entry (FSDP2: a plain parameter's moments, a left basis
  and its optimizer's moments, a right-only projection's moments;
  :func:`osd.shards.row_sharded`) as a ``Shard(0)`` DTensor, a replicated one (right bases,
  a left projection's moments, per-matrix numbers) as a plain tensor that DCP writes once.
  So they load on any number of ranks, sharded or not;
* an 8-bit moment (codes and block scales) of a row-sharded entry is saved as each rank's
  own tensors (``...@rank<r>``), exactly: its blocks do not split at row boundaries, so it
  resumes on the number of ranks that saved it (``load`` refuses another); replicated
  8-bit moments are saved once;
* the ``step`` counters and the param groups' hyperparameters (the schedule's ``lr``) go
  with it, and the world size.

Keys are ``model/<name>`` and ``optim/<parameter name>/<state key>``. A model in one
process without a process group saves and loads too. Loading needs no state in the
optimizer: its templates come from the checkpoint's metadata.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from osd import shards
from osd.storage import SCALE

GROUPS, WORLD, OWN = "optim_groups", "world_size", "@rank"


def _names(model, optimizer) -> dict:
    """Each optimizer parameter -> its name in the model."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    names = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in by_id:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} of the optimizer is not in the model")
            names[p] = by_id[id(p)]
    return names


def _world_and_rank() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _dcp(fn, state: dict, path) -> None:
    """``dcp.save``/``dcp.load``; without a process group, in this process alone (said, so
    DCP does not warn that it assumes it)."""
    import torch.distributed as dist

    alone = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        fn(state, checkpoint_id=str(path), no_dist=alone)


def state_dict(model, optimizer) -> dict:
    """The flat state dict of global tensors that :func:`save` writes (see the module)."""
    world, rank = _world_and_rank()
    out = {f"model/{k}": v for k, v in model.state_dict().items()}
    for p, name in _names(model, optimizer).items():
        state = optimizer.state.get(p)
        if not state:
            continue
        sharded = shards.layout([p]).sharded
        for key, value in state.items():
            if torch.is_tensor(value) and sharded and shards.row_sharded(state, key, value.dim()):
                if key.endswith(SCALE) or key + SCALE in state:  # 8-bit: this rank's own codes, scales
                    out[f"optim/{name}/{key}{OWN}{rank}"] = value
                    continue
                value = _rows(value, p)
            out[f"optim/{name}/{key}"] = value
    # one JSON string (DCP would flatten a list of dicts into keys of its own)
    out[GROUPS] = json.dumps([{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups])
    out[WORLD] = world
    return out


def _rows(local: torch.Tensor, p) -> torch.Tensor:
    """This rank's rows as the ``Shard(0)`` DTensor of the whole state tensor."""
    from torch.distributed.tensor import DTensor, Shard

    shape = (p.shape[0],) + tuple(local.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        local.contiguous(), p.device_mesh, [Shard(0)], shape=shape, stride=stride, run_check=False
    )


def save(path, model, optimizer) -> None:
    """Write model and optimizer to the DCP directory ``path`` (call on every rank)."""
    import torch.distributed.checkpoint as dcp

    _dcp(dcp.save, state_dict(model, optimizer), path)


def load(path, model, optimizer) -> None:
    """Load what :func:`save` wrote into ``model`` and ``optimizer`` (call on every rank).
    Raises ValueError for a checkpoint of other parameters or param groups, and for 8-bit
    state of sharded parameters saved by another number of ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    world, rank = _world_and_rank()
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    names = _names(model, optimizer)
    saved: dict[str, dict] = {}  # parameter name -> {state key: checkpoint key}
    per_rank = False
    for key in metadata:
        if not key.startswith("optim/"):
            continue
        name, _, state_key = key[len("optim/") :].rpartition("/")
        if OWN in state_key:
            per_rank = True
            state_key, _, owner = state_key.partition(OWN)
            if int(owner) != rank:
                continue
        saved.setdefault(name, {})[state_key] = key
    unknown = sorted(set(saved) - set(names.values()))
    if unknown:
        raise ValueError(f"checkpoint {path} holds optimizer state of parameters this model lacks: {unknown[:3]}")
    if per_rank:
        probe = {WORLD: None}
        _dcp(dcp.load, probe, path)
        if probe[WORLD] != world:
            raise ValueError(
                f"checkpoint {path} holds 8-bit optimizer state of sharded parameters, which resumes on the "
                f"number of ranks that saved it ({probe[WORLD]}), not on {world}"
            )
    model_sd = model.state_dict()
    target = {f"model/{k}": v for k, v in model_sd.items()}
    for p, name in names.items():
        layout = shards.layout([p])
        for state_key, key in saved.get(name, {}).items():
            meta = metadata[key]
            if not isinstance(meta, TensorStorageMetadata):
                target[key] = None  # a Python value: DCP puts it in place
            elif OWN not in key and layout.sharded and shards.row_sharded(saved[name], state_key, len(meta.size)):
                rows = (layout.stop - layout.start,) + tuple(meta.size[1:])
                target[key] = _rows(torch.empty(rows, dtype=meta.properties.dtype, device=p.device), p)
            else:  # whole, replicated, or this rank's own
                target[key] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype, device=p.device)
    target[GROUPS] = None
    _dcp(dcp.load, target, path)
    groups = json.loads(target[GROUPS])
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(
            f"checkpoint {path} has {len(groups)} param groups, this optimizer {len(optimizer.param_groups)}"
        )
    model.load_state_dict({k: target[f"model/{k}"] for k in model_sd})
    for group, values in zip(optimizer.param_groups, groups, strict=True):
        for k, v in values.items():
            if k not in ("params", "param_names"):
                group[k] = tuple(v) if isinstance(group.get(k), tuple) else v  # JSON made tuples lists
    for p, name in names.items():
        if name in saved:
            values = {k: target[key] for k, key in saved[name].items()}
            optimizer.state[p] = {k: shards.local(v) for k, v in values.items()}
