"""FSDP2 + osd against FSDP2 + AdamW: bytes communicated per step and step time.

    .venv/bin/python bench/distributed.py --worlds 2,4 --steps 8          # CPU, gloo
    python bench/distributed.py --device cuda --worlds 1 --unsharded ...  # FSDP2's cost on one GPU

Starts ``torchrun --standalone --nproc_per_node N`` for each world size N (gloo on CPU, nccl
on CUDA with ``--device cuda``). Each run builds ``transformers.LlamaForCausalLM`` of the
given size, wraps every decoder layer and the root with ``fully_shard`` (rows sharded), and
trains ``--steps`` steps of random tokens with each optimizer: ``torch.optim.AdamW``,
``osd.AdamW`` plain groups, and ``osd.AdamW`` with the attention/MLP matrices in a rank-r
subspace group for each projector (online PCA, SVD, random; SVD and random refresh every
``--update_gap`` steps). It counts the bytes each rank sends (ring algorithms, from what
each collective is given), apart for the optimizer step and for FSDP2's forward and
backward, and times the step (median). The optimizer's bytes are compared with the
per-matrix formulas of the README ("The library on FSDP2"). ``--unsharded`` (one process)
runs each method without ``fully_shard`` too. Writes ``results.json`` and ``table.md`` to
``--out`` (default bench/out/distributed).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLLECTIVES = (
    "all_reduce",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "all_gather_single",  # FSDP2's
    "reduce_scatter_single",
    "all_gather",
    "broadcast",
)
METHODS = ["torch-adamw", "osd-plain", "osd-online_pca", "osd-svd", "osd-random"]


def wire_bytes(name: str, payload: int, world: int) -> float:
    """Bytes a rank sends for one collective of ``payload`` input bytes, with ring
    algorithms: an all-reduce 2 (N-1)/N of its tensor, an all-gather N-1 times its share, a
    reduce-scatter (N-1)/N of its whole input."""
    if name == "all_reduce":
        return 2 * (world - 1) / world * payload
    if name.startswith("all_gather"):
        return (world - 1) * payload
    if name.startswith("reduce_scatter"):
        return (world - 1) / world * payload
    return payload


def predicted_bytes(shapes: list[tuple[int, int]], rank: int, projector: str, refreshes: float, world: int) -> float:
    """The optimizer's bytes on the wire per rank and step from the README's per-matrix
    formulas (fp32): online PCA all-reduces n r + r^2 + 1 values of a right projection
    (m >= n) and r n + r^2 + 1 of a left one (m < n); SVD and random all-reduce a left
    projection's projected gradient (r n) and nothing for a right one, and an SVD refresh
    (``refreshes`` per step) all-gathers the gradient (each rank sends its ceil(m / world) x n
    rows) and all-reduces one int32 per matrix (is its gradient finite?)."""
    reduced = gathered = 0.0
    for m, n in shapes:
        r = min(rank, m, n)
        if projector == "online_pca":
            reduced += r * n + r * r + 1
        elif m < n:
            reduced += r * n
        if projector == "svd":
            gathered += refreshes * -(-m // world) * n
            reduced += refreshes  # the finite flag (an int32: 4 bytes too)
    return wire_bytes("all_reduce", 4 * reduced, world) + wire_bytes("all_gather", 4 * gathered, world)


def counting(stats: dict, phase: list, world: int):
    """Wrap torch.distributed's collectives to add each call's bytes on the wire
    (:func:`wire_bytes`) to ``stats[phase[0]]``."""
    import torch
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    depth = [0]

    def wrap(name, fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            tensors = [a for a in args if torch.is_tensor(a)]
            tensors += [kwargs[k] for k in ("output", "output_tensor", "input", "input_tensor") if k in kwargs]
            if name == "all_gather":
                payload = args[1].nbytes if len(args) > 1 else kwargs["tensor"].nbytes
            elif name == "all_reduce" or name == "broadcast":
                payload = tensors[0].nbytes
            else:  # (output, input): the input
                payload = tensors[1].nbytes
            if depth[0]:  # a collective that another one calls (all_gather_into_tensor may): counted once
                return fn(*args, **kwargs)
            stats[phase[0]] = stats.get(phase[0], 0) + wire_bytes(name, payload, world)
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1

        return inner

    for name in COLLECTIVES:
        if not hasattr(c10d, name):
            continue
        wrapped = wrap(name, getattr(c10d, name))
        setattr(c10d, name, wrapped)
        setattr(dist, name, wrapped)


def worker(args) -> int:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaForCausalLM

    import osd
    from osd.models import model_config

    device = torch.device(args.device if args.device == "cpu" else f"cuda:{int(os.environ['LOCAL_RANK'])}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, args.threads // world))
    stats, phase = {}, ["other"]
    counting(stats, phase, world)
    results = []
    runs = [(m, sharded) for m in args.methods.split(",") for sharded in [True] + [False] * args.unsharded]
    for method, sharded in runs:
        torch.manual_seed(0)
        model = LlamaForCausalLM(model_config(args.model)).to(device=device, dtype=getattr(torch, args.dtype))
        if sharded:
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
        if method == "torch-adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            shapes = []
        elif method == "osd-plain":
            opt = osd.AdamW(model.parameters(), lr=1e-3)
            shapes = []
        else:
            groups = osd.param_groups(model, rank=args.rank, projector=method[4:], update_gap=args.update_gap)
            opt = osd.AdamW(groups, lr=1e-3)
            shapes = [(p.shape[0], p.shape[1:].numel()) for p in groups[1]["params"]]
        gen = torch.Generator().manual_seed(rank)
        times = []
        stats.clear()
        for step in range(args.steps + 1):  # step 0 (first SVD, state allocation) untimed
            tokens = torch.randint(0, 32000, (args.batch, args.seq), generator=gen).to(device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            phase[0] = "fsdp" if step else "warmup"
            model(input_ids=tokens, labels=tokens).loss.backward()
            phase[0] = "optimizer" if step else "warmup"
            opt.step()
            opt.zero_grad()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step:
                times.append(time.perf_counter() - t0)
        steps = args.steps
        refreshes = sum(1 for s in range(1, steps + 1) if s % args.update_gap == 0) / steps
        projector = method[len("osd-") :]
        row = {
            "method": method,
            "world": world,
            "fsdp": sharded,
            "step_ms": 1000 * sorted(times)[len(times) // 2],
            "fsdp_bytes_per_step": stats.get("fsdp", 0) / steps,
            "optimizer_bytes_per_step": stats.get("optimizer", 0) / steps,
            "predicted_optimizer_bytes_per_step": predicted_bytes(shapes, args.rank, projector, refreshes, world),
            "matrices": len(shapes),
        }
        results.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
        del opt, model
    if rank == 0:
        Path(args.out_file).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()
    return 0


def table(rows: list[dict]) -> str:
    lines = [
        "| world | method | step ms | FSDP MB/step | optimizer MB/step | formula MB/step | optimizer / FSDP |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = r["optimizer_bytes_per_step"] / r["fsdp_bytes_per_step"] if r["fsdp_bytes_per_step"] else 0
        name = r["method"] + ("" if r.get("fsdp", True) else " (unsharded)")
        lines.append(
            f"| {r['world']} | {name} | {r['step_ms']:.0f} | {r['fsdp_bytes_per_step'] / 2**20:.1f} | "
            f"{r['optimizer_bytes_per_step'] / 2**20:.2f} | {r['predicted_optimizer_bytes_per_step'] / 2**20:.2f} | "
            f"{100 * share:.1f}% |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", default="2,4")
    p.add_argument("--model", default="llama_20m")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--update_gap", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=2, help="sequences per rank a step")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the weights' (both runs)")
    p.add_argument(
        "--unsharded", action="store_true", help="also each method without fully_shard (world size 1: FSDP2's cost)"
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the ranks")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "distributed"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out_file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.unsharded and args.worlds != "1":
        p.error("--unsharded compares one process with and without fully_shard: use --worlds 1")
    if args.worker:
        return worker(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for world in [int(w) for w in args.worlds.split(",")]:
        out_file = out / f"world{world}.json"
        passed = [a for a in (argv if argv is not None else sys.argv[1:])]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
        cmd += [__file__, *passed, "--worker", "--out_file", str(out_file)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        print(f"world {world}: {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, check=True, env=env)
        rows += json.loads(out_file.read_text())
    text = table(rows)
    config = {k: v for k, v in vars(args).items() if k not in ("worker", "out_file", "out")}
    (out / "results.json").write_text(json.dumps({"config": config, "rows": rows}, indent=1))
    (out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
