"""Time one basis update: online PCA (Online Subspace Descent) vs an SVD refresh (GaLore).

For each LLaMA weight shape m x n and rank r (r < min(m, n)) this times

* ``PCA``: one closed-form online-PCA step with AdamW on the basis, exactly what the
  optimizer runs around every weight update: ``osd.projectors.OnlinePCA().prepare`` and
  ``after_update`` (gradient norm, closed-form ``pca_grad`` reusing the projected gradient,
  Adam step on P)
  on a prepared state (orthonormal basis, Adam moments, projected gradient);
* ``PCA autograd`` (reference only): the same step with the PCA-loss gradient taken by
  autograd on ``||B B^T X - X||_F^2`` instead of the closed form (the OSD reference code);
* ``SVD``: one GaLore refresh, ``osd.projectors._svd_bases`` (``torch.linalg.svd(G,
  full_matrices=False)`` in fp32, then the top-r slice). The SVD is computed in full
  whatever r is, so it is timed once per shape and shown on every rank row.

The gradient is a seeded standard-normal fp32 matrix; the side is GaLore's "std" rule
(basis = smaller dimension x r), as ``side="auto"`` does.

Timings are medians over repeats, measured interleaved (per repeat: the SVD of a shape,
then PCA and PCA autograd at each rank), so that load on a shared machine hits all
candidates alike. Each PCA measurement runs enough calls to last ~0.1 s and reports the
mean per call.

Writes the markdown table to OUT/projection.md and a log-scale plot to
OUT/projection.png (OUT defaults to bench/out).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from osd import projectors

RECT = ["512x1376", "1024x2736", "2048x5461", "4096x11008"]  # LLaMA 60m, 350m, 1b, 7b MLP
SQUARE = ["512x512", "1024x1024", "2048x2048", "4096x4096"]  # attention q, k, v, o
RANKS = [128, 256, 512, 1024]
BIG = 4 * 1024 * 1024  # matrices with more elements than this count as "big" in --quick
TARGET_FROM = 1024 * 2736  # the 20x target applies from 1024x2736 up
TARGET = 20.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "default (--quick): all 8 shapes (512x1376, 1024x2736, 2048x5461, 4096x11008 and the "
            "square 512x512 .. 4096x4096) at ranks 128/256/512/1024 where rank < min(m, n): "
            "26 rows. PCA and PCA-autograd: 5 repeats (3 for matrices above 4M elements); "
            "SVD: 3 repeats (1 above 4M elements, i.e. 2048x5461, 4096x4096, 4096x11008). "
            "About 2-4 minutes on an idle 2-core CPU, dominated by the big SVDs; much longer "
            "when other jobs share the cores. --full: 10 PCA repeats and 3 SVD repeats everywhere."
        ),
    )
    p.add_argument("--shapes", default=",".join(RECT + SQUARE), help="comma-separated MxN list (default: %(default)s)")
    p.add_argument("--ranks", default=",".join(map(str, RANKS)), help="comma-separated ranks (default: %(default)s)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", default=True, help="few repeats, 1 SVD for big shapes (default)")
    mode.add_argument("--full", action="store_true", help="10 PCA repeats and 3 SVD repeats at every shape")
    p.add_argument("--repeats", type=int, default=None, help="PCA repeats at every shape (overrides the mode)")
    p.add_argument("--svd-repeats", type=int, default=None, help="SVD repeats at every shape (overrides the mode)")
    p.add_argument("--no-autograd", action="store_true", help="skip the autograd PCA reference")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out", help="output folder")
    return p.parse_args(argv)


def parse_shape(text: str) -> tuple[int, int]:
    m, n = text.lower().split("x")
    return int(m), int(n)


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device, number: int) -> float:
    """Mean seconds per call over ``number`` calls (device synchronised around them)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / number


def calibrate(fn, device, target_s: float = 0.1) -> int:
    """Warm ``fn`` up and return how many calls last about ``target_s``."""
    once = time_calls(fn, device, 1)  # warm-up (allocator, kernels)
    once = min(once, time_calls(fn, device, 1))
    return max(1, min(200, int(target_s / max(once, 1e-6))))


