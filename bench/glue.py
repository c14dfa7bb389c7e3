"""GLUE fine-tuning benchmark (the GaLore paper's Table 4 layout) with the shared MiniLM:
full fine-tuning (AdamW), LoRA (peft, same rank), GaLore and Online Subspace Descent at
ranks 4 and 8, on CoLA, MRPC, RTE, SST-2 and STS-B, every run through ``osd.glue.run``.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python bench/glue.py --preset cpu --out bench/out/glue-cpu

Protocol: each method's lr grid runs on seed 0 of the lr-selection task (``--lr_task``,
SST-2 in the cpu preset; ``each``: every task picks its own lr); the best lr then runs on
every task and seed, and the table reports the mean over seeds at that lr (± half the
range). The selection task's dev set chose the lr, so its column is optimistic.

Presets (``--preset``):

* ``cpu``: sized for under 2 hours on this 2-core CPU, at rank 8 only (full, LoRA, GaLore
  and OSD; rank 4 is in the gpu preset). Seeded subsamples of the training sets (CoLA
  2,000 examples, the others 1,000), 2 epochs at batch 16 (126-250 steps), max length
  128, the full dev sets, the lr picked on SST-2.
* ``gpu``: meant for one call of at most 8 minutes on one H100 (an estimate: about 46,000
  optimizer steps in 77 runs; it has not run): the full training sets of CoLA, MRPC, RTE
  and STS-B and 10,000 SST-2 examples, 3 epochs at batch 32, full dev sets, ranks 4 and
  8, the lr picked on SST-2, bfloat16 autocast (``--bf16``).

``--tasks``, ``--methods``, ``--seeds``, ``--max_train_samples``, ``--max_eval_samples``,
``--epochs``, ``--lr_task`` and ``--one_lr`` (only each method's first lr, no grid) change a
preset; the output states what ran. Metrics: CoLA Matthews correlation, STS-B Pearson, the
others accuracy (MRPC's F1 is in results.json), all x100. State bytes: ``state`` is every
byte the optimizer holds (for full-parameter methods dominated by the 30522 x 384 word
embeddings' Adam moments), ``matrix state`` the part for the encoder's attention/FFN
matrices (full AdamW: 2 fp32 moments per weight; LoRA: the adapters' moments; GaLore/OSD:
the subspace group).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("OSD_SHARED_DATA", ROOT.parent / "shared" / "data"))
TASKS = ["cola", "mrpc", "rte", "sst2", "stsb"]
TASK_TITLES = {"cola": "CoLA", "mrpc": "MRPC", "rte": "RTE", "sst2": "SST-2", "stsb": "STS-B"}

# method -> (osd-glue flags, lr grid)
METHODS = {
    "full": ({"optimizer": "adamw"}, [1e-4, 5e-5]),
    "lora-r4": ({"optimizer": "adamw", "lora_rank": 4}, [1e-3, 5e-4]),
    "galore-r4": ({"optimizer": "galore_adamw", "proj_type": "std", "rank": 4, "galore_scale": 4}, [1e-4, 2e-4]),
    "osd-r4": ({"optimizer": "galore_adamw", "proj_type": "continuous", "rank": 4, "galore_scale": 4}, [1e-4, 2e-4]),
    "lora-r8": ({"optimizer": "adamw", "lora_rank": 8}, [1e-3, 5e-4]),
    "galore-r8": ({"optimizer": "galore_adamw", "proj_type": "std", "rank": 8, "galore_scale": 4}, [1e-4, 2e-4]),
    "osd-r8": ({"optimizer": "galore_adamw", "proj_type": "continuous", "rank": 8, "galore_scale": 4}, [1e-4, 2e-4]),
}

RANK8 = ["full", "lora-r8", "galore-r8", "osd-r8"]
PRESETS = {
    "cpu": dict(
        train_samples={"cola": 2000, "sst2": 1000, "stsb": 1000, "mrpc": 1000, "rte": 1000},
        max_eval_samples=None,
        epochs=2,
        batch=16,
        max_length=128,
        seeds=[0, 1],
        methods=RANK8,
        lr_task="sst2",
        bf16=False,
    ),
    "gpu": dict(
        train_samples={"sst2": 10000},
        max_eval_samples=None,
        epochs=3,
        batch=32,
        max_length=128,
        seeds=[0, 1],
        methods=list(METHODS),
        lr_task="sst2",
        bf16=True,
    ),
}


def lora_builder(rank: int):
    """osd.glue's build_optimizer hook: inject rank-``rank`` LoRA adapters (alpha = 2 rank, no
    dropout) into the encoder's attention/FFN matrices in place; the head stays trainable."""

    def build(model, args):
        from peft import LoraConfig, get_peft_model

        import osd

        config = LoraConfig(
            task_type="SEQ_CLS",
            r=rank,
            lora_alpha=2 * rank,
            lora_dropout=0.0,
            target_modules=r".*encoder\.layer\.\d+\..*(query|key|value|dense)",
        )
        get_peft_model(model, config)  # modifies model's modules in place
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if "lora_" in n]},
            {"params": [p for n, p in named if "lora_" not in n]},
        ]
        return osd.AdamW(groups, lr=args.learning_rate, weight_decay=args.weight_decay)

    return build


