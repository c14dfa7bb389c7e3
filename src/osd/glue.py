"""Fine-tune a Hugging Face sequence-classification model on a GLUE task with any osd
optimizer: ``osd-glue`` or ``python -m osd.glue``.

``--optimizer``, ``--proj_type``, ``--rank``, ``--update_proj_gap`` and ``--galore_scale``
are the strings and numbers of ``osd-train`` (resolved by :mod:`osd.cli_options`). With a
``galore_*`` optimizer the attention and feed-forward matrices of the encoder layers
(``encoder.layer.N.attention.self.query/key/value``, ``attention.output.dense``,
``intermediate.dense``, ``output.dense``) go to the rank-``--rank`` subspace group; the
embeddings, LayerNorms, biases, pooler and classification head stay in the plain group.

Data: ``--data_dir`` is a local ``glue_data/`` layout (``DIR/SST-2/train.tsv`` and
``dev.tsv``; CoLA without a header row; ``DIR`` may also be the task's own folder), read
with Python's csv module and ``QUOTE_NONE`` (RTE, MRPC and STS-B hold bare quotes);
without it, the Hub's ``nyu-mll/glue`` dataset. Training is a plain, seeded torch loop:
shuffled batches padded to their longest example, AdamW-style linear warmup and decay,
evaluation on the dev set after each epoch. The output directory receives
``eval_results.json`` (accuracy; accuracy and F1 for MRPC/QQP; Matthews correlation for
CoLA; Pearson and Spearman for STS-B, a regression with one output), ``train_log.jsonl``,
``run_config.json`` and the fine-tuned model and tokenizer (``save_pretrained``).

Bad input (unknown task or optimizer strings, missing data files, numbers out of range, a
model or dataset that cannot be loaded, an output directory holding another run) ends with a
one-line ``osd-glue: error: ...`` on stderr and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from osd import cli_options
from osd.cli_options import Diverged, Parser, UsageError

PROG = "osd-glue"
# the encoder layers' attention and FFN matrices: BERT/RoBERTa/ELECTRA/DeBERTa
# (``*.encoder.layer.N.*``) and DistilBERT (``*.transformer.layer.N.*``); never the pooler
# (``bert.pooler.dense``) nor the head (``classifier``, ``classifier.dense``, ``classifier.out_proj``)
ENCODER_TARGETS = ("encoder.layer.", "transformer.layer.")
DEFAULT_MODEL = "roberta-base"
HUB_DATASET = "nyu-mll/glue"
RUN_FILES = ("eval_results.json", "train_log.jsonl", "run_config.json", "config.json", "model.safetensors")


@dataclass(frozen=True)
class Task:
    folder: str  # under glue_data/
    text_a: str | int  # column name, or index for header-less files
    text_b: str | int | None
    label: str | int
    labels: tuple[str, ...] | None  # None: regression (float labels, one output)
    metrics: tuple[str, ...]
    header: bool = True
    dev_file: str = "dev.tsv"
    hub_columns: tuple[str, str | None] = ("sentence", None)
    hub_validation: str = "validation"


TASKS = {
    "cola": Task("CoLA", 3, None, 1, ("0", "1"), ("matthews_correlation",), header=False),
    "sst2": Task("SST-2", "sentence", None, "label", ("0", "1"), ("accuracy",)),
    "mrpc": Task(
        "MRPC",
        "#1 String",
        "#2 String",
        "Quality",
        ("0", "1"),
        ("accuracy", "f1"),
        hub_columns=("sentence1", "sentence2"),
    ),
    "rte": Task(
        "RTE",
        "sentence1",
        "sentence2",
        "label",
        ("entailment", "not_entailment"),
        ("accuracy",),
        hub_columns=("sentence1", "sentence2"),
    ),
    "stsb": Task(
        "STS-B",
        "sentence1",
        "sentence2",
        "score",
        None,
        ("pearson", "spearmanr"),
        hub_columns=("sentence1", "sentence2"),
    ),
    "qnli": Task(
        "QNLI",
        "question",
        "sentence",
        "label",
        ("entailment", "not_entailment"),
        ("accuracy",),
        hub_columns=("question", "sentence"),
    ),
    "qqp": Task(
        "QQP",
        "question1",
        "question2",
        "is_duplicate",
        ("0", "1"),
        ("accuracy", "f1"),
        hub_columns=("question1", "question2"),
    ),
    "mnli": Task(
        "MNLI",
        "sentence1",
        "sentence2",
        "gold_label",
        ("entailment", "neutral", "contradiction"),
        ("accuracy",),
        dev_file="dev_matched.tsv",
        hub_columns=("premise", "hypothesis"),
        hub_validation="validation_matched",
    ),
}


# --------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    flag = lambda name, default=False, **kw: p.add_argument(  # noqa: E731
        name, action=argparse.BooleanOptionalAction, default=default, **kw
    )
    p.add_argument("--task_name", required=True, help=f"one of {', '.join(TASKS)}")
    p.add_argument("--model_name_or_path", default=DEFAULT_MODEL, help="local model directory or Hub name")
    p.add_argument("--data_dir", help="a local glue_data/ layout (DIR/SST-2/train.tsv ...); default: the Hub's glue")
    p.add_argument("--output_dir", required=True)
    flag("--overwrite", help="replace the run an --output_dir holds")
    flag("--save_model", default=True, help="save the fine-tuned model and tokenizer (--no-save_model: only results)")
    p.add_argument("--max_length", type=int, default=128, help="tokens per example (longer ones are truncated)")
    flag("--pad_to_max_length", help="pad every batch to --max_length (default: to its longest example)")
    p.add_argument("--per_device_train_batch_size", type=int, default=32)
    p.add_argument("--per_device_eval_batch_size", type=int, default=128)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=1e-4, help="peak lr (1e-4 suits MiniLM; RoBERTa ~2e-5)")
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--num_train_epochs", type=int, default=3)
    p.add_argument("--max_train_samples", type=int, help="use the first N training examples (after a seeded shuffle)")
    p.add_argument("--max_eval_samples", type=int, help="evaluate on the first N dev examples")
    p.add_argument("--lr_scheduler_type", default="linear", choices=["linear", "cosine", "constant"])
    p.add_argument("--num_warmup_steps", type=int, help="default: --warmup_ratio of the optimizer steps")
    p.add_argument("--warmup_ratio", type=float, default=0.06)
    p.add_argument(
        "--max_grad_norm",
        type=float,
        default=1.0,
        help="global grad-norm clipping (*_per_layer: each parameter's); 0: off",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when there is one)")
    flag("--bf16", help="bfloat16 autocast for the forward passes (weights, gradients, optimizer state stay fp32)")
    flag("--eval_each_epoch", default=True, help="evaluate after every epoch (the last one always)")
    # optimizer (osd-train's strings)
    p.add_argument("--optimizer", default="adamw", help=f"one of {', '.join(cli_options.optimizer_names())}")
    p.add_argument("--proj_type", default="continuous", help=f"one of {', '.join(cli_options.PROJ_TYPES)}")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--update_proj_gap", type=int, default=200)
    p.add_argument("--galore_scale", type=float, default=4.0)
    p.add_argument("--proj_lr", type=float, help="online PCA: fixed P lr (default (1/gap) * lr_t/lr_0)")
    p.add_argument("--orth_reg", type=float, default=0.0)
    p.add_argument("--beta1", type=float, default=0.0, help="adafactor's first-moment beta (0: none)")
    p.add_argument(
        "--target_modules",
        default=",".join(ENCODER_TARGETS),
        help="comma-separated substrings of the matrix modules put in the subspace group",
    )
    return p


RANGES = {  # flag -> (lowest, lowest allowed?, highest, highest allowed?)
    "learning_rate": (0, False, None, None),
    "weight_decay": (0, True, None, None),
    "warmup_ratio": (0, True, 1, True),
    "max_grad_norm": (0, True, None, None),
    "galore_scale": (0, False, None, None),
    "proj_lr": (0, False, None, None),
    "orth_reg": (0, True, None, None),
    "beta1": (0, True, 1, False),
    "seed": (0, True, None, None),
    "num_warmup_steps": (0, True, None, None),
}
POSITIVE = [
    "max_length",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_train_samples",
    "max_eval_samples",
    "rank",
    "update_proj_gap",
]


def resolve(argv) -> argparse.Namespace:
    """Parse and check the flags (raises UsageError; reads and writes nothing)."""
    args = build_parser().parse_args(argv)
    args.task_name = args.task_name.lower().replace("-", "")
    if args.task_name not in TASKS:
        raise UsageError(f"unknown --task_name {args.task_name!r}; valid: {', '.join(TASKS)}")
    try:
        choice = cli_options.parse_optimizer(args.optimizer)
        cli_options.subspace_options(args.proj_type)
        cli_options.optimizer_kwargs(choice, args.learning_rate, args.weight_decay, args.beta1)
    except ValueError as e:
        raise UsageError(str(e)) from None
    args.subspace, args.per_layer = choice.subspace, choice.per_layer
    for key in POSITIVE:
        value = getattr(args, key)
        if value is not None and value <= 0:
            raise UsageError(f"--{key} must be positive, got {value}")
    cli_options.check_ranges(args, RANGES)
    args.target_modules = tuple(t for t in args.target_modules.split(",") if t.strip())
    if not args.target_modules:
        raise UsageError("--target_modules is empty")
    args.device = resolve_device(args.device)
    check_output_dir(args)
    return args


def resolve_device(name: str) -> torch.device:
    """``--device``: auto is cuda when torch sees one, else cpu; a cuda device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown --device {name!r}; valid: auto, cpu, cuda, cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UsageError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_output_dir(args) -> None:
    path = Path(args.output_dir)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output_dir {path}: exists and is not a directory")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"--output_dir {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--output_dir {path}: {existing} is not writable")
    found = [n for n in RUN_FILES if (path / n).exists()]
    if found and not args.overwrite:
        raise UsageError(
            f"--output_dir {path} holds another run ({', '.join(found)}): choose another --output_dir "
            "or pass --overwrite to replace it"
        )


# --------------------------------------------------------------------------- data


def _task_dir(data_dir: Path, task: Task) -> Path:
    for candidate in (data_dir / task.folder, data_dir):
        if (candidate / "train.tsv").is_file():
            return candidate
    if not data_dir.is_dir():
        raise UsageError(f"--data_dir {data_dir}: no such directory (a glue_data/ layout: DIR/{task.folder}/train.tsv)")
    raise UsageError(f"--data_dir {data_dir}: no {task.folder}/train.tsv (nor train.tsv) for this task")


def read_tsv(path: Path, task: Task) -> tuple[list[tuple[str, str | None, str]], int]:
    """(text_a, text_b, label) rows of a GLUE TSV file, and the number of rows skipped for a
    wrong field count or an empty label (QQP and MNLI have a few)."""
    if not path.is_file():
        raise UsageError(f"{path}: no such file (the {task.folder} task needs train.tsv and {task.dev_file})")
    with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: MRPC's files start with a BOM
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None) if task.header else None
        if task.header and header is None:
            raise UsageError(f"{path}: empty file")
        columns = [task.text_a, task.text_b, task.label]
        if header is not None:
            missing = [c for c in columns if c is not None and c not in header]
            if missing:
                raise UsageError(f"{path}: no column {', '.join(map(repr, missing))} in its header {header[:6]}")
            index = [header.index(c) if c is not None else None for c in columns]
            width = len(header)
        else:
            index, width = columns, None
        rows, skipped = [], 0
        for fields in reader:
            if (width is not None and len(fields) != width) or len(fields) <= max(i for i in index if i is not None):
                skipped += 1
                continue
            a, b, label = (fields[i] if i is not None else None for i in index)
            if not label.strip():
                skipped += 1
                continue
            rows.append((a, b, label.strip()))
    if not rows:
        raise UsageError(f"{path}: no usable rows")
    return rows, skipped