def pca_case(g: torch.Tensor, rank: int, seed: int):
    """A prepared online-PCA state for gradient ``g`` (as ``OnlinePCA.refresh`` leaves
    it, with a random orthonormal basis instead of an SVD) and the two step functions."""
    pca = projectors.OnlinePCA()  # reference defaults: AdamW on P, wd 0.01, lr 1/200
    g = g.unsqueeze(0)  # the projectors work on stacks: a stack of one matrix
    m, n = g.shape[-2:]
    rows, cols = projectors.resolve_sides("auto", m, n)
    key, dim = (projectors.ROWS, m) if rows else (projectors.COLS, n)
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, rank, generator=gen))
    state = {key: basis.unsqueeze(0).to(g.device)}
    for name, t in pca.rule.init(state[key].shape, g.device, pca.storage).items():
        state[f"{key}.{name}"] = t
    projected = projectors.project(g, state)

    def closed_form():
        pca.after_update(pca.prepare(g, projected, state, step=1), state, step=1, lr_ratio=1.0)

    def autograd():
        autograd_update(pca, g, state, step=1, lr_ratio=1.0)

    return closed_form, autograd


def autograd_update(pca: projectors.OnlinePCA, g, state, step, lr_ratio):
    """``OnlinePCA.after_update`` with the PCA gradient from autograd (one-sided case)."""
    norm = torch.linalg.matrix_norm(g).view(-1, 1, 1)
    lr = pca.lr if pca.lr is not None else lr_ratio / pca.update_gap
    for key, x in ((projectors.ROWS, g), (projectors.COLS, g.mT)):
        if key not in state:
            continue
        basis = state[key]
        with torch.enable_grad():
            b = basis.detach().requires_grad_()
            xn = x / norm
            loss = (b @ (b.mT @ xn) - xn).square().sum()
            (grad,) = torch.autograd.grad(loss, b)
        prefix = key + "."
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        new = basis * (1 - lr * pca.weight_decay)
        state[key] = new - pca.rule.update(grad, sub, lr, step, pca.storage)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device available")
    shapes = [parse_shape(s) for s in args.shapes.split(",") if s]
    ranks = [int(r) for r in args.ranks.split(",") if r]

    def repeats(m, n):
        big = m * n > BIG
        pca = args.repeats or (10 if args.full else (3 if big else 5))
        svd = args.svd_repeats or (3 if args.full or not big else 1)
        return pca, svd

    header = (
        f"device {device}"
        + (
            f" ({torch.cuda.get_device_name(device)})"
            if device.type == "cuda"
            else f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        )
        + f", torch {torch.__version__}, fp32, mode {'full' if args.full else 'quick'}"
    )
    load0 = os.getloadavg()[0]
    print(f"# projection benchmark: {header}; load average {load0:.1f}", flush=True)

    gen = torch.Generator().manual_seed(args.seed)
    cases = []  # (shape, g, [(rank, closed, autograd)])
    for m, n in shapes:
        g = torch.randn(m, n, generator=gen).to(device)
        rs = [r for r in ranks if r < min(m, n)]
        cases.append(((m, n), g, [(r, *pca_case(g, r, args.seed + r)) for r in rs]))

    # warm-up: LAPACK / cuSOLVER initialisation on a small matrix
    projectors._svd_bases(torch.randn(256, 256, device=device), 16, True, False)
    sync(device)

    svd_t: dict = {}
    pca_t: dict = {}
    auto_t: dict = {}
    numbers: dict = {}
    rounds = max(max(repeats(m, n)) for (m, n), _, _ in cases)
    t_start = time.perf_counter()
    for rep in range(rounds):
        for (m, n), g, rank_cases in cases:
            n_pca, n_svd = repeats(m, n)
            if rep < n_svd and rank_cases:
                sides = projectors.resolve_sides("auto", m, n)
                t = time_calls(lambda g=g, sides=sides: projectors._svd_bases(g, 128, *sides), device, 1)
                svd_t.setdefault((m, n), []).append(t)
                print(
                    f"[{time.perf_counter() - t_start:7.1f}s] repeat {rep + 1}: SVD {m}x{n}: {t * 1e3:.1f} ms",
                    flush=True,
                )
            if rep >= n_pca:
                continue
            for r, closed, auto in rank_cases:
                for name, fn, store in (("pca", closed, pca_t), ("autograd", auto, auto_t)):
                    if name == "autograd" and args.no_autograd:
                        continue
                    key = (m, n, r, name)
                    if key not in numbers:
                        numbers[key] = calibrate(fn, device)
                    store.setdefault((m, n, r), []).append(time_calls(fn, device, numbers[key]))
                line = f"PCA r={r}: {pca_t[(m, n, r)][-1] * 1e3:.2f} ms"
                if not args.no_autograd:
                    line += f", autograd {auto_t[(m, n, r)][-1] * 1e3:.2f} ms"
                print(f"[{time.perf_counter() - t_start:7.1f}s] repeat {rep + 1}: {m}x{n} {line}", flush=True)

    rows = []
    for (m, n), _, rank_cases in cases:
        for r, _, _ in rank_cases:
            pca = statistics.median(pca_t[(m, n, r)])
            auto = statistics.median(auto_t[(m, n, r)]) if not args.no_autograd else float("nan")
            svd = statistics.median(svd_t[(m, n)])
            rows.append(dict(m=m, n=n, r=r, pca=pca, auto=auto, svd=svd))

    table = format_table(rows, args.no_autograd)
    n_pca_desc = sorted({repeats(m, n)[0] for (m, n), _, _ in cases})
    n_svd_desc = sorted({repeats(m, n)[1] for (m, n), _, _ in cases})
    notes = [
        f"{header}; load average (1 min) at start {load0:.1f}, at end {os.getloadavg()[0]:.1f}.",
        f"Medians over {'/'.join(map(str, n_pca_desc))} PCA repeats and {'/'.join(map(str, n_svd_desc))} SVD "
        "repeats (fewer for the larger shapes); the SVD does not depend on the rank.",
        "PCA = `OnlinePCA().prepare` + `after_update` (closed-form gradient + AdamW step on P); "
        "autograd = the same step with the gradient from autograd; SVD = `_svd_bases` (torch.linalg.svd, fp32).",
    ]
    verdict = target_lines(rows)
    text = table + "\n\n" + "\n".join(notes + [""] + verdict) + "\n"
    print()
    print(text, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "projection.md").write_text(text)
    plot(rows, args.out / "projection.png", header, args.no_autograd)
    print(f"wrote {args.out / 'projection.md'} and {args.out / 'projection.png'}")


