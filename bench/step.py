"""Optimizer step time and state bytes over all the weight matrices of LLaMA 60m / 350m.

The matrices are the ``nn.Linear`` weights (out, in) of every decoder layer: q, k, v, o
(hidden x hidden), gate, up (intermediate x hidden) and down (hidden x intermediate);
embeddings, norms and the head are left out (subspace optimizers treat them as plain
AdamW anyway). Gradients are random tensors set on ``.grad`` (no model forward).

Candidates (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.01 for all):

* ``torch AdamW foreach``: ``torch.optim.AdamW(foreach=True)``, the baseline of the ratios;
* ``torch AdamW fused``: ``torch.optim.AdamW(fused=True)``;
* ``torch AdamW for-loop``: ``torch.optim.AdamW(foreach=False)`` (reference; opt-in);
* ``osd AdamW8bit plain`` / ``online_pca``: ``osd.AdamW8bit`` (8-bit moments; a subspace
  group's r x k moments are 8-bit from 4096 elements on);
* ``torchao AdamW8bit``: ``torchao.optim.AdamW8bit`` (opt-in; it compiles one step per
  parameter shape on first use);
* ``osd AdamW plain``: ``osd.AdamW`` without ``rank`` (full-rank state);
* ``osd AdamW online_pca``: ``osd.AdamW`` with a subspace group (rank 128 for 60m, 256 for
  350m, update_gap 200, scale 0.25, side auto) and the library's defaults (SGD on P, Fira's
  residual); ``osd AdamW online_pca paper``: the OSD paper's configuration (AdamW on P, no
  correction); ``osd AdamW svd`` / ``random``: GaLore's and random bases, no correction (as
  galore-torch);
* ``galore AdamW``: ``galore_torch.GaLoreAdamW`` (same rank, scale, update_proj_gap,
  proj_type "std");
* ``products online_pca paper`` / ``products svd``: not optimizers, the floor under them: the
  m·n·r matrix products of a step alone (the paper's three, BᵀG, the PCA gradient's G·Rᵀ and
  B·D; SVD's and galore-torch's two, BᵀG and B·D), as one fp32 ``bmm`` per stack of
  same-shape matrices into preallocated outputs (basis on the smaller side, as ``side="auto"``).

All optimizers share the same parameter and gradient tensors (each keeps its own state),
which keeps the 350m run in memory; the parameter values drift, which does not matter for
timing. Each optimizer takes one first step (state initialisation, the initial SVD for
online_pca / svd / galore; reported as "first step"), a few warm-up steps, then timed
steady-state steps: all timed steps lie strictly between refreshes (step < update_gap), so
``ms/step`` never includes an SVD. The candidates are interleaved across repeats (order
rotated each repeat) and the median over repeats of the mean per step is reported.

A refresh step is timed separately for svd, random and galore by advancing each
parameter's step counter in the optimizer state to a multiple of update_gap (the refresh
condition both libraries test) and taking one step.

State bytes: osd ``optimizer.state_bytes()``; torch and galore the sum of ``nbytes`` of the
tensors in ``optimizer.state`` (galore: plus its projector's ``ortho_matrix``).

Ops per matrix: the non-view aten ops one steady-state step dispatches (each is at least one
kernel on a GPU), counted with a ``TorchDispatchMode`` for 16 layers of the model's matrices on
the benchmark's device (``--device``) with its stack settings, divided by the number of
matrices. The same steps are also run on the ``meta`` device, where any host read
(``.item()``, ``if tensor``) raises: the "host reads" column.

Writes OUT/step.md and the bar plot OUT/step.png (OUT defaults to bench/out).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import osd

# hidden, intermediate, layers, rank
MODELS = {"60m": (512, 1376, 8, 128), "350m": (1024, 2736, 24, 256)}
METHODS = [
    "torch AdamW foreach",
    "torch AdamW fused",
    "torch AdamW for-loop",
    "osd AdamW plain",
    "osd AdamW online_pca",
    "osd AdamW online_pca paper",
    "osd AdamW svd",
    "osd AdamW random",
    "galore AdamW",
    "osd AdamW8bit plain",
    "osd AdamW8bit online_pca",
    "torchao AdamW8bit",
    "products online_pca paper",
    "products svd",
]
DEFAULT_METHODS = [m for m in METHODS if m not in ("torch AdamW for-loop", "torchao AdamW8bit")]
OPS_LAYERS = 16  # dispatched ops are counted for this many layers of the model's matrices
REFRESHING = ("osd AdamW svd", "osd AdamW random", "galore AdamW")
PRODUCTS = {"products online_pca paper": 3, "products svd": 2}  # m·n·r products per matrix
BASELINE = "torch AdamW foreach"
# subspace-group options of the osd methods beyond rank, gap and scale: (projector, options)
OSD_GROUPS = {
    "online_pca": ("online_pca", {}),
    "online_pca paper": ("online_pca", {"proj_optimizer": "adamw", "correction": "none"}),
    "svd": ("svd", {"correction": "none"}),
    "random": ("random", {"correction": "none"}),
}
UPDATE_GAP, SCALE, LR, WD, EPS = 200, 0.25, 1e-3, 0.01, 1e-8


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "default: LLaMA 60m only (8 layers x 7 matrices, 25.3M weights), 7 interleaved repeats "
            "of ~0.3 s per candidate, 3 refresh-step repeats; about 1-2 minutes on an idle 2-core CPU. "
            "350m is opt-in (--models 60m,350m: 24 x 7 matrices, 302M weights, ~8 GB of RAM; it uses "
            "3 repeats and 1 refresh repeat unless --repeats / --refresh-repeats are given, and takes "
            "roughly 10 minutes on 2 cores, most of it in the initial and refresh SVDs)."
        ),
    )
    p.add_argument("--models", default="60m", help="comma-separated from: 60m, 350m (default: %(default)s)")
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma-separated candidates (default: all but the for-loop and torchao rows, the slowest)",
    )
    p.add_argument(
        "--max-stack-bytes", type=int, default=None, help="osd groups' max_stack_bytes (default: osd's, 512 MiB)"
    )
    p.add_argument(
        "--proj-dtype", default="auto", help="osd subspace groups' proj_dtype (default: %(default)s, the gradient's)"
    )
    p.add_argument("--rank", type=int, default=None, help="override the rank (default: 128 for 60m, 256 for 350m)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per candidate (default: 7; 3 for 350m)")
    p.add_argument("--refresh-repeats", type=int, default=None, help="refresh steps timed (default: 3; 1 for 350m)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps after the first step (default: %(default)s)")
    p.add_argument("--target-s", type=float, default=0.3, help="seconds per timed measurement (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument(
        "--profile", default=None, metavar="METHOD", help="also profile METHOD (torch.profiler) on the first model"
    )
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out", help="output folder")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in args.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; valid: {', '.join(MODELS)}")
    for m in args.methods + ([args.profile] if args.profile else []):
        if m not in METHODS:
            p.error(f"unknown method {m!r}; valid: {', '.join(METHODS)}")
    return args


def llama_shapes(hidden: int, inter: int, layers: int) -> list[tuple[int, int]]:
    """nn.Linear weight shapes (out, in) of all decoder layers."""
    return ([(hidden, hidden)] * 4 + [(inter, hidden)] * 2 + [(hidden, inter)]) * layers


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Products:
    """The m·n·r matrix products of a subspace step alone, for the shapes of ``params``: one
    fp32 ``bmm`` per product and stack of same-shape matrices, into preallocated outputs. Its
    ``step()`` is the time no projected step of these shapes can beat on the device."""

    def __init__(self, params: list, rank: int, products: int):
        self.state, self.products = {}, products
        shapes = {}
        for p in params:
            shapes[tuple(p.shape)] = shapes.get(tuple(p.shape), 0) + 1
        self.stacks = []
        for (m, n), k in shapes.items():
            small, big = min(m, n), max(m, n)  # basis on the smaller side: B small x r
            new = functools.partial(torch.randn, device=params[0].device)
            g, b = new(k, small, big), new(k, small, rank)
            self.stacks.append((g, b, new(k, rank, big), new(k, small, rank), new(k, small, big)))

    def step(self):
        for g, b, r, c, out in self.stacks:
            torch.bmm(b.mT, g, out=r)  # projection: B^T G, r x n
            if self.products == 3:
                torch.bmm(g, r.mT, out=c)  # the PCA gradient's G R^T, m x r
            torch.bmm(b, r, out=out)  # back: B D, m x n


def build(method: str, params: list, rank: int, proj_dtype: str = "auto", stack_bytes: int | None = None):
    if method in PRODUCTS:
        return Products(params, rank, PRODUCTS[method])
    if method == "torch AdamW foreach":
        return torch.optim.AdamW(params, lr=LR, eps=EPS, weight_decay=WD, foreach=True)
    if method == "torch AdamW fused":
        return torch.optim.AdamW(params, lr=LR, eps=EPS, weight_decay=WD, fused=True)
    if method == "torch AdamW for-loop":
        return torch.optim.AdamW(params, lr=LR, eps=EPS, weight_decay=WD, foreach=False)
    if method == "torchao AdamW8bit":
        from torchao.optim import AdamW8bit

        return AdamW8bit(params, lr=LR, eps=EPS, weight_decay=WD)
    if method.startswith("osd "):
        cls = osd.AdamW8bit if method.startswith("osd AdamW8bit") else osd.AdamW
        form = method.split(" ", 2)[-1]
        if form == "plain":
            return cls([dict(params=params, max_stack_bytes=stack_bytes)], lr=LR, eps=EPS, weight_decay=WD)
        projector, options = OSD_GROUPS[form]
        group = dict(params=params, rank=rank, projector=projector, update_gap=UPDATE_GAP, scale=SCALE, **options)
        group.update(proj_dtype=proj_dtype, max_stack_bytes=stack_bytes)
        return cls([group], lr=LR, eps=EPS, weight_decay=WD)
    if method == "galore AdamW":
        import galore_torch

        group = dict(params=params, rank=rank, update_proj_gap=UPDATE_GAP, scale=SCALE, proj_type="std")
        return galore_torch.GaLoreAdamW([group], lr=LR, eps=EPS, weight_decay=WD, no_deprecation_warning=True)
    raise ValueError(method)


def state_bytes(opt) -> int:
    if isinstance(opt, osd.SubspaceOptimizer):
        return opt.state_bytes()
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if hasattr(v, "codes") and hasattr(v, "scale"):  # torchao's 8-bit state tensor
                total += v.codes.nbytes + v.scale.nbytes
            elif torch.is_tensor(v):
                total += v.nbytes
            elif hasattr(v, "ortho_matrix"):  # galore's GaLoreProjector object
                mats = v.ortho_matrix if isinstance(v.ortho_matrix, list) else [v.ortho_matrix]
                total += sum(t.nbytes for t in mats if t is not None)
    return total


class _CountOps:
    """Counts the non-view aten ops a step dispatches (each is at least one GPU kernel)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if not func.is_view and func.namespace == "aten":
                    counter.total += 1
                return func(*args, **(kwargs or {}))

        self.total = 0
        self.mode = Mode()