def encode_labels(rows, task: Task, path) -> list:
    if task.labels is None:
        try:
            return [float(r[2]) for r in rows]
        except ValueError as e:
            raise UsageError(f"{path}: a score is not a number ({e})") from None
    ids = {name: i for i, name in enumerate(task.labels)}
    bad = sorted({r[2] for r in rows} - ids.keys())
    if bad:
        raise UsageError(f"{path}: unknown label(s) {bad[:3]}; expected {list(task.labels)}")
    return [ids[r[2]] for r in rows]


def load_local(data_dir: str, task: Task) -> tuple[dict, list[str]]:
    folder = _task_dir(Path(data_dir), task)
    splits, notes = {}, []
    for split, name in (("train", "train.tsv"), ("validation", task.dev_file)):
        path = folder / name
        rows, skipped = read_tsv(path, task)
        if skipped:
            notes.append(f"{path}: skipped {skipped} malformed row(s)")
        splits[split] = {
            "text_a": [r[0] for r in rows],
            "text_b": [r[1] for r in rows] if task.text_b is not None else None,
            "label": encode_labels(rows, task, path),
        }
    return splits, notes


def load_hub(task_name: str, task: Task) -> dict:
    import datasets

    from osd.data import _hub_unavailable

    try:
        ds = datasets.load_dataset(HUB_DATASET, task_name)
    except Exception as e:  # offline, no network, ...
        why = _hub_unavailable(e) or str(e).splitlines()[0][:200]
        raise UsageError(
            f"the Hub's {HUB_DATASET} dataset ({task_name}) could not be loaded: {why}; pass --data_dir DIR, "
            f"a local glue_data/ layout with DIR/{task.folder}/train.tsv and {task.dev_file} "
            "(e.g. --data_dir ../shared/data/glue)"
        ) from None
    a, b = task.hub_columns
    out = {}
    for split, name in (("train", "train"), ("validation", task.hub_validation)):
        d = ds[name]
        label = [float(x) for x in d["label"]] if task.labels is None else [int(x) for x in d["label"]]
        out[split] = {"text_a": list(d[a]), "text_b": list(d[b]) if b else None, "label": label}
    return out