def format_table(rows, no_autograd: bool) -> str:
    cols = ["shape", "rank", "PCA ms", "PCA autograd ms", "SVD ms", "SVD / PCA", "autograd / PCA"]
    if no_autograd:
        cols = [c for c in cols if "autograd" not in c]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(cols))) + "|"]
    for x in rows:
        cells = [f"{x['m']}x{x['n']}", str(x["r"]), fmt_ms(x["pca"])]
        if not no_autograd:
            cells.append(fmt_ms(x["auto"]))
        cells += [fmt_ms(x["svd"]), f"{x['svd'] / x['pca']:.1f}x"]
        if not no_autograd:
            cells.append(f"{x['auto'] / x['pca']:.1f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def target_lines(rows) -> list[str]:
    covered = [x for x in rows if x["m"] * x["n"] >= TARGET_FROM]
    if not covered:
        return []
    missed = [x for x in covered if x["svd"] / x["pca"] < TARGET]
    head = (
        f"Target (issue 2): online PCA >= {TARGET:.0f}x cheaper than an SVD refresh at every shape from 1024x2736 up: "
    )
    if not missed:
        low = min(covered, key=lambda x: x["svd"] / x["pca"])
        return [
            head
            + f"met at all {len(covered)} rows (lowest {low['svd'] / low['pca']:.1f}x, {low['m']}x{low['n']} r={low['r']})."
        ]
    miss = ", ".join(f"{x['m']}x{x['n']} r={x['r']} ({x['svd'] / x['pca']:.1f}x)" for x in missed)
    return [head + f"missed at {len(missed)} of {len(covered)} rows: {miss}."]


def plot(rows, path: Path, title: str, no_autograd: bool):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("MLP shapes (m x n)", lambda m, n: m != n), ("attention shapes (square)", lambda m, n: m == n)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    ranks = sorted({x["r"] for x in rows})
    colors = dict(zip(ranks, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for ax, (label, keep) in zip(axes, groups, strict=True):
        sel = [x for x in rows if keep(x["m"], x["n"])]
        shapes = sorted({(x["m"], x["n"]) for x in sel}, key=lambda s: s[0] * s[1])
        pos = {s: i for i, s in enumerate(shapes)}
        if shapes:
            svd = {(x["m"], x["n"]): x["svd"] for x in sel}
            ax.plot([pos[s] for s in shapes], [svd[s] * 1e3 for s in shapes], "k-s", lw=2, label="SVD (any rank)")
        for r in ranks:
            pts = sorted(((pos[(x["m"], x["n"])], x) for x in sel if x["r"] == r), key=lambda t: t[0])
            if not pts:
                continue
            xs = [i for i, _ in pts]
            ax.plot(xs, [x["pca"] * 1e3 for _, x in pts], "-o", color=colors[r], label=f"online PCA r={r}")
            if not no_autograd:
                ax.plot(
                    xs, [x["auto"] * 1e3 for _, x in pts], ":^", color=colors[r], alpha=0.7, label=f"PCA autograd r={r}"
                )
        ax.set_xticks(range(len(shapes)), [f"{m}x{n}" for m, n in shapes])
        ax.set_yscale("log")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("time of one basis update (ms, log)")
    axes[1].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Online PCA step vs SVD refresh -- {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
