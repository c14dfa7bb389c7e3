"""GLUE fine-tuning benchmark (the GaLore paper's Table 4 layout) with the shared MiniLM:
full fine-tuning (AdamW), LoRA (peft, same rank), GaLore and Online Subspace Descent at
ranks 4 and 8, on CoLA, MRPC, RTE, SST-2 and STS-B, every run through ``osd.glue.run``.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python bench/glue.py --preset cpu --out bench/out/glue-cpu

Presets (``--preset``):

* ``cpu``: sized for about 2 hours on a 2-core CPU. Each run trains 1 epoch on a seeded
  subsample of at most 1,000 training examples (every task is subsampled, SST-2's 67k
  most of all), evaluates on at most 500 dev examples, max length 128, batch 32. The lr grid
  (two values per method) runs on seed 0; the best lr of each (method, task) then runs on
  seed 1, and the table reports the mean of the two seeds at that lr.
* ``gpu``: sized for one call of at most 8 minutes on one H100: the full training sets of
  CoLA, MRPC, RTE and STS-B and 20,000 SST-2 examples, 3 epochs, full dev sets, the same
  grid and seeds.

``--tasks``, ``--methods``, ``--seeds``, ``--max_train_samples``, ``--max_eval_samples``,
``--epochs`` and ``--one_lr`` (only each method's first lr, no grid) shrink a preset; the
output states what ran. Metrics: CoLA Matthews correlation, STS-B Pearson, the others
accuracy (MRPC's F1 is in results.json), all x100. State bytes: ``state`` is every byte the
optimizer holds (for full-parameter methods dominated by the 30522 x 384 word embeddings'
Adam moments), ``matrix state`` the part for the encoder's attention/FFN matrices (full
AdamW: 2 fp32 moments per weight; LoRA: the adapters' moments; GaLore/OSD: the subspace group).
"""

from __future__ import annotations

import argparse
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

