"""Training memory of LLaMA 60m / 350m / 1b / 7b with full-rank and subspace optimizers.

Without ``--measure`` it prints the estimator's table (``osd.memory.estimate``, the function
behind ``osd-memory``) next to GaLore's published figures (background.md §4): optimizer
state for 60m / 350m / 1b (GaLore 0.13 / 0.54 / 1.78 GB, full-rank Adam 0.23 / 1.37 /
5.20 GB, both with bf16 state) and 22.0 GB for 7b with 8-bit GaLore, per-layer updates and
activation checkpointing. No GPU needed.

With ``--measure`` (needs CUDA) it also trains each row for a few steps on random tokens in
bf16 through the trainer's optimizer construction (``osd.cli_options.build_optimizer``, so
the ``--optimizer``/``--proj_type`` strings mean what they mean in ``osd-train``) and
records ``torch.cuda.max_memory_allocated`` over those steps and tokens/s over the steps
after the first two (the first takes the initial SVD). Writes ``results.json``,
``results.md`` and ``memory.png`` to ``--out``.

    python bench/memory.py                                  # estimates only
    python bench/memory.py --measure --out $OUT/memory      # on a GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from osd.memory import GB, estimate

ROOT = Path(__file__).resolve().parents[1]

# size: (rank as in the GaLore paper, activation checkpointing)
SIZES = {"llama_60m": (128, False), "llama_350m": (256, False), "llama_1b": (512, False), "llama_7b": (1024, True)}
# GaLore paper (background.md §4): optimizer state in GB with bf16 state, and 7b's total
PUBLISHED_STATE = {
    ("llama_60m", "adamw"): 0.23,
    ("llama_350m", "adamw"): 1.37,
    ("llama_1b", "adamw"): 5.20,
    ("llama_60m", "galore"): 0.13,
    ("llama_350m", "galore"): 0.54,
    ("llama_1b", "galore"): 1.78,
}
ESTIMATE_KEYS = ("weights", "gradients", "optimizer_state", "activations", "step_temporaries", "total")
PUBLISHED_TOTAL = {("llama_7b", "galore8_pl"): 22.0}


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    optimizer: str  # osd-train --optimizer
    proj_type: str = "std"  # osd-train --proj_type
    estimator: str = "adamw"  # osd.memory.estimate's optimizer
    proj_optimizer: str | None = None  # osd's basis optimizer (None: adamw)

    @property
    def subspace(self) -> bool:
        return self.optimizer.startswith("galore_")

    @property
    def eight_bit(self) -> bool:
        return "8bit" in self.optimizer

    @property
    def per_layer(self) -> bool:
        return self.optimizer.endswith("_per_layer")


METHODS = [
    Method("adamw", "AdamW", "adamw"),
    Method("adamw8bit", "8-bit AdamW", "adamw8bit", estimator="adamw8bit"),
    Method("galore", "GaLore (svd)", "galore_adamw", "std", "galore"),
    Method("osd", "OSD (AdamW on P)", "galore_adamw", "continuous", "osd"),
    Method("galore8_pl", "8-bit GaLore, per-layer", "galore_adamw8bit_per_layer", "std", "galore"),
    Method(
        "osd8_pl",
        "8-bit OSD (8-bit Adam on P), per-layer",
        "galore_adamw8bit_per_layer",
        "continuous_adam8bit",
        "osd",
        "adam8bit",
    ),
]
BY_KEY = {m.key: m for m in METHODS}


def estimate_row(size: str, method: Method, rank: int, ckpt: bool, batch_size: int, seq_len: int):
    return estimate(
        size,
        optimizer=method.estimator,
        rank=rank if method.subspace else None,
        eight_bit=method.eight_bit,
        per_layer=method.per_layer,
        dtype="bfloat16",
        batch_size=batch_size,
        seq_len=seq_len,
        activation_checkpointing=ckpt,
        proj_optimizer=method.proj_optimizer,
    )


def trainer_args(method: Method, rank: int) -> SimpleNamespace:
    """The fields of osd-train's namespace that build_optimizer reads, at the recipes' values."""
    return SimpleNamespace(
        optimizer=method.optimizer,
        proj_type=method.proj_type,
        lr=1e-3,
        weight_decay=0.0,
        beta1=0.0,
        rank=rank,
        update_proj_gap=200,
        galore_scale=0.25,
        proj_lr=None,
        orth_reg=0.0,
        transport=False,
        retract_every=0,
        gradient_accumulation=1,
        grad_clipping=0.0,
    )


def measure(size: str, method: Method, rank: int, ckpt: bool, batch_size: int, seq_len: int, steps: int) -> dict:
    """Peak allocated bytes and tokens/s of ``steps`` bf16 training steps on random tokens."""
    from osd.cli_options import build_optimizer
    from osd.models import build_model, checkpoint_layers

    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model = build_model(size, torch.bfloat16, "cuda")
    config = model.config
    if ckpt:
        checkpoint_layers(model)
    model.train()
    optimizer = build_optimizer(model, trainer_args(method, rank))
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), device="cuda")
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() - base
    state = optimizer.state_bytes()
    timed = times[2:] or times
    del model, optimizer, ids
    gc.collect()
    torch.cuda.empty_cache()
    return dict(
        peak_bytes=peak,
        state_bytes=state,
        tokens_per_s=batch_size * seq_len * len(timed) / sum(timed),
        first_step_s=times[0],
    )


def rows(args) -> list[dict]:
    out = []
    for size in args.sizes:
        rank, ckpt = args.ranks[size], SIZES[size][1]
        for method in args.methods:
            if size == "llama_7b" and not method.per_layer:
                continue  # 7b: only the forms meant for a 24 GB card
            est = estimate_row(size, method, rank, ckpt, args.batch_size, args.seq_len)
            out.append(
                dict(
                    size=size,
                    method=method.key,
                    label=method.label,
                    rank=rank if method.subspace else None,
                    activation_checkpointing=ckpt,
                    estimate={k: getattr(est, k) for k in ESTIMATE_KEYS},
                    published_state_gb=PUBLISHED_STATE.get((size, method.estimator if not method.per_layer else "")),
                    published_total_gb=PUBLISHED_TOTAL.get((size, method.key)),
                )
            )
    return out


def _gb(n):
    return "" if n is None else f"{n / GB:.2f}"


def markdown(results: list[dict], batch_size: int, seq_len: int, device: str | None) -> str:
    measured = any("measured" in r for r in results)
    head = "| model | method | rank | state (GB) | GaLore paper state (GB) | estimated peak (GB) |"
    rule = "|---|---|---|---|---|---|"
    if measured:
        head += " measured peak (GB) | estimate / measured | tokens/s | tokens/s vs AdamW |"
        rule += "---|---|---|---|"
    lines = [
        f"bf16 weights, batch {batch_size} x {seq_len} tokens"
        + (f", measured on {device}" if device else "")
        + "; 7b rows with activation checkpointing; GB = 1e9 bytes",
        "",
        head,
        rule,
    ]
    base = {r["size"]: r["measured"]["tokens_per_s"] for r in results if r["method"] == "adamw" and "measured" in r}
    for r in results:
        e = r["estimate"]
        published = r["published_state_gb"]
        cells = [
            r["size"],
            r["label"] + (", act. ckpt" if r["activation_checkpointing"] else ""),
            str(r["rank"] or "full"),
            _gb(e["optimizer_state"]),
            "" if published is None else f"{published:.2f}",
            _gb(e["total"]) + (f" (paper: {r['published_total_gb']:.1f} measured)" if r["published_total_gb"] else ""),
        ]
        if measured:
            m = r.get("measured")
            if m is None:
                cells += [r.get("error", ""), "", "", ""]
            else:
                ratio = base.get(r["size"])
                cells += [
                    _gb(m["peak_bytes"]),
                    f"{e['total'] / m['peak_bytes']:.3f}",
                    f"{m['tokens_per_s']:,.0f}",
                    f"{m['tokens_per_s'] / ratio:.2f}x" if ratio else "",
                ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['size'].removeprefix('llama_')}\n{r['method']}" for r in results]
    x = range(len(results))
    fig, ax = plt.subplots(figsize=(max(8, len(results) * 0.6), 4.5))
    ax.bar([i - 0.2 for i in x], [r["estimate"]["total"] / GB for r in results], 0.4, label="estimate")
    measured = [r["measured"]["peak_bytes"] / GB if "measured" in r else 0 for r in results]
    if any(measured):
        ax.bar([i + 0.2 for i in x], measured, 0.4, label="max_memory_allocated")
    ax.set_xticks(list(x), labels, fontsize=7, rotation=90)
    ax.set_yscale("log")
    ax.set_ylabel("peak memory (GB)")
    ax.axhline(24, color="grey", lw=0.8, ls="--")
    ax.legend()
    ax.set_title("training memory: estimate vs measured")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", default=",".join(SIZES), help="comma-separated (default: %(default)s)")
    p.add_argument("--methods", default=",".join(BY_KEY), help="comma-separated (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per step (default: %(default)s)")
    p.add_argument("--seq_len", type=int, default=256, help="(default: %(default)s)")
    p.add_argument("--rank", type=int, help="one rank for every size (default: the GaLore paper's, 128 ... 1024)")
    p.add_argument("--measure", action="store_true", help="also train a few steps on CUDA and measure")
    p.add_argument(
        "--measured",
        type=Path,
        action="append",
        help="results.json of an earlier --measure run: compare its peaks with this estimator (repeatable)",
    )
    p.add_argument("--steps", type=int, default=5, help="measured steps per row (default: %(default)s)")
    p.add_argument("--out", type=Path, default=ROOT / "bench/out/memory", help="(default: bench/out/memory)")
    args = p.parse_args(argv)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown:
        p.error(f"unknown size(s) {', '.join(unknown)}; valid: {', '.join(SIZES)}")
    keys = [k.strip() for k in args.methods.split(",") if k.strip()]
    unknown = [k for k in keys if k not in BY_KEY]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(BY_KEY)}")
    args.methods = [BY_KEY[k] for k in keys]
    args.ranks = {size: (args.rank or rank) for size, (rank, _) in SIZES.items()}
    if args.measure and not torch.cuda.is_available():
        p.error("--measure needs a CUDA device (torch.cuda.max_memory_allocated)")
    if args.steps < 3:
        p.error("--steps must be at least 3 (the first two are not timed)")
    return args


def stored(paths: list[Path]) -> tuple[list[dict], str]:
    """Rows of earlier --measure runs, re-estimated with the current estimator."""
    out, devices = [], set()
    for path in paths:
        data = json.loads(path.read_text())
        devices.add(data["device"])
        for r in data["rows"]:
            if "measured" not in r:
                continue
            est = estimate_row(
                r["size"], BY_KEY[r["method"]], r["rank"] or 1, r["activation_checkpointing"], *data["batch"]
            )
            r["estimate"] = {k: getattr(est, k) for k in ESTIMATE_KEYS}
            out.append(r)
    return out, ", ".join(sorted(devices))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.measured:
        results, device = stored(args.measured)
        print(markdown(results, args.batch_size, args.seq_len, device + " (stored)"))
        return 0
    results = rows(args)
    device = torch.cuda.get_device_name() if args.measure else None
    if args.measure:
        args.out.mkdir(parents=True, exist_ok=True)
        for i, r in enumerate(results):
            rank, ckpt = args.ranks[r["size"]], SIZES[r["size"]][1]
            print(f"[{i + 1}/{len(results)}] {r['size']} {r['method']}", flush=True)
            try:
                r["measured"] = measure(
                    r["size"], BY_KEY[r["method"]], rank, ckpt, args.batch_size, args.seq_len, args.steps
                )
            except torch.OutOfMemoryError as e:
                r["error"] = "out of memory"
                print(f"    {e}", flush=True)
                gc.collect()
                torch.cuda.empty_cache()
                continue
            m = r["measured"]
            print(
                f"    peak {m['peak_bytes'] / GB:.2f} GB (estimate {r['estimate']['total'] / GB:.2f}), "
                f"{m['tokens_per_s']:,.0f} tokens/s, first step {m['first_step_s']:.1f} s",
                flush=True,
            )
            (args.out / "results.json").write_text(
                json.dumps(dict(device=device, batch=[args.batch_size, args.seq_len], rows=results), indent=1)
            )
    table = markdown(results, args.batch_size, args.seq_len, device)
    print(table)
    if args.measure:
        (args.out / "results.md").write_text(table + "\n")
        plot(results, args.out / "memory.png")
        print(f"wrote {args.out / 'results.json'}, results.md, memory.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
