"""Training quality per byte of optimizer state: every method on the same data (the C4 sample by default), same model,
seed, data order and token budget, through the trainer (``osd.train.run``).

Methods (``--methods``; rank-``r`` rows for every ``--ranks`` value):

* ``adamw``: full-rank AdamW (``osd.AdamW``, the trainer's ``--optimizer adamw``);
* ``adamw8bit``: full-rank 8-bit AdamW (``osd.AdamW8bit``);
* ``galore``: ours, ``--optimizer galore_adamw --proj_type std`` (SVD every T steps);
* ``galore_ref``: the reference ``galore_torch.GaLoreAdamW`` (proj_type "std");
* ``osd_adamw``, ``osd_sgd``, ``osd_lion``: Online Subspace Descent with AdamW / SGD / Lion
  on the basis (``--proj_type continuous``, ``continuous_sgd``, ``continuous_lion``);
* ``random``: random projection redrawn every T steps (``--proj_type random``);
* ``apollo``, ``fira``: ``pytorch_optimizer.APOLLO`` (random projection, channel-wise
  scaling) and ``pytorch_optimizer.Fira`` (SVD projection + scaled full-rank residual);
* our full-rank corrections (``--correction``, :mod:`osd.corrections`): ``galore_fira``,
  ``osd_fira`` and ``osd_sgd_fira`` (Fira's residual on the SVD / online-PCA projector; the
  last with SGD on P, GaLore's and Fira's state size), ``apollo_osd`` (APOLLO:
  random projector, channel-wise scaled gradient) and ``osd_apollo`` (APOLLO's scaling on
  online PCA);
* ablations of ``osd_adamw``: ``osd_transport`` (``--transport``), ``osd_orth``
  (``--orth_reg 0.1 --proj_lr 5*lr``, the OSD paper's text) and ``osd_retract``
  (``--retract_every 10``).

External optimizers (galore-torch, pytorch-optimizer) reach the trainer through
``train.run(argv, build_optimizer=...)``; all methods project the same matrices (attention
and MLP weights, ``osd.param_groups``), everything else is plain AdamW-style state.

Presets (flags below override single fields; the data default: blogs for gpu/cpu, the C4
sample otherwise):

* ``default``: llama_20m, seq 256 (truncate-and-pad), batch 16, 112 steps (about one pass
  over the 1,800 train documents), warmup 10%, cosine to 10%, ranks 64 and 128, seeds 0 and
  1, lr per method chosen from a grid of 3 (lowest mean final eval loss over seeds; grid and
  choice reported), SVD/random gap T=200, evaluation on the whole validation file. Many
  hours on a 2-core CPU.
* ``quick``: llama_9m, seq 128, batch 8, 60 steps (~60k tokens: early training only),
  ranks 32 and 64 (the same 1/4 and 1/2 of the width as 64/128 at llama_20m), seeds 0 and 1,
  ONE lr per method from the literature (no grid), T=20 for SVD/random refreshes (at steps
  0, 20, 40), 3 evaluations on 8,192 validation tokens, one torch thread. About 50 minutes
  on a 2-core CPU (48 runs).

* ``gpu`` (issue [5/5]'s protocol, for one device call of at most 8 minutes on one H100, an
  estimate: it has not run yet): the blogs data (``../shared/data/blogs``), llama_60m, seq
  256, batch 32, 800 steps (about 5.1M non-pad tokens; blogs documents average 200 tokens of
  256), bf16, rank 128, seeds 0 and 1, every method but the ablations (15). First a
  160-step lr-selection run per method and lr of its grid of 3 (seed 0), then both seeds at
  the lr with the lowest selection loss: 45 + 30 runs, 4 at a time (``--jobs``).
  ``bash bench/gpu.sh --prepare-quality`` then ``STAGES=quality bash bench/gpu.sh`` on the
  device (see bench/gpu.sh).
* ``cpu``: the same protocol scaled to this 2-core CPU (about 3 hours here with other work sharing the machine, 2
  runs at a time on one thread each): llama_9m, seq 128, batch 16, 150 steps (about 285k
  non-pad tokens, 18 times fewer than gpu, with a model 7 times smaller), fp32, rank 32
  (1/4 of the width, as 128 of 512), 40-step selection runs, 14 methods (OSD with Lion on P
  left out): 42 + 28 runs.

In every preset online PCA's P lr follows the reference rule (1/200) * lr_t/lr_0 (its
``update_proj_gap`` only sets that lr). Seeds change the initial weights; the data order is
the same for every run (the trainer's shuffle seed 42).

Reported per method: final eval loss and perplexity (mean over seeds, +- half the min-max
range), optimizer-state bytes (osd: ``optimizer.state_bytes()``; others: the tensors in
``optimizer.state`` plus their projectors' bases), in all and for the attention/MLP matrices
alone (the embeddings and head, plain in every method, are most of the state of these small
models with a 32k vocabulary), and the median wall time per step as a
ratio to AdamW with the same seed in the same invocation. Each finished run is kept in
OUT/runs/RUN/result.json and reused by the next invocation with the same settings, so an
interrupted benchmark continues where it stopped. Writes OUT/results.json, OUT/results.md,
OUT/eval_loss.png and OUT/pareto.png.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "../shared/data"
OSD_PROJ_GAP = 200  # online PCA: P lr = (1/200) * lr_t / lr_0, the reference's setting

PRESETS = {
    "default": dict(
        model_config="llama_20m",
        max_length=256,
        batch_size=16,
        num_training_steps=112,
        eval_every=28,
        eval_tokens=10_000_000,  # the whole validation file
        update_proj_gap=200,
        ranks=[64, 128],
        seeds=[0, 1],
        lr_grid=True,
        threads=None,
    ),
    "quick": dict(
        model_config="llama_9m",
        max_length=128,
        batch_size=8,
        num_training_steps=60,
        eval_every=20,
        eval_tokens=8192,
        update_proj_gap=20,
        ranks=[32, 64],
        seeds=[0, 1],
        lr_grid=False,
        threads=1,  # a shared 2-core machine: 2 threads slow down ~10x when another process computes
    ),
    # [5/5]'s protocol on the blogs data: a short lr-selection run per method and lr (seed 0,
    # the first rank), then every seed at the chosen lr; meant to leave the unigram plateau (not run yet)
    "gpu": dict(
        model_config="llama_60m",
        max_length=256,
        batch_size=32,
        num_training_steps=800,  # about 5.1M non-pad tokens (blogs documents average 200 of 256)
        eval_every=200,
        eval_tokens=524_288,
        update_proj_gap=200,
        ranks=[128],
        seeds=[0, 1],
        lr_grid=True,
        select_steps=160,
        dtype="bfloat16",
        jobs=4,  # runs at once on the one GPU (a 60m model leaves most of an H100 idle)
        threads=None,
        data="blogs",
        ablations=False,  # default methods: all but the ablations (15)
    ),
    "cpu": dict(
        model_config="llama_9m",
        max_length=128,
        batch_size=16,
        num_training_steps=150,  # about 285k non-pad tokens
        eval_every=50,
        eval_tokens=32_768,
        update_proj_gap=50,
        ranks=[32],
        seeds=[0, 1],
        lr_grid=True,
        select_steps=40,
        exclude=["osd_lion"],  # from the default methods: 14 left, 42 selection + 28 full runs
        jobs=2,  # one run per core, one thread each
        threads=1,
        data="blogs",
        ablations=False,
    ),
}
OUT_DEFAULT = {
    "default": "bench/out/quality",
    "quick": "bench/out/quality-quick",
    "gpu": "bench/out/quality-gpu",
    "cpu": "bench/out/quality-cpu",
}
DATA_FILES = {
    "c4": ("c4-sample/c4-sample-train.json.gz", "c4-sample/c4-sample-validation.json.gz"),
    "blogs": ("blogs/blogs-train.jsonl.gz", "blogs/blogs-validation.jsonl.gz"),
}


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    lr: float  # the literature's lr (quick preset, and the middle of the default grid)
    subspace: bool = True  # takes a rank
    flags: dict = field(default_factory=dict)  # trainer flags (osd methods)
    factory: Callable | None = None  # external optimizers: (model, args) -> optimizer
    ablation: bool = False
    scale: float = 0.25

    def lr_grid(self) -> list[float]:
        return [self.lr * 0.3, self.lr, self.lr * 3]


def _external_groups(model, args, **subspace):
    import osd

    plain, sub = osd.param_groups(model, args.rank)
    return [{"params": plain["params"]}, {"params": sub["params"], "rank": args.rank, **subspace}]


def galore_reference(model, args):
    from galore_torch import GaLoreAdamW

    groups = _external_groups(
        model, args, update_proj_gap=args.update_proj_gap, scale=args.galore_scale, proj_type="std"
    )
    return GaLoreAdamW(groups, lr=args.lr, weight_decay=args.weight_decay, no_deprecation_warning=True)


def apollo(model, args):
    # APOLLO paper: random projection, channel-wise scaling, alpha 1, lr 1e-2, T 200
    from pytorch_optimizer import APOLLO

    groups = _external_groups(
        model, args, update_proj_gap=args.update_proj_gap, scale=args.galore_scale, projection_type="std"
    )
    return APOLLO(groups, lr=args.lr, weight_decay=args.weight_decay, scale_type="channel")


def fira(model, args):
    # Fira paper: SVD projection (GaLore's), alpha 0.25, lr 1e-2, T 200
    from pytorch_optimizer import Fira

    groups = _external_groups(
        model, args, update_proj_gap=args.update_proj_gap, scale=args.galore_scale, projection_type="std"
    )
    return Fira(groups, lr=args.lr, weight_decay=args.weight_decay)


def _osd(proj_type, **extra):
    return dict(optimizer="galore_adamw", proj_type=proj_type, **extra)


METHODS = [
    Method("adamw", "AdamW", 1e-3, subspace=False, flags=dict(optimizer="adamw")),
    Method("adamw8bit", "8-bit AdamW", 1e-3, subspace=False, flags=dict(optimizer="adam8bit")),
    Method("galore", "GaLore (osd, svd)", 1e-2, flags=_osd("std")),
    Method("galore_ref", "GaLore (galore-torch)", 1e-2, factory=galore_reference),
    Method("osd_adamw", "OSD, AdamW on P", 1e-2, flags=_osd("continuous")),
    Method("osd_sgd", "OSD, SGD on P", 1e-2, flags=_osd("continuous_sgd")),
    Method("osd_lion", "OSD, Lion on P", 1e-2, flags=_osd("continuous_lion")),
    Method("random", "random projection (osd)", 1e-2, flags=_osd("random")),
    Method("apollo", "APOLLO (pytorch-optimizer)", 1e-2, factory=apollo, scale=1.0),
    Method("fira", "Fira (pytorch-optimizer)", 1e-2, factory=fira),
    Method("galore_fira", "GaLore + Fira correction (osd)", 1e-2, flags=_osd("std", correction="fira")),
    Method("osd_fira", "OSD + Fira correction (osd)", 1e-2, flags=_osd("continuous", correction="fira")),
    Method("osd_sgd_fira", "OSD + Fira, SGD on P (osd)", 1e-2, flags=_osd("continuous_sgd", correction="fira")),
    Method("apollo_osd", "APOLLO (osd, random projector)", 1e-2, flags=_osd("random", correction="apollo"), scale=1.0),
    Method("osd_apollo", "OSD + APOLLO scaling (osd)", 1e-2, flags=_osd("continuous", correction="apollo"), scale=1.0),
    Method("osd_transport", "OSD + transport", 1e-2, flags=_osd("continuous", transport=True), ablation=True),
    Method("osd_orth", "OSD + orth_reg 0.1, P lr 5x", 1e-2, flags=_osd("continuous", orth_reg=0.1), ablation=True),
    Method("osd_retract", "OSD + QR every 10", 1e-2, flags=_osd("continuous", retract_every=10), ablation=True),
    # bf16 storage of the bases (the 7B configs' basis_dtype) against fp32, for two P optimizers
    Method(
        "osd_sgd_bf16_bases",
        "OSD, SGD on P, bf16 bases",
        1e-2,
        flags=_osd("continuous_sgd", basis_dtype="bfloat16"),
        ablation=True,
    ),
    Method(
        "osd_sgd_fira_bf16_bases",
        "OSD + Fira, SGD on P, bf16 bases",
        1e-2,
        flags=_osd("continuous_sgd", correction="fira", basis_dtype="bfloat16"),
        ablation=True,
    ),
]
BY_KEY = {m.key: m for m in METHODS}


def default_methods(cfg) -> list[str]:
    """A preset's methods: all, or all but the ablations, less its ``exclude`` list."""
    keep = cfg.get("ablations", True)
    return [m.key for m in METHODS if (keep or not m.ablation) and m.key not in cfg.get("exclude", [])]


