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

``--device meta`` measures the same steps without a GPU and without computing anything:
the tensors live on PyTorch's ``meta`` device, and an allocation-tracking dispatch mode
(:class:`AllocatedPeak`) records the peak bytes of the tensors alive, weights included.
Attention runs FlashAttention's kernel (``aten._scaled_dot_product_flash_attention``, what
SDPA picks on an H100 in bf16) instead of the CPU's math fallback, and transformers' check
for packed sequences (a host read) is skipped. What it cannot see: CUDA kernels' own
workspaces (cuBLAS, FlashAttention's backward), the CUDA context and the allocator's
rounding and fragmentation; and the 8-bit kernels run their eager (CPU) path, which
allocates more than the fused CUDA one. A 7B config takes about a minute per 3 steps here.

Writes ``results.json`` (one row per config: ``config``, ``size``, ``rank``, ``label``,
``proj_optimizer``, ``estimate`` with ``total`` and the other rows, ``measured`` with
``peak_bytes``, ``tokens_per_s``, ``first_step_s``) and ``results.md`` to ``--out``.
With ``--device cpu`` it runs the same steps for the plumbing and reports the estimate
only (the CPU's allocations are not a GPU's).

    python bench/configs.py --configs configs/llama_7b_sgd.toml,configs/llama_7b_lean.toml \
        --out $OUT/configs -- --svd_method randomized
    python bench/configs.py --device meta --out bench/out/configs-meta
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
import weakref
from pathlib import Path
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from osd import cli_options, models, train
from osd.memory import GB, trainer_estimate

ROOT = Path(__file__).resolve().parents[1]
ESTIMATE_KEYS = ("weights", "gradients", "optimizer_state", "activations", "step_temporaries", "total")


class AllocatedPeak(TorchDispatchMode):
    """The peak bytes of the storages created while it is active and still alive (each freed
    when its last tensor dies): what the code run inside allocates on top of what existed
    before. An op's output that shares an input's storage (in place, ``out=``) is not new.
    Works on any device, ``meta`` included."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            leaves = torch.utils._pytree.tree_leaves((args, kwargs))
            inputs = {id(t.untyped_storage()) for t in leaves if isinstance(t, torch.Tensor)}
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    if id(storage) not in self.seen | inputs and storage.nbytes():
                        self.seen.add(id(storage))
                        self.live += storage.nbytes()
                        self.peak = max(self.peak, self.live)
                        weakref.finalize(storage, self._free, id(storage), storage.nbytes())
        return out

    def _free(self, key, nbytes):
        self.live -= nbytes
        self.seen.discard(key)


def _flash_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA as FlashAttention computes it on a GPU (what it saves: q, k, v, output, fp32
    logsumexp), for meta tensors, whose SDPA otherwise takes the math path."""
    if attn_mask is not None or enable_gqa:
        raise ValueError("the meta measurement runs causal attention without a mask only")
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=scale)[0]


@contextlib.contextmanager
def gpu_like_meta():
    """Meta-device runs as on a GPU: FlashAttention's kernel for SDPA, no packed-sequence
    check (a host read, impossible on meta; osd-train's batches are never packed that way)."""
    import transformers.masking_utils

    with (
        mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _flash_attention),
        mock.patch.object(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None),
    ):
        yield


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
    """``steps`` optimizer steps of what osd-train builds for ``args``: state bytes, tokens/s
    after the first step, the first step's time, and on CUDA or meta the peak bytes."""
    gc.collect()
    cuda, meta = device == "cuda", device == "meta"
    if cuda:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    tracker = AllocatedPeak()
    with gpu_like_meta() if meta else contextlib.nullcontext(), tracker if meta else contextlib.nullcontext():
        model, loss_of, optimizer = build(args, device)
        vocab = model.config.vocab_size
        times, peaks = [], []
        for _ in range(steps):
            if cuda:
                torch.cuda.synchronize()
            tracker.peak = tracker.live  # this step's peak
            start = time.perf_counter()
            for _ in range(args.gradient_accumulation):
                ids = torch.randint(0, vocab, (args.batch_size, args.max_length), device=device)
                loss_of(ids, ids).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            peaks.append(tracker.peak)
    out = dict(state_bytes=optimizer.state_bytes())
    if not meta:  # meta computes nothing: its time is Python's
        out["tokens_per_s"] = args.total_batch_size * args.max_length * len(times[1:]) / sum(times[1:])
        out["first_step_s"] = times[0]
    if cuda:
        out["peak_bytes"] = torch.cuda.max_memory_allocated() - base
    if meta:  # and without the first step (the initial bases), which osd.memory leaves out
        out["peak_bytes"], out["steady_peak_bytes"] = max(peaks), max(peaks[1:])
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
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "meta",
        help="cuda (measured), meta (allocations tracked, nothing computed) or cpu (no peak)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench/out/configs", help="(default: %(default)s)")
    args = p.parse_args(argv)
    args.configs = [c for c in args.configs.split(",") if c]
    missing = [c for c in args.configs if not Path(c).is_file()]
    if missing:
        p.error(f"no such config: {', '.join(missing)}")
    if args.steps < 2:
        p.error("--steps must be at least 2 (the first is not timed)")
    if args.device not in ("cuda", "meta", "cpu") or (args.device == "cuda" and not torch.cuda.is_available()):
        p.error(f"--device {args.device}: cuda (when torch sees one), meta or cpu")
    args.extra = extra
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = {
        "cuda": torch.cuda.get_device_name() if args.device == "cuda" else "",
        "meta": "meta device (allocations tracked, FlashAttention's, no CUDA workspaces)",
        "cpu": "cpu (no peak measured)",
    }[args.device]
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
            speed = (
                f", {m['tokens_per_s']:,.0f} tokens/s, first step {m['first_step_s']:.1f} s"
                if "tokens_per_s" in m
                else ""
            )
            print(f"    peak {m['peak_bytes'] / GB:.2f} GB" + speed, flush=True)
        rows.append(row)
        (args.out / "results.json").write_text(json.dumps(dict(device=device, rows=rows), indent=1))
    table = markdown(rows, device)
    (args.out / "results.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