def matrix_state_bytes(results: dict, method: str) -> int:
    """Optimizer-state bytes for the encoder's attention/FFN matrices (LoRA: its adapters)."""
    if method.startswith("full"):
        return results["target_matrix_parameters"] * 8  # two fp32 Adam moments
    if method.startswith("lora"):
        return results["optimizer_state_bytes_per_group"][0]
    return results["optimizer_state_bytes_per_group"][1]


def one_run(task, method, lr, seed, cfg, out_dir: Path, model: Path) -> dict:
    from osd import glue

    flags, _ = METHODS[method]
    flags = dict(flags)
    lora_rank = flags.pop("lora_rank", None)
    n_train = cfg["train_samples"].get(task)
    argv = [
        "--task_name", task, "--model_name_or_path", str(model), "--data_dir", str(DATA / "glue"),
        "--output_dir", str(out_dir), "--overwrite", "--no-save_model", "--no-eval_each_epoch",
        "--learning_rate", str(lr), "--seed", str(seed), "--num_train_epochs", str(cfg["epochs"]),
        "--per_device_train_batch_size", str(cfg["batch"]), "--max_length", str(cfg["max_length"]),
        "--update_proj_gap", "200",
    ]  # fmt: skip
    for key, value in flags.items():
        argv += [f"--{key}", str(value)]
    if n_train:
        argv += ["--max_train_samples", str(n_train)]
    if cfg["bf16"]:
        argv += ["--bf16"]
    if cfg["max_eval_samples"]:
        argv += ["--max_eval_samples", str(cfg["max_eval_samples"])]
    results = glue.run(argv, build_optimizer=lora_builder(lora_rank) if lora_rank else None, log=lambda *a: None)
    results["score"] = 100 * results[f"eval_{glue.main_metric(task)}"]
    results["matrix_state_bytes"] = matrix_state_bytes(results, method)
    return results


def chosen_lr(runs: list[dict], method: str, task: str) -> float:
    """The lr of ``method``'s best score on ``task`` among the first seed's runs."""
    mine = [r for r in runs if r["method"] == method and r["task"] == task]
    if not mine:
        raise KeyError(f"no runs of {method} on {task}")
    first = min(r["seed"] for r in mine)
    return max((r for r in mine if r["seed"] == first), key=lambda r: r["score"])["lr"]


def summarise(runs: list[dict], tasks, methods, lr_task: str) -> dict:
    """Per (method, task): the mean over seeds at the chosen lr (``lr_task``'s, or the task's own)."""
    rows = {}
    for m in methods:
        for t in tasks:
            try:
                lr = chosen_lr(runs, m, t if lr_task == "each" else lr_task)
            except KeyError:
                continue
            at = [r for r in runs if r["method"] == m and r["task"] == t and r["lr"] == lr]
            if not at:
                continue
            scores = [r["score"] for r in at]
            rows[(m, t)] = {
                "lr": lr,
                "mean": sum(scores) / len(scores),
                "half_range": (max(scores) - min(scores)) / 2,
                "n": len(scores),
                "state_bytes": at[0]["optimizer_state_bytes"],
                "matrix_state_bytes": at[0]["matrix_state_bytes"],
            }
    return rows


def table(rows: dict, tasks, methods) -> str:
    """Markdown table: methods x tasks (+ average), mean over seeds, the lr, state bytes."""
    head = "| method | " + " | ".join(TASK_TITLES[t] for t in tasks) + " | avg | lr | state MB | matrix state MB |"
    lines = [head, "|" + "---|" * (len(tasks) + 5)]
    for m in methods:
        cells, scores = [], []
        for t in tasks:
            r = rows.get((m, t))
            if r is None:
                cells.append("-")
                continue
            scores.append(r["mean"])
            spread = f" ±{r['half_range']:.1f}" if r["n"] > 1 else ""
            cells.append(f"{r['mean']:.1f}{spread}")
        avg = f"{sum(scores) / len(scores):.1f}" if len(scores) == len(tasks) else "-"
        mine = [rows[(m, t)] for t in tasks if (m, t) in rows]
        lrs = "/".join(dict.fromkeys(f"{r['lr']:g}" for r in mine)) or "-"
        mb = f"{mine[0]['state_bytes'] / 2**20:.1f}" if mine else "-"
        mmb = f"{mine[0]['matrix_state_bytes'] / 2**20:.2f}" if mine else "-"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {avg} | {lrs} | {mb} | {mmb} |")
    return "\n".join(lines)


def plan(runs: list[dict], task: str, method: str, seed_index: int, lr_task: str, one_lr: bool) -> list[float]:
    """The lrs to run next for (task, method): the grid where the lr is chosen, else the chosen lr."""
    grid = METHODS[method][1]
    if one_lr:
        return grid[:1]
    if seed_index == 0 and lr_task in ("each", task):
        return grid
    return [chosen_lr(runs, method, task if lr_task == "each" else lr_task)]