def subsample(split: dict, n: int | None, seed: int | None) -> dict:
    """The first ``n`` examples (all when ``n`` is None), after a seeded shuffle when
    ``seed`` is given."""
    if n is None:
        return split
    order = list(range(len(split["label"])))
    if seed is not None:
        random.Random(seed).shuffle(order)
    return {k: [v[i] for i in order[:n]] if v is not None else None for k, v in split.items()}


def tokenize(tokenizer, split: dict, max_length: int) -> list[dict]:
    args = (split["text_a"],) if split["text_b"] is None else (split["text_a"], split["text_b"])
    enc = tokenizer(*args, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
    return [{**{k: enc[k][i] for k in keys}, "labels": split["label"][i]} for i in range(len(split["label"]))]


def collate(examples: list[dict], pad_id: int, length: int | None = None) -> dict:
    width = length or max(len(e["input_ids"]) for e in examples)
    batch = {}
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        if key in examples[0]:
            fill = pad_id if key == "input_ids" else 0
            batch[key] = torch.tensor([e[key] + [fill] * (width - len(e[key])) for e in examples])
    labels = [e["labels"] for e in examples]
    batch["labels"] = torch.tensor(labels, dtype=torch.float32 if isinstance(labels[0], float) else torch.long)
    return batch


# --------------------------------------------------------------------------- metrics


def compute_metrics(task_name: str, predictions, labels) -> dict:
    """GLUE's metric(s) of a task; ``predictions`` are class ids (classification) or scores
    (STS-B). Keys as in transformers' run_glue: accuracy, f1, matthews_correlation,
    pearson, spearmanr, and combined_score (their mean) when there are several."""
    import numpy as np
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    task = TASKS[task_name]
    p, y = np.asarray(predictions), np.asarray(labels)
    out = {}
    for name in task.metrics:
        if name == "accuracy":
            out[name] = float((p == y).mean())
        elif name == "f1":
            out[name] = float(f1_score(y, p))
        elif name == "matthews_correlation":
            out[name] = float(matthews_corrcoef(y, p))
        elif name == "pearson":
            out[name] = float(pearsonr(p, y)[0])
        elif name == "spearmanr":
            out[name] = float(spearmanr(p, y)[0])
    if len(out) > 1:
        out["combined_score"] = float(sum(out.values()) / len(out))
    return out


MAIN_METRIC = {"cola": "matthews_correlation", "stsb": "pearson", "mrpc": "accuracy", "qqp": "accuracy"}


def main_metric(task_name: str) -> str:
    """The metric the benchmark tables report (GaLore's/LoRA's Table convention)."""
    return MAIN_METRIC.get(task_name, "accuracy")


# --------------------------------------------------------------------------- model, optimizer


def load_model(args, num_labels: int, regression: bool):
    import transformers

    from osd.data import _hub_unavailable

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars on stderr
    name = args.model_name_or_path
    problem = "regression" if regression else "single_label_classification"
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            name, num_labels=num_labels, problem_type=problem, ignore_mismatched_sizes=True
        )
    except (OSError, ValueError) as e:
        why = _hub_unavailable(e)
        local = Path(name).is_dir()
        if why and not local:
            raise UsageError(
                f"--model_name_or_path {name}: not a local directory and the Hub is {why}; pass a local model "
                "directory, e.g. --model_name_or_path ../shared/data/models/all-MiniLM-L6-v2"
            ) from None
        raise UsageError(f"--model_name_or_path {name}: cannot load it ({str(e).splitlines()[0][:200]})") from None
    limit = getattr(model.config, "max_position_embeddings", None)
    if model.config.model_type in ("roberta", "xlm-roberta", "camembert") and limit:
        limit -= model.config.pad_token_id + 1  # RoBERTa's positions start after the pad id
    if limit and args.max_length > limit:
        raise UsageError(f"--max_length {args.max_length} exceeds the model's {limit} positions")
    return model, tokenizer