PRESETS = {
    "cpu": dict(max_train_samples=1000, max_eval_samples=500, epochs=1, batch=32, max_length=128, seeds=[0, 1]),
    "gpu": dict(
        max_train_samples=None,
        sst2_train_samples=20000,
        max_eval_samples=None,
        epochs=3,
        batch=32,
        max_length=128,
        seeds=[0, 1],
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
    n_train = (
        cfg.get("sst2_train_samples") if task == "sst2" and cfg.get("sst2_train_samples") else cfg["max_train_samples"]
    )
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
    if cfg["max_eval_samples"]:
        argv += ["--max_eval_samples", str(cfg["max_eval_samples"])]
    results = glue.run(argv, build_optimizer=lora_builder(lora_rank) if lora_rank else None, log=lambda *a: None)
    results["score"] = 100 * results[f"eval_{glue.main_metric(task)}"]
    results["matrix_state_bytes"] = matrix_state_bytes(results, method)
    return results


def table(rows: dict, tasks, methods) -> str:
    """Markdown table: methods x tasks (+ average), mean over seeds, plus state bytes."""
    head = "| method | " + " | ".join(TASK_TITLES[t] for t in tasks) + " | avg | state MB | matrix state MB |"
    lines = [head, "|" + "---|" * (len(tasks) + 4)]
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
        any_row = next((rows[(m, t)] for t in tasks if (m, t) in rows), None)
        mb = f"{any_row['state_bytes'] / 2**20:.1f}" if any_row else "-"
        mmb = f"{any_row['matrix_state_bytes'] / 2**20:.2f}" if any_row else "-"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {avg} | {mb} | {mmb} |")
    return "\n".join(lines)


def summarise(runs: list[dict], tasks, methods) -> dict:
    """Per (method, task): the lr with the best seed-0 score, and the mean over seeds at it."""
    rows = {}
    for m in methods:
        for t in tasks:
            mine = [r for r in runs if r["method"] == m and r["task"] == t]
            first = [r for r in mine if r["seed"] == min(x["seed"] for x in mine)] if mine else []
            if not first:
                continue
            best = max(first, key=lambda r: r["score"])
            at = [r for r in mine if r["lr"] == best["lr"]]
            scores = [r["score"] for r in at]
            rows[(m, t)] = {
                "lr": best["lr"],
                "mean": sum(scores) / len(scores),
                "half_range": (max(scores) - min(scores)) / 2,
                "n": len(scores),
                "state_bytes": best["optimizer_state_bytes"],
                "matrix_state_bytes": best["matrix_state_bytes"],
            }
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=list(PRESETS), default="cpu")
    p.add_argument("--out", default=None, help="folder for results.json and table.md (default bench/out/glue-PRESET)")
    p.add_argument("--model", default=str(DATA / "models" / "all-MiniLM-L6-v2"))
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", help="comma-separated (default: the preset's)")
    p.add_argument("--max_train_samples", type=int)
    p.add_argument("--max_eval_samples", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--one_lr", action="store_true", help="only each method's first lr (no grid)")
    args = p.parse_args(argv)
    if not (DATA / "glue").is_dir() or not Path(args.model).is_dir():
        print(f"bench/glue.py: needs {DATA}/glue and the model {args.model} (set OSD_SHARED_DATA)", file=sys.stderr)
        return 2
    cfg = dict(PRESETS[args.preset])
    for key in ("max_train_samples", "max_eval_samples", "epochs"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
            cfg.pop("sst2_train_samples", None) if key == "max_train_samples" else None
    if args.seeds:
        cfg["seeds"] = [int(s) for s in args.seeds.split(",")]
    tasks, methods = args.tasks.split(","), args.methods.split(",")
    out = Path(args.out or ROOT / "bench" / "out" / f"glue-{args.preset}")
    out.mkdir(parents=True, exist_ok=True)
    scratch = out / "run"
    import torch

    print(
        f"preset {args.preset}: tasks {tasks}, methods {methods}, seeds {cfg['seeds']}, "
        f"{'one lr per method' if args.one_lr else 'lr grid on the first seed, best lr on the others'}; "
        f"train examples per task: {cfg.get('sst2_train_samples') or cfg['max_train_samples'] or 'all'} (SST-2), "
        f"{cfg['max_train_samples'] or 'all'} (others), first seeded-shuffled; dev examples: "
        f"{cfg['max_eval_samples'] or 'all'}; {cfg['epochs']} epoch(s), batch {cfg['batch']}, max length "
        f"{cfg['max_length']}; torch threads {torch.get_num_threads()}",
        flush=True,
    )
    runs, start = [], time.perf_counter()
    results_path = out / "results.json"
    for seed_index, seed in enumerate(cfg["seeds"]):
        for task in tasks:
            for method in methods:
                grid = METHODS[method][1][:1] if args.one_lr else METHODS[method][1]
                if seed_index > 0:
                    grid = [summarise(runs, [task], [method])[(method, task)]["lr"]]
                for lr in grid:
                    t0 = time.perf_counter()
                    r = one_run(task, method, lr, seed, cfg, scratch, Path(args.model))
                    r.update(method=method, lr=lr, seed=seed, wall_seconds=round(time.perf_counter() - t0, 1))
                    runs.append(r)
                    print(
                        f"[{time.perf_counter() - start:7.0f}s] {task:5s} {method:9s} lr {lr:.0e} seed {seed}: "
                        f"{r['score']:.1f} ({r['train_steps']} steps, {r['wall_seconds']:.0f}s)",
                        flush=True,
                    )
                    results_path.write_text(json.dumps({"config": cfg, "preset": args.preset, "runs": runs}, indent=1))
    rows = summarise(runs, tasks, methods)
    text = table(rows, tasks, methods)
    lrs = {f"{m}/{t}": rows[(m, t)]["lr"] for (m, t) in rows}
    results_path.write_text(
        json.dumps({"config": cfg, "preset": args.preset, "runs": runs, "chosen_lr": lrs, "table": text}, indent=1)
    )
    (out / "table.md").write_text(text + "\n")
    print(text)
    print(f"total {time.perf_counter() - start:.0f}s; results in {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