def count_step(method: str, shapes, rank: int, proj_dtype: str, stack_bytes: int | None, device) -> float:
    """Non-view aten ops per matrix that one steady-state step dispatches on ``device``."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).mul_(0.02).to(device)) for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = build(method, params, rank, proj_dtype, stack_bytes)
        for _ in range(2):
            opt.step()
    count = _CountOps()
    with count.mode:
        opt.step()
    return count.total / len(shapes)


def ops_per_matrix(
    method: str, hidden: int, inter: int, rank: int, proj_dtype: str, stack_bytes: int | None, device
) -> tuple[float | None, str]:
    """(non-view aten ops per matrix in one steady-state step at OPS_LAYERS layers, counted
    on ``device`` with the benchmark's own stack settings; host reads), the host reads found
    by running the same steps on the meta device, where any (.item(), if tensor) raises."""
    shapes = llama_shapes(hidden, inter, OPS_LAYERS)
    try:
        count_step(method, shapes, rank, proj_dtype, stack_bytes, "meta")
        host = "none"
    except Exception as e:  # noqa: BLE001 - reported in the table
        text = str(e).lower()
        reads = any(k in text for k in ("item()", "copy out of meta", "data-dependent", "data dependent"))
        host = "host reads" if reads else "n/a: does not run on meta"
    return count_step(method, shapes, rank, proj_dtype, stack_bytes, device), host


def set_step(opt, step: int):
    """Put every parameter's step counter at ``step`` (a refresh step when it is a multiple
    of update_gap): osd and galore keep it as a Python int in the state."""
    for state in opt.state.values():
        state["step"] = step


def timed_steps(opt, device, number: int) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(number):
        opt.step()
    sync(device)
    return (time.perf_counter() - t0) / number


def run_model(model: str, args, device, log) -> list[dict]:
    hidden, inter, layers, rank = MODELS[model]
    rank = args.rank or rank
    big = model == "350m"
    repeats = args.repeats or (3 if big else 7)
    refresh_repeats = args.refresh_repeats if args.refresh_repeats is not None else (1 if big else 3)
    shapes = llama_shapes(hidden, inter, layers)
    n_weights = sum(m * n for m, n in shapes)
    log(f"== {model}: {len(shapes)} matrices, {n_weights / 1e6:.1f}M weights, rank {rank}; building tensors")
    gen = torch.Generator().manual_seed(args.seed)
    params = [torch.nn.Parameter((torch.randn(m, n, generator=gen) * 0.02).to(device)) for m, n in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)

    opts, first, number, steps = {}, {}, {}, {}
    for method in args.methods:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opts[method] = build(method, params, rank, args.proj_dtype, args.max_stack_bytes)
        first[method] = timed_steps(opts[method], device, 1)
        warm = timed_steps(opts[method], device, args.warmup) if args.warmup else first[method]
        number[method] = max(1, min(10, round(args.target_s / warm)))
        steps[method] = 1 + args.warmup
        log(
            f"{model} {method}: first step {first[method] * 1e3:.0f} ms, warm {warm * 1e3:.1f} ms/step, {number[method]} steps per repeat"
        )
        if 1 + args.warmup + repeats * number[method] >= UPDATE_GAP:
            sys.exit("too many steps: timed steps would reach a refresh (lower --repeats or --target-s)")

    times = {m: [] for m in args.methods}
    for rep in range(repeats):
        k = rep % len(args.methods)
        order = args.methods[k:] + args.methods[:k]
        for method in order:
            times[method].append(timed_steps(opts[method], device, number[method]))
            steps[method] += number[method]
        log(
            f"{model} repeat {rep + 1}/{repeats}: "
            + ", ".join(f"{m} {times[m][-1] * 1e3:.1f}" for m in args.methods)
            + " ms"
        )

    refresh = {m: [] for m in args.methods if m in REFRESHING}
    for rep in range(refresh_repeats):
        for method in refresh:
            set_step(opts[method], UPDATE_GAP * (rep + 1))
            refresh[method].append(timed_steps(opts[method], device, 1))
            log(f"{model} refresh {rep + 1}/{refresh_repeats}: {method} {refresh[method][-1] * 1e3:.0f} ms")

    rows = []
    base = statistics.median(times[BASELINE]) if BASELINE in times else None
    for method in args.methods:
        ms = statistics.median(times[method])
        ops, host = ops_per_matrix(method, hidden, inter, rank, args.proj_dtype, args.max_stack_bytes, device)
        rows.append(
            dict(
                model=model,
                method=method,
                ms=ms,
                ratio=ms / base if base else float("nan"),
                refresh=statistics.median(refresh[method]) if refresh.get(method) else None,
                first=first[method],
                mb=state_bytes(opts[method]) / 2**20,
                rank=rank,
                repeats=repeats,
                number=number[method],
                ops=ops,
                host_reads=host,
            )
        )

    if args.profile and not getattr(args, "_profiled", False):
        args._profiled = True
        profile(opts[args.profile], args, device, model, log)
    del opts, params
    return rows


def profile(opt, args, device, model, log):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    log(f"profiling {args.profile} on {model}: {args.profile_steps} steps")
    with torch_profile(activities=activities, record_shapes=True) as prof:
        for _ in range(args.profile_steps):
            opt.step()
        sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    text = prof.key_averages().table(sort_by=sort, row_limit=20)
    shapes = prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=25)
    print(text)

    # where the time goes by Python function (project, rule, project back, basis update)
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.profile_steps):
        opt.step()
    sync(device)
    profiler.disable()
    buf = io.StringIO()
    pstats.Stats(profiler, stream=buf).sort_stats("cumulative").print_stats(r"osd|galore|optim", 25)
    functions = buf.getvalue()
    print(functions)
    args.out.mkdir(parents=True, exist_ok=True)
    name = args.profile.replace(" ", "_")
    path = args.out / f"step_profile_{model}_{name}.txt"
    path.write_text(
        f"{args.profile} on {model}, {args.profile_steps} steps\n\n{text}\n\nby input shape:\n{shapes}\n\n"
        f"cProfile, cumulative, {args.profile_steps} steps:\n{functions}\n"
    )
    log(f"wrote {path}")


def format_table(rows) -> str:
    lines = [
        "| model | method | ms/step | vs torch AdamW foreach | refresh step ms | first step ms | state MB "
        f"| ops/matrix ({OPS_LAYERS} layers) | host reads |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for x in rows:
        refresh = f"{x['refresh'] * 1e3:.0f}" if x["refresh"] is not None else "-"
        ops = f"{x['ops']:.2f}" if x["ops"] is not None else "-"
        lines.append(
            f"| {x['model']} (r={x['rank']}) | {x['method']} | {x['ms'] * 1e3:.1f} | {x['ratio']:.2f}x | "
            f"{refresh} | {x['first'] * 1e3:.0f} | {x['mb']:.1f} | {ops} | {x['host_reads']} |"
        )
    return "\n".join(lines)


def targets(rows) -> list[str]:
    """The CPU targets of issue [1/5], each met or missed, for the 60m rows."""
    by = {x["method"]: x for x in rows if x["model"] == "60m"}
    out = []
    for method, limit in (
        ("osd AdamW online_pca", 4),
        ("osd AdamW online_pca paper", 4),
        ("osd AdamW svd", 4),
        ("osd AdamW8bit online_pca", 8),
    ):
        if method in by and by[method]["ops"] is not None:
            ops = by[method]["ops"]
            out.append(
                f"Target: {method} at most {limit} ops per matrix at {OPS_LAYERS} layers, no host reads: "
                f"{'met' if ops <= limit and by[method]['host_reads'] == 'none' else 'missed'} ({ops:.2f})."
            )
    for method in ("osd AdamW online_pca", "osd AdamW online_pca paper"):
        if method in by and BASELINE in by:
            ratio = by[method]["ratio"]
            out.append(
                f"Target: {method} at most 2.0x torch.optim.AdamW(foreach): "
                f"{'met' if ratio <= 2.0 else 'missed'} ({ratio:.2f}x)."
            )
    if "osd AdamW svd" in by and "galore AdamW" in by:
        ratio = by["osd AdamW svd"]["ms"] / by["galore AdamW"]["ms"]
        out.append(
            f"Target: osd.AdamW(svd) between refreshes at most 0.9x galore-torch's step: "
            f"{'met' if ratio <= 0.9 else 'missed'} ({ratio:.2f}x)."
        )
    floors = (
        ("products online_pca paper", BASELINE, 2.0, "the 2.0x target"),
        ("products svd", "galore AdamW", 0.9, "the 0.9x target"),
    )
    for floor, against, limit, name in floors:
        if floor in by and against in by:
            ratio = by[floor]["ms"] / by[against]["ms"]
            out.append(
                f"Floor: {floor} alone take {by[floor]['ms'] * 1e3:.1f} ms = {ratio:.2f}x {against}: "
                f"{name} is {'below' if ratio > limit else 'above'} the products' floor on this device."
            )
    return out


def plot(rows, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(x["model"] for x in rows))
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 4 * len(models)), squeeze=False)
    for row_axes, model in zip(axes, models, strict=True):
        sel = [x for x in rows if x["model"] == model]
        names = [x["method"].replace("osd AdamW ", "osd ").replace("torch AdamW ", "torch ") for x in sel]
        colors = [
            "tab:gray"
            if x["method"].startswith("torch")
            else "tab:orange"
            if x["method"].startswith("galore")
            else "tab:olive"
            if x["method"] in PRODUCTS
            else "tab:blue"
            for x in sel
        ]
        for ax, key, label in (
            (row_axes[0], "ms", "ms / step (steady state)"),
            (row_axes[1], "mb", "optimizer state (MB)"),
        ):
            values = [x[key] * (1e3 if key == "ms" else 1) for x in sel]
            bars = ax.bar(range(len(sel)), values, color=colors)
            for bar, x, v in zip(bars, sel, values, strict=True):
                note = f"{v:.0f}" + (f"\n{x['ratio']:.2f}x" if key == "ms" else "")
                ax.annotate(note, (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
            ax.set_xticks(range(len(sel)), names, rotation=25, ha="right", fontsize=8)
            ax.set_ylabel(label)
            ax.set_title(f"LLaMA {model} matrices (rank {sel[0]['rank']}): {label}", fontsize=10)
            ax.margins(y=0.2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device available")
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    header = f"device {device} ({where}), torch {torch.__version__}, fp32"
    load0 = os.getloadavg()[0]
    print(f"# step benchmark: {header}; load average {load0:.1f}", flush=True)
    rows = []
    for model in args.models:
        rows += run_model(model, args, device, log)

    table = format_table(rows)
    notes = [
        f"{header}; load average (1 min) at start {load0:.1f}, at end {os.getloadavg()[0]:.1f}.",
        "ms/step: median over interleaved repeats ("
        + ", ".join(f"{m}: {next(x['repeats'] for x in rows if x['model'] == m)}" for m in args.models)
        + ") of the mean of several consecutive steady-state steps (no refresh); refresh step: one "
        "step at a multiple of update_gap (svd / random / galore), median over refresh repeats; "
        "first step: the state-initialising step (includes the initial SVD for online_pca, svd, galore).",
        f"lr {LR}, weight decay {WD}, eps {EPS}, update_gap {UPDATE_GAP}, scale {SCALE}; state MB = 2^20 bytes.",
    ]
    notes += targets(rows)
    text = table + "\n\n" + "\n".join(notes) + "\n"
    print()
    print(text, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step.md").write_text(text)
    plot(rows, args.out / "step.png", header)
    print(f"wrote {args.out / 'step.md'} and {args.out / 'step.png'}")


if __name__ == "__main__":
    main()