def build_optimizer(model, args):
    """The optimizer ``args`` asks for, built by :func:`osd.cli_options.build_optimizer` (the
    one place that reads the strings) with the encoder's ``--target_modules`` in the
    subspace group. Raises ValueError (e.g. no module matches the targets)."""
    trainer_args = SimpleNamespace(
        optimizer=args.optimizer,
        lr=args.learning_rate,
        weight_decay=args.weight_decay,
        beta1=args.beta1,
        proj_type=args.proj_type,
        rank=args.rank,
        update_proj_gap=args.update_proj_gap,
        galore_scale=args.galore_scale,
        proj_lr=args.proj_lr,
        orth_reg=args.orth_reg,
        transport=False,
        retract_every=0,
        proj_dtype="auto",
        gradient_accumulation=args.gradient_accumulation_steps,
        grad_clipping=args.max_grad_norm,
    )
    return cli_options.build_optimizer(model, trainer_args, args.target_modules)


def state_bytes(optimizer) -> int:
    """Optimizer-state bytes held (osd's own count, else the tensors in ``optimizer.state``)."""
    if hasattr(optimizer, "state_bytes"):
        return int(optimizer.state_bytes())
    inner = getattr(optimizer, "optimizer", optimizer)
    return sum(
        v.numel() * v.element_size() for s in inner.state.values() for v in s.values() if isinstance(v, torch.Tensor)
    )


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 1 - progress) if kind == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# --------------------------------------------------------------------------- run


