"""One process of an FSDP2 library run, for tests/test_fsdp.py.

Started N times with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in the
environment (as torchrun sets them) and one argument, the JSON file to write. For every
case of :data:`CASES` it trains a small model sharded with ``fully_shard`` (gloo, CPU) for
:data:`STEPS` steps, each rank on its own quarter of a batch, and beside it the same model
unsharded in this process on the whole batch (the one-process reference). Rank 0 writes,
per case:

* ``weight_error``: the largest relative difference (Frobenius) between a gathered weight
  and the reference's;
* ``state_error``: the same for every optimizer state tensor (row-sharded ones gathered);
* ``noise_weight_error``, ``noise_state_error``: the same errors of one process that sums the
  gradient in ``world`` accumulated pieces, as the ranks do: what rounding alone gives;
* ``code_mismatch``: the largest fraction of 8-bit state codes that differ;
* ``replicated_differ``: the replicated state tensors (bases, moments of the left side)
  that are not bitwise equal on every rank;
* ``resume_differ``: weights and state that differ between the run and one that saved
  every rank's ``state_dict()`` after step 3, rebuilt model and optimizer, loaded and went on.
"""

from __future__ import annotations

import functools
import io
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import osd
from osd import dcp

STEPS = 6
SAVE_AT = 3
BATCH = 64
# every case: (optimizer class, param_groups options, over the library's defaults: SGD on P,
# Fira's residual); update gap 2 refreshes SVD and random bases at steps 0, 2, 4
CASES = {
    "online_pca-adamw": (osd.AdamW, dict(projector="online_pca")),
    "svd-adamw": (osd.AdamW, dict(projector="svd")),
    "random-adamw": (osd.AdamW, dict(projector="random")),
    "online_pca-adamw8bit": (osd.AdamW8bit, dict(projector="online_pca")),
    "svd-adamw8bit": (osd.AdamW8bit, dict(projector="svd")),
    "random-adamw8bit": (osd.AdamW8bit, dict(projector="random")),
    "online_pca-lion": (osd.Lion, dict(projector="online_pca")),
    "svd-lion": (osd.Lion, dict(projector="svd")),
    "random-lion": (osd.Lion, dict(projector="random")),
    "online_pca-both-sides-retract-transport": (
        osd.AdamW,
        dict(projector="online_pca", side="both", retract_every=2, transport=True, orth_reg=0.1, proj_lr=1e-3),
    ),
    "svd-transport": (osd.AdamW, dict(projector="svd", transport=True)),
    "online_pca-bf16-bases-transport": (
        osd.AdamW,
        dict(projector="online_pca", basis_dtype="bfloat16", transport=True),
    ),
    "online_pca-fira": (osd.AdamW, dict(projector="online_pca", correction="fira")),
    "online_pca-apollo": (osd.AdamW, dict(projector="online_pca", correction="apollo")),
    "random-apollo_mini": (osd.AdamW, dict(projector="random", correction="apollo_mini")),
    "online_pca-proj_adam8bit": (osd.AdamW8bit, dict(projector="online_pca", proj_optimizer="adam8bit")),
    # Adafactor: factored second moment and update clipping summed over the ranks' rows
    "online_pca-adafactor": (osd.Adafactor, dict(projector="online_pca")),
    "random-adafactor-beta1": (functools.partial(osd.Adafactor, beta1=0.9), dict(projector="random")),
    "online_pca-proj_adafactor": (osd.AdamW, dict(projector="online_pca", proj_optimizer="adafactor")),
    # osd.Layerwise: each shard updated in the hook FSDP2 calls after its reduce-scatter,
    # accumulating 2 micro-batches (per-parameter clipping: norms over all ranks). Without
    # Fira's residual where the first basis is an SVD: its per-column ratio ||D_j|| / ||R_j||
    # turns rounding-level differences in near-zero columns of the clipped projection into
    # 2e-3 of the weights here (sharded or not: what the test compares is the sharding)
    "online_pca-layerwise": (osd.AdamW, dict(projector="online_pca", layerwise=2, correction="none")),
    "online_pca-adamw8bit-layerwise": (
        osd.AdamW8bit,
        dict(projector="online_pca", layerwise=2, correction="none"),
    ),
    "random-lion-layerwise": (osd.Lion, dict(projector="random", layerwise=2)),
    "random-fira-layerwise": (osd.AdamW, dict(projector="random", layerwise=2)),
}