NEEDS = {"galore_ref": "galore_torch", "apollo": "pytorch_optimizer", "fira": "pytorch_optimizer"}


def available(key: str) -> bool:
    """Whether ``key``'s package imports (galore-torch also needs bitsandbytes at import)."""
    if key not in NEEDS:
        return True
    try:
        importlib.import_module(NEEDS[key])
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- one run


def state_bytes(optimizer, params=None) -> int:
    """Bytes of optimizer state, of all parameters or of ``params`` only. osd: what
    ``state_bytes()`` counts (8-bit codes + scales); others: the tensors in
    ``optimizer.state`` plus the bases their projector objects hold (galore-torch and
    pytorch-optimizer keep a Python projector there)."""
    if params is None and hasattr(optimizer, "state_bytes"):
        return optimizer.state_bytes()
    keep = None if params is None else {id(p) for p in params}

    def size(v):
        if torch.is_tensor(v):
            return v.nbytes
        if isinstance(v, list | tuple):
            return sum(size(x) for x in v)
        if hasattr(v, "ortho_matrix"):
            return size(v.ortho_matrix)
        return 0

    return sum(size(v) for p, s in optimizer.state.items() if keep is None or id(p) in keep for v in s.values())


def matrix_params(model) -> list:
    """The weights every subspace method projects (attention and MLP matrices)."""
    import osd

    return osd.param_groups(model, 1)[1]["params"]


