"""Run metrics: ``metrics.jsonl`` (one JSON object per line) and loss-curve plots.

Training lines: ``step, loss, lr, tokens, tokens_per_s`` (+ ``grad_norm`` with clipping);
evaluation lines: ``step, eval_loss, eval_ppl, eval_tokens``. ``loss`` is the token-weighted
mean over the step's micro-batches and ranks; ``tokens`` counts non-pad input tokens seen
so far over all ranks.

Plot one or more runs::

    python -m osd.train plot RUN_DIR [RUN_DIR ...] -o curves.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

FILE = "metrics.jsonl"


class MetricsLog:
    """Appends lines to ``run_dir/metrics.jsonl``. On resume, lines after the resumed step
    (written by the interrupted run) are dropped first, so the file reads as one run; so is a
    partial line a killed process left. Non-finite numbers are written as ``null`` (bare
    ``NaN`` is not JSON), so every line stays valid JSON."""

    def __init__(self, run_dir, resume_step: int = 0):
        self.path = Path(run_dir) / FILE
        if self.path.exists():
            steps = [(line, _step(line)) for line in self.path.read_text().splitlines()]
            kept = [line for line, step in steps if step is not None and step <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean, allow_nan=False) + "\n")


def _step(line: str) -> int | None:
    """The step of a metrics line, or None for a line that is not a complete record."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record.get("step") if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def read(run_dir) -> list[dict]:
    """The records of a run (a partial last line, from a killed process, is skipped)."""
    path = Path(run_dir)
    path = path if path.is_file() else path / FILE
    return [json.loads(line) for line in path.read_text().splitlines() if _step(line) is not None]


def plot(run_dirs, out) -> None:
    """Training loss (left) and evaluation loss (right) against step, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    for run in run_dirs:
        records = read(run)
        label = Path(run).name
        train = [r for r in records if "loss" in r]
        evals = [r for r in records if "eval_loss" in r]
        ax_train.plot([r["step"] for r in train], [r["loss"] for r in train], label=label)
        ax_eval.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], marker="o", label=label)
    for ax, title in ((ax_train, "training loss"), (ax_eval, "evaluation loss")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="osd-train plot", description="Plot loss curves of runs.")
    parser.add_argument("runs", nargs="+", help="run directories (or metrics.jsonl files)")
    parser.add_argument("-o", "--output", default="curves.png")
    args = parser.parse_args(argv)
    for run in args.runs:
        path = Path(run)
        if not (path / FILE).is_file() and not path.is_file():
            parser.error(f"{run}: no {FILE}")
    plot(args.runs, args.output)
    print(f"wrote {args.output}")
    return 0