def prepare(argv, log=print):
    """Everything that can fail on bad input, before anything is written."""
    args = resolve(argv)
    task = TASKS[args.task_name]
    if args.data_dir is not None:
        splits, notes = load_local(args.data_dir, task)
        for note in notes:
            log(note)
    else:
        splits = load_hub(args.task_name, task)
    regression = task.labels is None
    torch.manual_seed(args.seed)  # the new head's initialisation
    model, tokenizer = load_model(args, 1 if regression else len(task.labels), regression)
    import osd

    try:  # the subspace group's matrices (an error naming the model's matrices when none match)
        matrices = osd.param_groups(model, args.rank, args.target_modules)[1]["params"]
    except ValueError as e:
        if args.subspace:
            raise UsageError(f"--target_modules {','.join(args.target_modules)}: {e}") from None
        matrices = []
    args.target_parameters = sum(p.numel() for p in matrices)
    model.to(args.device)
    if args.pad_to_max_length and tokenizer.pad_token_id is None:
        raise UsageError(f"--model_name_or_path {args.model_name_or_path}: its tokenizer has no pad token")
    return args, splits, model, tokenizer


def forward(model, inputs: dict, args):
    """``model(**inputs)`` on ``args.device``, under bfloat16 autocast with ``--bf16``."""
    inputs = {k: v.to(args.device, non_blocking=True) for k, v in inputs.items()}
    with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.bf16):
        return model(**inputs)


def evaluate(model, examples, args, pad_id, regression):
    model.eval()
    preds, labels = [], []
    with torch.no_grad():
        for i in range(0, len(examples), args.per_device_eval_batch_size):
            batch = collate(examples[i : i + args.per_device_eval_batch_size], pad_id)
            logits = forward(model, {k: v for k, v in batch.items() if k != "labels"}, args).logits.float()
            preds += logits.squeeze(-1).tolist() if regression else logits.argmax(-1).tolist()
            labels += batch["labels"].tolist()
    model.train()
    return preds, labels