class Net(nn.Module):
    """Matrices of every kind a step meets: right-projected (m >= n), left-projected
    (m < n, rows split unevenly: 13 rows over 2 or 4 ranks), two of one shape
    (a stack), one large enough for 8-bit state on every shard, and plain vectors and an
    embedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 256)
        self.down = nn.Linear(256, 64)  # 64 x 256: left
        self.mid1 = nn.Linear(64, 64)
        self.mid2 = nn.Linear(64, 64)  # with mid1: a stack of 2
        self.up = nn.Linear(64, 2048)  # 2048 x 64: right, 8-bit moments (512 x 8) on 4 shards
        self.back = nn.Linear(2048, 64)
        self.head = nn.Linear(64, 13, bias=False)  # 13 x 64: left, uneven rows
        self.tiny = nn.Linear(64, 3, bias=False)  # 3 x 64: over 4 ranks, one holds no row

    def forward(self, tokens):
        x = self.embed(tokens).mean(1)
        x = torch.tanh(self.down(x))
        x = torch.tanh(self.mid2(torch.tanh(self.mid1(x))))
        x = torch.tanh(self.back(torch.relu(self.up(x))))
        return self.head(x) + nn.functional.pad(self.tiny(x), (0, 10))


def batch(step: int):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 64, (BATCH, 8), generator=gen), torch.randn(BATCH, 13, generator=gen)


def build(cls, options, fsdp: bool):
    options = dict(options)
    accumulation = options.pop("layerwise", 0)
    torch.manual_seed(0)
    model = Net()
    if fsdp:
        for layer in (model.down, model.mid1, model.mid2, model.up, model.back, model.tiny):
            fully_shard(layer)
        fully_shard(model)
    kwargs = dict(lr=2e-3, weight_decay=0.1) if cls is not osd.Lion else dict(lr=2e-4, weight_decay=0.1)
    matrices = [m.weight for m in (model.down, model.mid1, model.mid2, model.up, model.back)]
    chosen = {id(p) for p in matrices} | {id(model.head.weight), id(model.tiny.weight)}
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in chosen]},
        {"params": matrices, "rank": 8, "update_gap": 2, "proj_lr": 5e-3} | options,
        {"params": [model.head.weight], "rank": 8, "update_gap": 2, "proj_lr": 5e-3} | options,
        {"params": [model.tiny.weight], "rank": 2, "update_gap": 2, "proj_lr": 5e-3} | options,
    ]
    optimizer = cls(groups, **kwargs)
    if accumulation:
        return model, osd.Layerwise(optimizer, accumulation_steps=accumulation, max_grad_norm=0.05)
    return model, optimizer


def train(model, optimizer, steps, rank=0, world=1, parts=1, ranks=None):
    """Steps on this rank's ``1 / world`` of each batch, in ``parts`` accumulated pieces;
    with ``ranks``, one process plays that many ranks: its micro-batch j is every rank's j-th
    piece (what FSDP2 sums in the j-th reduce-scatter)."""
    for step in steps:
        tokens, target = batch(step)
        size = BATCH // (world * parts) if ranks is None else BATCH // (ranks * parts)
        for j in range(parts):
            owners = [rank] if ranks is None else range(ranks)
            index = torch.cat([torch.arange(size) + (r * parts + j) * size for r in owners])
            loss = nn.functional.mse_loss(model(tokens[index]), target[index]) / parts
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def gather_rows(t: torch.Tensor, world: int) -> torch.Tensor:
    """A state tensor's rows from every rank (row counts may differ)."""
    counts = [torch.zeros((), dtype=torch.int64) for _ in range(world)]
    dist.all_gather(counts, torch.tensor(t.shape[0]))
    size = max(int(c) for c in counts)
    padded = torch.zeros((size,) + tuple(t.shape[1:]), dtype=t.dtype)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(c)] for p, c in zip(parts, counts, strict=True)])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compare_state(opt, ref_opt, model, ref_model, world=1) -> tuple[float, float, list[str]]:
    """(largest relative error of a float state tensor against the reference, the largest
    fraction of 8-bit codes that differ, replicated tensors that differ between ranks)."""
    worst, codes, differ = 0.0, 0.0, []
    ref_params = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        mine, ref = opt.state[p], ref_opt.state[ref_params[name]]
        assert mine.keys() == ref.keys(), (name, sorted(mine), sorted(ref))
        for key, value in mine.items():
            if not torch.is_tensor(value):
                continue
            shapes = [tuple(value.shape)] * world
            if world > 1:
                dist.all_gather_object(shapes, tuple(value.shape))
            if all(s == tuple(ref[key].shape) for s in shapes):  # replicated
                copies = [value]
                if world > 1:
                    copies = [torch.empty_like(value) for _ in range(world)]
                    dist.all_gather(copies, value)
                if not all(torch.equal(c, copies[0]) for c in copies):
                    differ.append(f"{name}/{key}")
                whole = value
            else:
                whole = gather_rows(value, world)
            if value.dtype == torch.uint8:  # 8-bit codes
                codes = max(codes, float((whole != ref[key]).float().mean()))
                continue
            worst = max(worst, relative(whole, ref[key]))
    return worst, codes, differ


def snapshot(model, opt) -> dict:
    return {
        "model": {k: full(v).clone() for k, v in model.state_dict().items()},
        "optimizer": {
            k: {n: v.clone() for n, v in s.items() if torch.is_tensor(v)} for k, s in opt.state_dict()["state"].items()
        },
    }