def main(argv=None, run=None) -> int:
    """``run`` replaces :func:`one_run` (tests)."""
    run = run or one_run
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=list(PRESETS), default="cpu")
    p.add_argument("--out", default=None, help="folder for results.json and table.md (default bench/out/glue-PRESET)")
    p.add_argument("--model", default=str(DATA / "models" / "all-MiniLM-L6-v2"))
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--methods", help="comma-separated (default: the preset's)")
    p.add_argument("--seeds", help="comma-separated (default: the preset's)")
    p.add_argument("--max_train_samples", type=int, help="every task's training subsample")
    p.add_argument("--max_eval_samples", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr_task", help="task whose seed-0 dev score picks each method's lr, or 'each'")
    p.add_argument("--one_lr", action="store_true", help="only each method's first lr (no grid)")
    p.add_argument("--time_limit", type=float, help="seconds: start no run after this; the table shows what finished")
    args = p.parse_args(argv)
    cfg = dict(PRESETS[args.preset])
    tasks = args.tasks.split(",")
    methods = args.methods.split(",") if args.methods else cfg["methods"]
    lr_task = "each" if args.one_lr else args.lr_task or cfg["lr_task"]  # one lr: nothing to choose
    for name, known, given in (("task", TASKS, tasks), ("method", METHODS, methods)):
        if unknown := [x for x in given if x not in known]:
            p.error(f"unknown {name}(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if lr_task != "each" and lr_task not in tasks:
        p.error(f"--lr_task {lr_task} is not among --tasks {','.join(tasks)} (or pass --lr_task each)")
    if not (DATA / "glue").is_dir() or not Path(args.model).is_dir():
        print(f"bench/glue.py: needs {DATA}/glue and the model {args.model} (set OSD_SHARED_DATA)", file=sys.stderr)
        return 2
    if args.max_train_samples is not None:
        cfg["train_samples"] = dict.fromkeys(TASKS, args.max_train_samples)
    for key in ("max_eval_samples", "epochs"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.seeds:
        cfg["seeds"] = [int(s) for s in args.seeds.split(",")]
    cfg.update(methods=methods, lr_task=lr_task)
    if lr_task in tasks:  # its grid runs first
        tasks = [lr_task] + [t for t in tasks if t != lr_task]
    out = Path(args.out or ROOT / "bench" / "out" / f"glue-{args.preset}")
    out.mkdir(parents=True, exist_ok=True)
    scratch = out / "run"
    import torch

    sizes = ", ".join(f"{TASK_TITLES[t]} {cfg['train_samples'].get(t) or 'all'}" for t in tasks)
    print(
        f"preset {args.preset}: tasks {tasks}, methods {methods}, seeds {cfg['seeds']}; "
        + ("one lr per method" if args.one_lr else f"lr grid on seed {cfg['seeds'][0]} of "
           + ("every task" if lr_task == "each" else lr_task) + ", the chosen lr on the rest")
        + f"; training examples (seeded subsample): {sizes}; dev examples: {cfg['max_eval_samples'] or 'all'}; "
        f"{cfg['epochs']} epoch(s), batch {cfg['batch']}, max length {cfg['max_length']}; "
        f"{'bf16 autocast, ' if cfg['bf16'] else ''}device {'cuda' if torch.cuda.is_available() else 'cpu'}, "
        f"torch threads {torch.get_num_threads()}",
        flush=True,
    )  # fmt: skip
    runs, start = [], time.perf_counter()
    results_path = out / "results.json"
    for (seed_index, seed), task, method in itertools.product(enumerate(cfg["seeds"]), tasks, methods):
        if args.time_limit is not None and time.perf_counter() - start > args.time_limit:
            print(f"--time_limit {args.time_limit:g} s reached: no more runs; the table shows those that finished")
            break
        for lr in plan(runs, task, method, seed_index, lr_task, args.one_lr):
            t0 = time.perf_counter()
            r = run(task, method, lr, seed, cfg, scratch, Path(args.model))
            r.update(task=task, method=method, lr=lr, seed=seed, wall_seconds=round(time.perf_counter() - t0, 1))
            runs.append(r)
            print(
                f"[{time.perf_counter() - start:7.0f}s] {task:5s} {method:9s} lr {lr:.0e} seed {seed}: "
                f"{r['score']:.1f} ({r['train_steps']} steps, {r['wall_seconds']:.0f}s)",
                flush=True,
            )
            results_path.write_text(json.dumps({"config": cfg, "preset": args.preset, "runs": runs}, indent=1))
    rows = summarise(runs, tasks, methods, lr_task)
    shown = [t for t in TASKS if t in tasks]
    text = table(rows, shown, methods)
    lrs = {f"{m}/{t}": rows[(m, t)]["lr"] for (m, t) in rows}
    total = time.perf_counter() - start
    results_path.write_text(
        json.dumps(
            {"config": cfg, "preset": args.preset, "runs": runs, "chosen_lr": lrs, "table": text,
             "total_seconds": round(total)},
            indent=1,
        )
    )  # fmt: skip
    (out / "table.md").write_text(text + "\n")
    print(text)
    print(f"total {total:.0f}s; results in {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