def run(argv, build_optimizer=None, log=print) -> dict:
    """Fine-tune as ``argv`` asks; return the evaluation results (also in eval_results.json).

    ``build_optimizer(model, args)``, when given, replaces :func:`build_optimizer` (the
    benchmark's LoRA baseline injects its adapters into ``model`` there); ``--optimizer``
    is then only recorded."""
    import transformers

    from osd.train import versions

    args, splits, model, tokenizer = prepare(argv, log)
    regression = TASKS[args.task_name].labels is None
    train_split = subsample(splits["train"], args.max_train_samples, args.seed if args.max_train_samples else None)
    eval_split = subsample(splits["validation"], args.max_eval_samples, None)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_examples = tokenize(tokenizer, train_split, args.max_length)
    eval_examples = tokenize(tokenizer, eval_split, args.max_length)
    transformers.set_seed(args.seed)
    try:
        optimizer = (build_optimizer or globals()["build_optimizer"])(model, args)
    except ValueError as e:
        raise UsageError(str(e)) from None

    batch, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
    micro_per_epoch = math.ceil(len(train_examples) / batch)
    steps_per_epoch = micro_per_epoch // accum if args.per_layer else math.ceil(micro_per_epoch / accum)
    if steps_per_epoch < 1:
        raise UsageError(f"{len(train_examples)} training examples make no whole step of {batch} x {accum}")
    total = steps_per_epoch * args.num_train_epochs
    warmup = args.num_warmup_steps if args.num_warmup_steps is not None else int(args.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, total, args.lr_scheduler_type)
    )
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:  # --overwrite (checked in resolve): the previous run's files go
        (out / name).unlink(missing_ok=True)
    config = {k: v for k, v in vars(args).items()}
    config.update(train_examples=len(train_examples), eval_examples=len(eval_examples), versions=versions())
    (out / "run_config.json").write_text(json.dumps(config, indent=2, default=str))
    trainable = [p for p in model.parameters() if p.requires_grad]
    log(
        f"{args.task_name}: {len(train_examples)} train / {len(eval_examples)} dev examples, "
        f"{sum(p.numel() for p in trainable):,} trainable parameters, optimizer {args.optimizer}"
        + (f" ({args.proj_type}, rank {args.rank})" if args.subspace else "")
    )

    generator = torch.Generator().manual_seed(args.seed)
    length = args.max_length if args.pad_to_max_length else None
    model.train()
    step, start, history, results = 0, time.perf_counter(), [], {}
    log_file = open(out / "train_log.jsonl", "w")  # noqa: SIM115
    try:
        for epoch in range(args.num_train_epochs):
            order = torch.randperm(len(train_examples), generator=generator).tolist()
            micro = [order[i : i + batch] for i in range(0, len(order), batch)]
            if args.per_layer:  # Layerwise steps inside the accum-th backward: whole steps only
                micro = micro[: len(micro) // accum * accum]
            for first in range(0, len(micro), accum):
                group = micro[first : first + accum]
                n = sum(len(ix) for ix in group)
                loss_sum = 0.0
                for ix in group:
                    inputs = collate([train_examples[i] for i in ix], pad_id, length)
                    loss = forward(model, inputs, args).loss * (len(ix) / n)
                    if not torch.isfinite(loss):
                        raise Diverged(f"the training loss became {loss.item()} at step {step}: lower --learning_rate")
                    loss.backward()
                    loss_sum += loss.item()
                if args.max_grad_norm and not args.per_layer:
                    torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                history.append(loss_sum)
                if step % 10 == 0 or step == total:
                    record = {"step": step, "epoch": epoch, "loss": sum(history[-10:]) / len(history[-10:])}
                    record["lr"] = scheduler.get_last_lr()[0]
                    log_file.write(json.dumps(record) + "\n")
            if args.eval_each_epoch or epoch == args.num_train_epochs - 1:
                preds, labels = evaluate(model, eval_examples, args, pad_id, regression)
                results = {f"eval_{k}": v for k, v in compute_metrics(args.task_name, preds, labels).items()}
                results.update(epoch=epoch + 1, step=step)
                log_file.write(json.dumps(results) + "\n")
                log(
                    f"epoch {epoch + 1}: "
                    + ", ".join(f"{k} {v:.4f}" for k, v in results.items() if k.startswith("eval_"))
                )
    finally:
        log_file.close()
    results.update(
        task=args.task_name,
        train_loss=sum(history) / max(1, len(history)),
        train_steps=step,
        train_examples=len(train_examples),
        eval_examples=len(eval_examples),
        train_seconds=round(time.perf_counter() - start, 2),
        optimizer_state_bytes=state_bytes(optimizer),
        target_matrix_parameters=args.target_parameters,
        trainable_parameters=sum(p.numel() for p in trainable),
    )
    inner = getattr(optimizer, "optimizer", optimizer)  # osd.Layerwise wraps one
    if hasattr(inner, "state_bytes") and len(inner.param_groups) > 1:
        results["optimizer_state_bytes_per_group"] = [inner.state_bytes(i) for i in range(len(inner.param_groups))]
    (out / "eval_results.json").write_text(json.dumps(results, indent=2))
    if args.save_model:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return results


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return cli_options.run_command(PROG, lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