def differences(a: dict, b: dict) -> list[str]:
    out = [f"model/{k}" for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    for k, s in a["optimizer"].items():
        out += [f"optimizer/{k}/{n}" for n, v in s.items() if not torch.equal(v, b["optimizer"][k][n])]
    return out


def gathered(model, opt) -> dict:
    """Every weight and optimizer state entry as one whole tensor (or Python value), from
    the checkpoint state dict; 8-bit entries of sharded parameters (rank-own) left out."""
    out = {}
    for key, value in dcp.state_dict(model, opt).items():
        if dcp.OWN in key:
            continue
        out[key] = full(value).clone() if torch.is_tensor(value) else value
    return out


def run_case(cls, options, rank, world, root: Path) -> dict:
    parts = options.get("layerwise", 1)
    ref_model, ref_opt = build(cls, options, fsdp=False)
    train(ref_model, ref_opt, range(STEPS), parts=parts, ranks=world if parts > 1 else None)
    noise_weight = noise_state = 0.0  # per-layer: one backward a micro-batch, no other order to try
    if parts == 1:  # the rounding noise of this case: one process, the batch in ``world`` pieces
        noise_model, noise_opt = build(cls, options, fsdp=False)
        train(noise_model, noise_opt, range(STEPS), parts=world)
        noise_weight = max(
            relative(p, q) for p, q in zip(noise_model.parameters(), ref_model.parameters(), strict=True)
        )
        noise_state = compare_state(noise_opt, ref_opt, noise_model, ref_model)[0]

    model, opt = build(cls, options, fsdp=True)
    train(model, opt, range(SAVE_AT), rank, world, parts)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    dcp.save(root / "dcp", model, opt)
    whole = gathered(model, opt)
    if rank == 0:
        torch.save(whole, root / "gathered.pt")
    train(model, opt, range(SAVE_AT, STEPS), rank, world, parts)

    weight_error = max(relative(full(p), q) for p, q in zip(model.parameters(), ref_model.parameters(), strict=True))
    state_error, code_mismatch, replicated_differ = compare_state(opt, ref_opt, model, ref_model, world)

    resumed_model, resumed_opt = build(cls, options, fsdp=True)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    resumed_model.load_state_dict(loaded["model"])
    resumed_opt.load_state_dict(loaded["optimizer"])
    train(resumed_model, resumed_opt, range(SAVE_AT, STEPS), rank, world, parts)
    resume_differ = differences(snapshot(model, opt), snapshot(resumed_model, resumed_opt))

    dcp_model, dcp_opt = build(cls, options, fsdp=True)
    dcp.load(root / "dcp", dcp_model, dcp_opt)
    loaded_differ = [k for k, v in gathered(dcp_model, dcp_opt).items() if not same(v, whole[k])]
    train(dcp_model, dcp_opt, range(SAVE_AT, STEPS), rank, world, parts)
    dcp_resume_differ = differences(snapshot(model, opt), snapshot(dcp_model, dcp_opt))
    return {
        "dcp_loaded_differ": loaded_differ,
        "dcp_resume_differ": dcp_resume_differ,
        "weight_error": weight_error,
        "state_error": state_error,
        "noise_weight_error": noise_weight,
        "noise_state_error": noise_state,
        "code_mismatch": code_mismatch,
        "replicated_differ": replicated_differ,
        "resume_differ": resume_differ,
    }


def same(a, b) -> bool:
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def reshard(cls, options, source: Path, fsdp: bool) -> dict:
    """Load a checkpoint another world size saved (``source``: its case directory): which
    entries differ from what it saved (every one compared whole), or the refusal."""
    model, opt = build(cls, options, fsdp=fsdp)
    try:
        dcp.load(source / "dcp", model, opt)
    except ValueError as e:
        return {"refused": str(e)}
    saved = torch.load(source / "gathered.pt", weights_only=False)
    mine = gathered(model, opt)
    missing = sorted(set(saved) - set(mine) - {dcp.WORLD})
    return {"differ": [k for k, v in mine.items() if k != dcp.WORLD and not same(v, saved[k])] + missing}


def refusals() -> dict:
    """The message of what a sharded step refuses: a placement other than FSDP2's rows."""
    from torch.distributed.tensor import Shard, distribute_tensor

    out = {}
    model, _ = build(osd.AdamW, {}, fsdp=True)
    mesh = model.down.weight.device_mesh
    columns = nn.Parameter(distribute_tensor(torch.randn(8, 8), mesh, [Shard(1)]))
    columns.grad = distribute_tensor(torch.randn(8, 8), mesh, [Shard(1)])
    try:
        osd.AdamW([{"params": [columns], "rank": 2}]).step()
    except ValueError as e:
        out["columns"] = str(e)
    return out


def main(out: str) -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    names = os.environ.get("CASES", ",".join(CASES)).split(",")
    root = Path(out).parent
    results = {"refused": refusals()}
    for name in names:
        cls, options = CASES[name]
        results[name] = run_case(cls, options, rank, world, root / name)
        if os.environ.get("RESHARD_FROM"):  # a checkpoint of this case saved by another world size
            source = Path(os.environ["RESHARD_FROM"]) / name
            results[name]["reshard"] = reshard(cls, options, source, fsdp=True)
            results[name]["unsharded"] = reshard(cls, options, source, fsdp=False)
        dist.barrier()
        if rank == 0:
            print(name, results[name], flush=True)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
