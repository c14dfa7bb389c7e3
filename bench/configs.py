"""Peak memory of shipped ``osd-train`` configs, measured against ``osd-memory --config``.

For each config (``--configs``, osd-train flags after ``--`` override every config), the
script builds what ``osd-train`` builds from it: the LLaMA model in the config's dtype with
``osd.lean``'s layers, activation checkpointing when asked, the loss module with its
``loss_chunk`` (``osd.train.TokenLoss``) and the optimizer from its ``--optimizer`` and
``--proj_type`` strings (``osd.cli_options.build_optimizer``, ``osd.Layerwise`` for
per-layer ones); then it trains ``--steps`` optimizer steps of ``gradient_accumulation``
micro-batches of random tokens and records, on CUDA, ``torch.cuda.max_memory_allocated``
over them, tokens/s after the first step, and the first step's time (it computes the
initial bases). The estimate is ``osd.memory.trainer_estimate`` of the same arguments.

Writes ``results.json`` (one row per config: ``config``, ``size``, ``rank``, ``label``,
``proj_optimizer``, ``estimate`` with ``total`` and the other rows, ``measured`` with
``peak_bytes``, ``tokens_per_s``, ``first_step_s``) and ``results.md`` to ``--out``.
Without CUDA (``--device cpu``) it runs the same steps for the plumbing and reports the
estimate only (no CPU peak is comparable).

    python bench/configs.py --configs configs/llama_7b_sgd.toml,configs/llama_7b_lean.toml \
        --out $OUT/configs -- --svd_method randomized
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

from osd import cli_options, models, train
from osd.memory import GB, trainer_estimate

ROOT = Path(__file__).resolve().parents[1]
ESTIMATE_KEYS = ("weights", "gradients", "optimizer_state", "activations", "step_temporaries", "total")


def trainer_namespace(config: str, extra: list[str]) -> argparse.Namespace:
    """osd-train's resolved arguments for ``config`` and the overriding flags ``extra``."""
    return train.resolve(train.parse_args(["--config", config, *extra]), world_size=1)


def build(args, device: str):
    """The model, loss module and optimizer osd-train builds for ``args``."""
    model = models.build_model(args.model_config, getattr(torch, args.dtype), device)
    if args.activation_checkpointing:
        models.checkpoint_layers(model)
    model.train()
    return model, train.TokenLoss(model, args.loss_chunk), cli_options.build_optimizer(model, args)


def run(args, device: str, steps: int) -> dict:
    gc.collect()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model, loss_of, optimizer = build(args, device)
    vocab = model.config.vocab_size
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.gradient_accumulation):
            ids = torch.randint(0, vocab, (args.batch_size, args.max_length), device=device)
            loss_of(ids, ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    out = dict(
        state_bytes=optimizer.state_bytes(),
        tokens_per_s=args.total_batch_size * args.max_length * len(times[1:]) / sum(times[1:]),
        first_step_s=times[0],
    )
    if cuda:
        out["peak_bytes"] = torch.cuda.max_memory_allocated() - base
    del model, loss_of, optimizer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def markdown(rows: list[dict], device: str) -> str:
    lines = [
        f"Shipped configs on {device}: estimated peak (osd-memory --config) against measured",
        "",
        "| config | estimate GB | measured GB | error | tokens/s | first step s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        est, m = r["estimate"]["total"], r.get("measured", {})
        peak = m.get("peak_bytes")
        measured = f"{peak / GB:.2f}" if peak else r.get("error", "-")
        error = f"{(est - peak) / peak:+.1%}" if peak else "-"
        tps = f"{m['tokens_per_s']:,.0f}" if "tokens_per_s" in m else "-"
        first = f"{m['first_step_s']:.1f}" if "first_step_s" in m else "-"
        lines.append(f"| {r['config']} | {est / GB:.2f} | {measured} | {error} | {tps} | {first} |")
    return "\n".join(lines)


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--configs",
        default="configs/llama_7b_sgd.toml,configs/llama_7b_lean.toml",
        help="comma-separated osd-train config files (default: %(default)s)",
    )
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per config (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--out", type=Path, default=ROOT / "bench/out/configs", help="(default: %(default)s)")
    args = p.parse_args(argv)
    args.configs = [c for c in args.configs.split(",") if c]
    missing = [c for c in args.configs if not Path(c).is_file()]
    if missing:
        p.error(f"no such config: {', '.join(missing)}")
    if args.steps < 2:
        p.error("--steps must be at least 2 (the first is not timed)")
    if args.device not in ("cuda", "cpu") or (args.device == "cuda" and not torch.cuda.is_available()):
        p.error(f"--device {args.device}: cuda (when torch sees one) or cpu")
    args.extra = extra
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (no peak measured)"
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, config in enumerate(args.configs):
        targs = trainer_namespace(config, args.extra)
        est = trainer_estimate(targs)
        options = cli_options.subspace_options(targs.proj_type) if targs.rank else {}
        row = dict(
            config=" ".join([config, *args.extra]),
            size=targs.model_config,
            rank=targs.rank,
            label=est.optimizer,
            proj_optimizer=options.get("proj_optimizer"),
            estimate={k: getattr(est, k) for k in ESTIMATE_KEYS},
        )
        print(f"[{i + 1}/{len(args.configs)}] {row['config']}: estimate {est.total / GB:.2f} GB", flush=True)
        try:
            row["measured"] = run(targs, args.device, args.steps)
        except torch.OutOfMemoryError as e:
            row["error"] = "out of memory"
            print(f"    {e}", flush=True)
        m = row.get("measured", {})
        if "peak_bytes" in m:
            print(
                f"    peak {m['peak_bytes'] / GB:.2f} GB, {m['tokens_per_s']:,.0f} tokens/s, "
                f"first step {m['first_step_s']:.1f} s",
                flush=True,
            )
        rows.append(row)
        (args.out / "results.json").write_text(json.dumps(dict(device=device, rows=rows), indent=1))
    table = markdown(rows, device)
    (args.out / "results.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