def run_spec(method: Method, rank, seed, lr, cfg, select: bool = False) -> dict:
    """Everything that decides a run's result: a stored result is reused only if equal.
    ``select``: the short lr-selection run (``cfg["select_steps"]`` steps, one evaluation)."""
    flags = dict(method.flags) if method.factory is None else _osd("std")  # recorded only, for externals
    if method.key == "osd_orth":
        flags["proj_lr"] = 5 * lr
    online_pca = method.factory is None and flags.get("proj_type", "").startswith("continuous")
    steps = cfg["select_steps"] if select else cfg["num_training_steps"]
    spec = dict(
        method=method.key,
        rank=rank,
        seed=seed,
        lr=lr,
        scale=method.scale,
        flags=flags,
        model_config=cfg["model_config"],
        max_length=cfg["max_length"],
        batch_size=cfg["batch_size"],
        num_training_steps=steps,
        warmup_steps=max(1, steps // 10),
        eval_every=steps if select else cfg["eval_every"],
        eval_tokens=cfg["eval_tokens"],
        update_proj_gap=OSD_PROJ_GAP if online_pca else cfg["update_proj_gap"],
        train_data=str(cfg["train_data"]),
        eval_data=str(cfg["eval_data"]),
        tokenizer=str(cfg["tokenizer"]),
    )
    if cfg.get("dtype", "float32") != "float32":  # absent from the fp32 presets' specs: their runs stay reusable
        spec["dtype"] = cfg["dtype"]
    if select:
        spec["stage"] = "select"
    return spec


def run_id(spec) -> str:
    rank = f"-r{spec['rank']}" if spec["rank"] else ""
    stage = "select-" if spec.get("stage") == "select" else ""
    return f"{stage}{spec['method']}{rank}-lr{spec['lr']:g}-s{spec['seed']}"


def trainer_argv(spec, save_dir) -> list[str]:
    flags = dict(
        model_config=spec["model_config"],
        dataset=spec["train_data"],
        eval_dataset=spec["eval_data"],
        tokenizer=spec["tokenizer"],
        max_length=spec["max_length"],
        batch_size=spec["batch_size"],
        num_training_steps=spec["num_training_steps"],
        warmup_steps=spec["warmup_steps"],
        eval_every=spec["eval_every"],
        eval_tokens=spec["eval_tokens"],
        lr=spec["lr"],
        seed=spec["seed"],
        dtype=spec.get("dtype", "float32"),
        save_every=10**9,  # the trainer still saves once, at the last step
        keep_checkpoints=1,
        log_every=10**9,
        save_dir=str(save_dir),
        **spec["flags"],
    )
    if spec["rank"]:
        flags.update(rank=spec["rank"], galore_scale=spec["scale"], update_proj_gap=spec["update_proj_gap"])
    from osd.train import flags_to_argv

    return flags_to_argv(flags)


def summarize_metrics(path: Path, diverged: bool = False) -> dict:
    """Curves and step time of a run; a run the trainer stopped for a non-finite loss has a
    NaN final loss (its last line carries no token counts)."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train_lines = [r for r in records if "tokens_per_s" in r]
    tokens_at = {r["step"]: r["tokens"] for r in train_lines}
    evals = [
        {"step": r["step"], "tokens": tokens_at[r["step"]], "eval_loss": r["eval_loss"], "eval_ppl": r["eval_ppl"]}
        for r in records
        if "eval_loss" in r
    ]
    step_times, prev = [], 0
    for r in train_lines:
        step_times.append((r["tokens"] - prev) / r["tokens_per_s"])
        prev = r["tokens"]
    # the first step initialises state (and takes the initial SVD): left out of the median
    steady = step_times[1:] or step_times
    return dict(
        final_eval_loss=math.nan if diverged or not evals else evals[-1]["eval_loss"],
        final_eval_ppl=math.nan if diverged or not evals else evals[-1]["eval_ppl"],
        evals=evals,
        train_loss=[[r["step"], r["tokens"], r["loss"]] for r in train_lines],
        step_time_s=statistics.median(steady) if steady else math.nan,
        tokens=train_lines[-1]["tokens"] if train_lines else 0,
    )


def train_once(spec, run_dir: Path, method: Method) -> dict:
    from osd import cli_options, train

    if run_dir.exists():
        shutil.rmtree(run_dir)  # an interrupted run: start it again
    run_dir.mkdir(parents=True)
    save_dir = run_dir / "train"
    start = time.perf_counter()
    with (
        open(run_dir / "train.log", "w") as log,
        contextlib.redirect_stdout(log),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")  # library chatter (deprecations) would swamp progress
        built = {}

        def factory(model, args):
            build = method.factory or cli_options.build_optimizer  # None: the trainer's own
            built.update(model=model, optimizer=build(model, args))
            return built["optimizer"]

        try:
            model, optimizer = train.run(trainer_argv(spec, save_dir), build_optimizer=factory)
            diverged = None
        except train.Diverged as e:  # the trainer stops a run whose loss is not finite
            model, optimizer, diverged = built["model"], built["optimizer"], str(e)
    wall = time.perf_counter() - start
    result = dict(
        spec=spec,
        state_bytes=state_bytes(optimizer),
        matrix_state_bytes=state_bytes(optimizer, matrix_params(model)),
        wall_s=wall,
        diverged=diverged,
    )
    result.update(summarize_metrics(save_dir / "metrics.jsonl", diverged is not None))
    del model, optimizer
    gc.collect()
    for ckpt in save_dir.glob("model_*"):  # weights are not needed, only the metrics
        shutil.rmtree(ckpt)
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    return result


def load_result(run_dir: Path, spec) -> dict | None:
    path = run_dir / "result.json"
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except ValueError:
        return None
    return result if result.get("spec") == spec else None


# --------------------------------------------------------------------------- the benchmark


def _done(out: Path, spec) -> bool:
    return load_result(out / "runs" / run_id(spec), spec) is not None


def plan(cfg, methods, chosen: dict | None = None) -> list[tuple[Method, int | None, int, float]]:
    """(method, rank, seed, lr) of every run, AdamW first within each seed (the baseline of
    the step-time ratios): each lr of the grid, the literature's lr, or the ``chosen`` one."""
    runs = []
    for seed in cfg["seeds"]:
        for m in methods:
            for rank in cfg["ranks"] if m.subspace else [None]:
                if chosen is not None:
                    lrs = [chosen[m.key]]
                else:
                    lrs = m.lr_grid() if cfg["lr_grid"] else [m.lr]
                for lr in lrs:
                    runs.append((m, rank, seed, lr))
    return runs


def selection_plan(cfg, methods) -> list[tuple[Method, int | None, int, float]]:
    """The lr-selection runs: every lr of each method's grid, first seed, first rank."""
    seed, rank = cfg["seeds"][0], cfg["ranks"][0]
    return [(m, rank if m.subspace else None, seed, lr) for m in methods for lr in m.lr_grid()]


def choose_lrs(results) -> dict[str, float]:
    """Each method's lr with the lowest final eval loss among its selection runs (a diverged
    run never wins; if all diverged, the grid's lowest lr)."""
    best = {}
    for r in results:
        key, lr, loss = r["spec"]["method"], r["spec"]["lr"], _finite(r["final_eval_loss"])
        if key not in best or (loss, lr) < best[key]:
            best[key] = (loss, lr)
    return {key: lr for key, (_, lr) in best.items()}


def _finite(loss: float) -> float:
    return loss if math.isfinite(loss) else math.inf


def spread(values):
    return (max(values) - min(values)) / 2 if len(values) > 1 else 0.0


def aggregate(cfg, methods, results, selection=()) -> list[dict]:
    """One row per (method, rank): the lr with the lowest mean final eval loss over seeds
    (with a selection stage only the chosen lr ran; ``lr_selection`` holds its runs' losses)."""
    baseline = {r["spec"]["seed"]: r["step_time_s"] for r in results if r["spec"]["method"] == "adamw"}
    rows = []
    for m in methods:
        for rank in cfg["ranks"] if m.subspace else [None]:
            by_lr = {}
            for r in results:
                s = r["spec"]
                if s["method"] == m.key and s["rank"] == rank:
                    by_lr.setdefault(s["lr"], []).append(r)
            if not by_lr:
                continue
            grid = {lr: statistics.mean(r["final_eval_loss"] for r in rs) for lr, rs in sorted(by_lr.items())}
            lr = min(grid, key=lambda k: _finite(grid[k]))  # a diverged run (nan) never wins
            runs = sorted(by_lr[lr], key=lambda r: r["spec"]["seed"])
            losses = [r["final_eval_loss"] for r in runs]
            ppls = [r["final_eval_ppl"] for r in runs]
            ratios = [r["step_time_s"] / baseline[r["spec"]["seed"]] for r in runs if r["spec"]["seed"] in baseline]
            curve = [
                [e["tokens"], statistics.mean(r["evals"][i]["eval_loss"] for r in runs)]
                for i, e in enumerate(runs[0]["evals"])
            ]
            rows.append(
                dict(
                    method=m.key,
                    label=m.label,
                    rank=rank,
                    ablation=m.ablation,
                    lr=lr,
                    lr_grid={f"{k:g}": v for k, v in grid.items()},
                    lr_selection={
                        f"{r['spec']['lr']:g}": r["final_eval_loss"]
                        for r in sorted(selection, key=lambda r: r["spec"]["lr"])
                        if r["spec"]["method"] == m.key
                    },
                    seeds=[r["spec"]["seed"] for r in runs],
                    eval_loss=losses,
                    eval_loss_mean=statistics.mean(losses),
                    eval_loss_spread=spread(losses),
                    eval_ppl_mean=statistics.mean(ppls),
                    eval_ppl_spread=spread(ppls),
                    state_bytes=runs[0]["state_bytes"],
                    matrix_state_bytes=runs[0]["matrix_state_bytes"],
                    step_time_s=statistics.mean(r["step_time_s"] for r in runs),
                    step_time_ratio=statistics.mean(ratios) if ratios else None,
                    eval_curve=curve,
                )
            )
    return rows


def winners(rows) -> list[str]:
    """One line per memory level (full rank, each rank): the best row, its margin over the
    runner-up and over the best OSD row, each next to the seed spreads."""
    lines = []
    levels = [(None, "full rank")] + sorted({(r["rank"], f"rank {r['rank']}") for r in rows if r["rank"]})
    for rank, name in levels:
        level = sorted((r for r in rows if r["rank"] == rank), key=lambda r: _finite(r["eval_loss_mean"]))
        if not level:
            continue
        best = level[0]
        text = f"{name}: {best['label']} {best['eval_loss_mean']:.3f} +- {best['eval_loss_spread']:.3f}"
        if len(level) > 1:
            second = level[1]
            gap = second["eval_loss_mean"] - best["eval_loss_mean"]
            within = gap <= best["eval_loss_spread"] + second["eval_loss_spread"]
            text += f"; runner-up {second['label']} +{gap:.3f}" + (" (within the seed spread)" if within else "")
        osd_rows = [r for r in level if r["method"].startswith("osd_") and r is not best]
        osd_rows = [r for r in osd_rows if math.isfinite(r["eval_loss_mean"])]
        if osd_rows and not best["method"].startswith("osd_"):
            o = osd_rows[0]
            text += f"; best OSD row {o['label']} +{o['eval_loss_mean'] - best['eval_loss_mean']:.3f}"
        lines.append(text)
    return lines


def _mib(n):
    return n / 2**20


def data_name(path) -> str:
    """A data file's name for titles and captions: the file name without its extensions
    (``c4-sample-validation``, ``blogs-train``)."""
    name = Path(str(path)).name
    for suffix in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name


def data_names(summary) -> tuple[str, str]:
    """(train, eval) data names of a summary (the shared C4 sample's for old summaries)."""
    data = summary["protocol"].get("data", {})
    return (
        data_name(data.get("train", "c4-sample-train")),
        data_name(data.get("eval", "c4-sample-validation")),
    )


def _lr_protocol(p) -> str:
    if p.get("select_steps"):
        return (
            f"per method from a grid of 3 by a {p['select_steps']}-step selection run (seed {p['seeds'][0]}, "
            f"rank {p['ranks'][0]}), then every seed and rank at the chosen lr"
        )
    return "chosen from a grid of 3 per method" if p["lr_grid"] else "one per method (literature), no grid"


def markdown(summary) -> str:
    p = summary["protocol"]
    train_name, eval_name = data_names(summary)
    out = [
        f"Preset `{p['preset']}`: {p['model_config']}, seq {p['max_length']}, batch {p['batch_size']}, "
        f"{p['num_training_steps']} steps ({p['tokens']:,} non-pad training tokens), seeds "
        f"{', '.join(map(str, p['seeds']))}, {p.get('dtype', 'float32')}, lr {_lr_protocol(p)}. "
        f"Data: {train_name} (training), {eval_name} (evaluation). "
        f"Eval loss: token-weighted mean on {eval_name}; +- is half the min-max range over seeds. "
        "State, matrices: optimizer state of the attention and MLP weights (what the subspace methods project); "
        "state, all: everything, including the embeddings and output head, which dominate at this size. "
        "Step time: median wall time per step divided by AdamW's, same seed, same invocation"
        + (
            f" (here {summary['environment']['jobs']} runs shared the machine at once: the ratios are noise)."
            if summary["environment"].get("jobs", 1) > 1
            else "."
        ),
        "",
        "| method | rank | lr | eval loss | eval ppl | state, matrices (MiB) | state, all (MiB) | step time vs AdamW |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        ratio = f"{r['step_time_ratio']:.2f}x" if r["step_time_ratio"] else "-"
        if math.isfinite(r["eval_loss_mean"]):
            loss = f"{r['eval_loss_mean']:.3f} +- {r['eval_loss_spread']:.3f} | {r['eval_ppl_mean']:.1f} +- {r['eval_ppl_spread']:.1f}"
        else:
            loss = "diverged (nan) | -"
        out.append(
            f"| {r['label']} | {r['rank'] or 'full'} | {r['lr']:g} | {loss} | {_mib(r['matrix_state_bytes']):.2f} | {_mib(r['state_bytes']):.2f} | {ratio} |"
        )
    if p.get("select_steps"):
        out += ["", f"lr selection (final eval loss after {p['select_steps']} steps, seed {p['seeds'][0]}):", ""]
        for r in summary["rows"]:
            if r["rank"] in (None, p["ranks"][0]):
                grid = ", ".join(f"{k}: {v:.3f}" for k, v in r["lr_selection"].items())
                out.append(f"- {r['label']}: {grid}; chosen {r['lr']:g}")
    elif p["lr_grid"]:
        out += ["", "lr grid (mean final eval loss over seeds):", ""]
        for r in summary["rows"]:
            grid = ", ".join(f"{k}: {v:.3f}" for k, v in r["lr_grid"].items())
            out.append(f"- {r['label']} {r['rank'] or 'full'}: {grid}; chosen {r['lr']:g}")
    out += ["", "Best per memory level:", ""] + [f"- {line}" for line in summary["winners"]]
    return "\n".join(out) + "\n"


def plots(summary, out: Path) -> None:
    """eval_loss.png: eval loss against training tokens, one panel per rank (full-rank
    baselines in every panel, ablations dashed); pareto.png: final eval loss against the
    optimizer-state bytes of the projected matrices, colour = method, marker = rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = summary["rows"]
    ranks = sorted({r["rank"] for r in rows if r["rank"]}) or [None]
    main = [m.key for m in METHODS if not m.ablation]
    ablations = [m.key for m in METHODS if m.ablation]
    colors = {k: plt.cm.tab10(i % 10) for i, k in enumerate(main)}
    colors.update({k: plt.cm.Dark2(i + 3) for i, k in enumerate(ablations)})
    model = Path(str(summary["protocol"]["model_config"])).name
    # a diverged row (final loss far above the best) would squash the others: clip the axis
    finite = [r["eval_loss_mean"] for r in rows if math.isfinite(r["eval_loss_mean"])]
    best = min(finite) if finite else 0.0
    diverged = {id(r) for r in rows if not r["eval_loss_mean"] <= best + 1.0}  # NaN included
    kept = [r for r in rows if id(r) not in diverged] or rows
    top = max((y for r in kept for _, y in r["eval_curve"] if math.isfinite(y)), default=best + 1.0)

    fig, axes = plt.subplots(1, len(ranks), figsize=(6 * len(ranks), 4.5), sharey=True, squeeze=False)
    for ax, rank in zip(axes[0], ranks, strict=True):
        for r in rows:
            if r["rank"] not in (None, rank) or not r["eval_curve"]:  # a run that diverged at once has no curve
                continue
            xs, ys = zip(*r["eval_curve"], strict=True)
            style = dict(ls="--" if r["ablation"] else "-", lw=2.4 if r["rank"] is None else 1.3)
            label = r["label"] + (" (diverged)" if id(r) in diverged else "")
            ax.plot(xs, ys, marker="o", ms=3, color=colors[r["method"]], label=label, **style)
        ax.set_ylim(best - 0.05, top + 0.05)
        ax.set_title(f"subspace rank {rank} (full-rank rows: thick)" if rank else "eval loss")
        ax.set_xlabel("training tokens (non-pad)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("eval loss (mean over seeds)")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.suptitle(
        f"{data_names(summary)[0]} -> {data_names(summary)[1]}, {model}, preset {summary['protocol']['preset']}"
    )
    fig.tight_layout()
    fig.savefig(out / "eval_loss.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    markers = {None: "s", **dict(zip(ranks, "o^vD", strict=False))}
    low = min(r["eval_loss_mean"] - r["eval_loss_spread"] for r in kept) - 0.03
    high = max(r["eval_loss_mean"] + r["eval_loss_spread"] for r in kept) + 0.05
    for r in rows:
        if id(r) in diverged:  # drawn at the top edge, with its value
            x = _mib(r["matrix_state_bytes"])
            ax.plot(x, high, marker="x", color=colors[r["method"]], ms=8, clip_on=False)
            ax.annotate(
                f"diverged ({r['eval_loss_mean']:.2f})",
                (x, high),
                fontsize=7,
                xytext=(4, -10),
                textcoords="offset points",
            )
            continue
        ax.errorbar(
            _mib(r["matrix_state_bytes"]),
            r["eval_loss_mean"],
            yerr=r["eval_loss_spread"],
            fmt=markers.get(r["rank"], "o"),
            color=colors[r["method"]],
            ms=6,
            capsize=2,
        )
    seen = [k for k in colors if any(r["method"] == k for r in rows)]
    handles = [Line2D([], [], color=colors[k], marker="o", ls="", label=BY_KEY[k].label) for k in seen]
    handles += [
        Line2D(
            [], [], color="k", marker=markers[rank], ls="", mfc="none", label=f"rank {rank}" if rank else "full rank"
        )
        for rank in [None, *ranks]
        if any(r["rank"] == rank for r in rows)
    ]
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_ylim(low, high)
    ax.set_xscale("log")
    ax.set_xlabel("optimizer state of the attention/MLP matrices (MiB, log scale)")
    ax.set_ylabel("final eval loss (mean, bars: half range over seeds)")
    ax.set_title(
        f"final eval loss on {data_names(summary)[1]} vs optimizer state ({model}, preset {summary['protocol']['preset']})"
    )
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", choices=list(PRESETS), default="default", help="protocol (default: %(default)s)")
    p.add_argument(
        "--out", type=Path, help="output dir (default: bench/out/quality-PRESET, bench/out/quality for default)"
    )
    p.add_argument(
        "--train_data",
        help="training documents (default: ../shared/data/blogs/blogs-train.jsonl.gz for gpu/cpu, "
        "../shared/data/c4-sample/c4-sample-train.json.gz otherwise)",
    )
    p.add_argument("--eval_data", help="evaluation documents (default: the same folder's validation file)")
    p.add_argument(
        "--tokenizer",
        default=str(DATA / "tokenizers/t5-base"),
        help="tokenizer dir (default: ../shared/data/tokenizers/t5-base)",
    )
    p.add_argument("--methods", help="comma-separated (default: gpu/cpu every method but the ablations; others all)")
    p.add_argument("--ranks", help="comma-separated subspace ranks (preset's by default)")
    p.add_argument("--seeds", help="comma-separated seeds (preset's by default)")
    for key in ("model_config", "max_length", "batch_size", "num_training_steps", "eval_every", "eval_tokens"):
        p.add_argument(f"--{key}", type=str if key == "model_config" else int, help="overrides the preset")
    p.add_argument("--update_proj_gap", type=int, help="SVD/random refresh gap (overrides the preset)")
    p.add_argument("--select_steps", type=int, help="steps of the lr-selection runs (gpu/cpu presets; 0: none)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="training dtype (overrides the preset)")
    p.add_argument("--threads", type=int, help="torch threads (default: quick 1, default torch's choice)")
    p.add_argument("--dry_run", action="store_true", help="list the runs and exit")
    p.add_argument(
        "--jobs",
        type=int,
        help="runs at a time, each in its own process (default: gpu 4, cpu 2, others 1; step-time ratios "
        "are then not comparable)",
    )
    p.add_argument("--shard", help=argparse.SUPPRESS)  # K/N: train every N-th run from K, no report
    p.add_argument("--stage", choices=["select", "full"], help=argparse.SUPPRESS)  # a shard's stage
    args = p.parse_args(argv)
    cfg = dict(PRESETS[args.preset], preset=args.preset)
    for key in ("model_config", "max_length", "batch_size", "num_training_steps", "eval_every", "eval_tokens"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.threads is not None:
        cfg["threads"] = args.threads
    if args.update_proj_gap is not None:
        cfg["update_proj_gap"] = args.update_proj_gap
    if args.select_steps is not None:
        if args.select_steps < 0:
            p.error("--select_steps must be >= 0")
        cfg["select_steps"] = args.select_steps or None
    if cfg.get("select_steps") and not cfg["lr_grid"]:
        p.error(f"--select_steps: the {args.preset} preset has no lr grid to select from")
    if args.dtype:
        cfg["dtype"] = args.dtype
    if args.ranks:
        cfg["ranks"] = [int(x) for x in args.ranks.split(",")]
    if args.seeds:
        cfg["seeds"] = [int(x) for x in args.seeds.split(",")]
    train_file, eval_file = DATA_FILES[cfg.get("data", "c4")]
    if args.train_data and not args.eval_data:
        p.error("--train_data needs --eval_data")
    cfg.update(
        train_data=args.train_data or str(DATA / train_file),
        eval_data=args.eval_data or str(DATA / eval_file),
        tokenizer=args.tokenizer,
    )
    keys = [k.strip() for k in (args.methods or ",".join(default_methods(cfg))).split(",") if k.strip()]
    unknown = [k for k in keys if k not in BY_KEY]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(BY_KEY)}")
    missing = [k for k in keys if not available(k)]
    if missing:
        p.error(
            f"{', '.join(missing)} need(s) {', '.join(sorted({NEEDS[k] for k in missing}))}: pip install '.[bench]'"
        )
    args.jobs = cfg.get("jobs", 1) if args.jobs is None else args.jobs
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    if args.shard:
        k, n = (int(x) for x in args.shard.split("/"))
        args.shard = (k, n)
    args.cfg, args.method_list = cfg, [BY_KEY[k] for k in keys]
    args.out = Path(args.out or ROOT / OUT_DEFAULT[args.preset])
    return args


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    cfg, methods, out = args.cfg, args.method_list, args.out
    if args.jobs > 1 and not args.dry_run and not args.shard:
        stages = ["select", "full"] if cfg.get("select_steps") else ["full"]
        for stage in stages:  # the full runs need every selection run's result
            _run_shards(argv, args.jobs, stage)
    threads = torch.get_num_threads()
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    try:
        return _run_all(args, cfg, methods, out)
    finally:
        torch.set_num_threads(threads)


def _run_shards(argv: list[str], jobs: int, stage: str) -> None:
    """Train the ``stage``'s runs in ``jobs`` processes at once; the caller then reports (all reused)."""
    base = [sys.executable, str(Path(__file__).resolve()), *argv, "--jobs", "1", "--stage", stage]
    procs = [subprocess.Popen([*base, "--shard", f"{k}/{jobs}"]) for k in range(jobs)]
    failed = [p.args[-1] for p in procs if p.wait() != 0]
    if failed:
        raise SystemExit(f"quality.py: shard(s) {', '.join(failed)} failed; rerun to continue")


def _execute(runs, cfg, out: Path, shard, select: bool = False) -> list[dict]:
    """Train (or reuse) ``runs``; with ``shard`` (K, N) only every N-th from K."""
    results, times = [], []
    for i, (m, rank, seed, lr) in enumerate(runs):
        if shard and i % shard[1] != shard[0]:
            continue
        spec = run_spec(m, rank, seed, lr, cfg, select)
        name = run_id(spec)
        run_dir = out / "runs" / name
        result = load_result(run_dir, spec)
        if result is not None:
            print(f"[{i + 1}/{len(runs)}] {name}: reused ({result['final_eval_loss']:.4f})", flush=True)
        else:
            todo = sum(1 for r in runs[i:] if not _done(out, run_spec(*r, cfg, select)))
            eta = f", ETA {statistics.mean(times) * todo / 60:.0f} min" if times else ""
            print(f"[{i + 1}/{len(runs)}] {name}: training{eta}", flush=True)
            result = train_once(spec, run_dir, m)
            times.append(result["wall_s"])
            print(
                f"    eval loss {result['final_eval_loss']:.4f}, state {_mib(result['state_bytes']):.2f} MiB, "
                f"{result['step_time_s']:.3f} s/step, {result['wall_s']:.0f} s",
                flush=True,
            )
        results.append(result)
    return results


def _run_all(args, cfg, methods, out: Path) -> int:
    select = selection_plan(cfg, methods) if cfg.get("select_steps") else []
    if args.dry_run:
        named = [run_id(run_spec(*r, cfg, True)) for r in select]
        if select:  # the selection runs choose the full runs' lrs: shown as "lr?"
            for m, rank, seed, _ in plan(cfg, methods, chosen={m.key: None for m in methods}):
                named.append(f"{m.key}{f'-r{rank}' if rank else ''}-lr?-s{seed}")
        else:
            named += [run_id(run_spec(*r, cfg)) for r in plan(cfg, methods)]
        print("\n".join(named))
        print(f"{len(named)} runs")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    selection, chosen = [], None
    if select:
        mine = args.shard if args.stage == "select" else None  # full-stage shards reuse them all
        selection = _execute(select, cfg, out, mine, select=True)
        if args.stage == "select":
            return 0
        chosen = choose_lrs(selection)
        print("lr chosen: " + ", ".join(f"{k} {v:g}" for k, v in chosen.items()), flush=True)
    results = _execute(plan(cfg, methods, chosen), cfg, out, args.shard)
    if args.shard:
        return 0
    rows = aggregate(cfg, methods, results, selection)
    tokens = results[0]["tokens"] if results else 0
    summary = dict(
        protocol=dict(
            {k: v for k, v in cfg.items() if k not in ("train_data", "eval_data", "tokenizer")},
            tokens=tokens,
            warmup_steps=max(1, cfg["num_training_steps"] // 10),
            scheduler="cosine to 10%",
            online_pca_proj_gap=OSD_PROJ_GAP,
            lr_literature={m.key: m.lr for m in methods},
            scale={m.key: m.scale for m in methods if m.subspace},
            data=dict(train=cfg["train_data"], eval=cfg["eval_data"], tokenizer=cfg["tokenizer"]),
        ),
        environment=dict(
            python=platform.python_version(),
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            cpu=platform.processor() or platform.machine(),
            cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else False,
            jobs=args.jobs,
        ),
        rows=rows,
        winners=winners(rows),
        runs=[{k: v for k, v in r.items() if k != "train_loss"} for r in results],
        selection_runs=[{k: v for k, v in r.items() if k != "train_loss"} for r in selection],
    )
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(markdown(summary))
    plots(summary, out)
    print(markdown(summary))
    print(f"wrote {out / 'results.json'}, results.md, eval_loss.png, pareto.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
