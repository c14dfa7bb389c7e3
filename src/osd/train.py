"""Pretrain a LLaMA model on C4-style text with any osd optimizer: ``osd-train`` or
``python -m osd.train``, single process or ``torchrun --nproc_per_node N -m osd.train``.

Command lines of the seed's ``torchrun_main.py`` work unchanged (same flags, same meaning);
``--config FILE.toml`` supplies the same keys, flags override it. ``osd-train plot RUN...``
draws loss curves. What differs from the seed, on purpose:

* the loss of a step is the mean over its real (non-pad) tokens across all micro-batches
  and ranks (the seed averages per-micro-batch means), and DDP gradients are synchronised
  only on the last micro-batch;
* exactly ``--num_training_steps`` optimizer steps (the seed takes one more), and
  ``--max_train_tokens`` counts tokens (the seed divides it by sequences per step only);
* ``--scheduler linear`` decays to ``--min_lr_ratio`` (the seed's goes to 0);
* evaluation is a token-weighted mean over ``--eval_tokens`` (the seed averages per-batch
  means and divides by batches + 1);
* checkpoints hold everything (model, optimizer, scheduler, data position, RNG) and resume
  exactly.

Bad input (unknown names, sizes or numbers out of range, unreadable data, a damaged
checkpoint or one of another run, a save_dir holding another run) ends with a one-line
``osd-train: error: ...`` on stderr and exit code 2, before anything is written. A run
whose loss becomes non-finite stops with exit code 3 and keeps its last finite checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import shutil
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from osd import checkpoint, cli_options, lean, models, shards
from osd.cli_options import Diverged, Parser, UsageError
from osd.data import DataError, Documents, TokenBatches, count_tokens, load_tokenizer, open_source
from osd.metrics import MetricsLog, plot_main

PROG = "osd-train"


# flags a resumed run may change: they do not touch the trajectory of the weights (a new
# --num_training_steps / --max_train_tokens stretches the lr schedule from the resumed step)
RESUMABLE_CHANGES = frozenset(
    "num_training_steps max_train_tokens eval_every save_every log_every eval_tokens eval_dataset "
    "keep_checkpoints save_dir log_dir name tags wandb workers continue_from auto_resume overwrite config "
    "log_details use_hf_model single_gpu".split()
)


# --------------------------------------------------------------------------- arguments


def token_count(text: str) -> int:
    """'100M', '1.5B', '20k' or a plain number (the seed's --max_train_tokens syntax)."""
    text = str(text).strip()
    scale = {"K": 1e3, "M": 1e6, "B": 1e9}.get(text[-1:].upper(), 1)
    try:
        return int(float(text[:-1] if scale != 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (e.g. 100M, 1B)") from None


def flags_to_argv(flags: dict) -> list[str]:
    """An ``osd-train`` command line from ``{flag: value}``: True adds a bare flag, None and
    False leave it out, anything else becomes ``--flag str(value)``."""
    argv = []
    for key, value in flags.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not None and value is not False:
            argv += [f"--{key}", str(value)]
    return argv


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    flag = partial(p.add_argument, action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--config", help="TOML file with any of these flags as keys; flags override it")
    # the seed's flags
    p.add_argument("--model_config", help="size name (llama_9m .. llama_7b), a config JSON, or a model dir")
    flag("--use_hf_model", help="accepted for the seed's command lines: the model is always HF LlamaForCausalLM")
    p.add_argument("--continue_from", help="checkpoint directory (or a save_dir: its newest intact checkpoint)")
    p.add_argument("--batch_size", type=int, help="sequences per micro-batch per process")
    p.add_argument("--gradient_accumulation", type=int)
    p.add_argument("--total_batch_size", type=int, help="sequences per optimizer step, all processes")
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--optimizer", default="adam", help=f"one of {', '.join(cli_options.optimizer_names())}")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--scheduler", default="cosine", choices=["cosine", "linear"])
    p.add_argument("--min_lr_ratio", type=float, default=0.1)
    flag("--activation_checkpointing")
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--warmup_steps", type=int, default=1000)
    p.add_argument("--eval_every", type=int, default=5000)
    p.add_argument("--num_training_steps", type=int, default=10_000, help="optimizer steps")
    p.add_argument("--max_train_tokens", type=token_count, help="overrides --num_training_steps (100M, 1B)")
    p.add_argument("--save_every", type=int, default=10_000)
    p.add_argument("--save_dir", help="checkpoints and run files (default checkpoints/MODEL-DATE-TIME)")
    p.add_argument("--tags", help="comma-separated wandb tags")
    p.add_argument("--dtype", default="auto", help="bfloat16 (pure bf16 weights) or float32; auto: bf16 on CUDA")
    p.add_argument("--workers", type=int, default=8, help="accepted; data is read in the main process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="test")
    p.add_argument(
        "--grad_clipping", type=float, default=0.0, help="max global grad norm (*_per_layer: each parameter's), 0: off"
    )
    p.add_argument("--beta1", type=float, default=0.0, help="adafactor's first-moment beta (0: none)")
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--update_proj_gap", type=int, default=50)
    p.add_argument("--galore_scale", type=float, default=1.0)
    p.add_argument("--proj_type", default="std", help=f"one of {', '.join(cli_options.PROJ_TYPES)}")
    flag("--log_details", help="accepted for the seed's command lines")
    flag("--single_gpu", help="no DDP (one process only)")
    flag(
        "--fsdp",
        help="FSDP2 instead of DDP: each decoder layer and the model fully_shard-ed (rows of every weight, "
        "gradient and optimizer state split over the processes); --dtype bfloat16 keeps fp32 weights and "
        "computes in bf16; checkpoints through torch.distributed.checkpoint",
    )
    # new flags
    p.add_argument("--dataset", default="allenai/c4", help="Hub name, or local json/jsonl(.gz)/parquet/txt/glob")
    p.add_argument("--eval_dataset", help="default: the Hub dataset's validation split")
    p.add_argument("--tokenizer", default="t5-base", help="name or local directory")
    p.add_argument("--eval_tokens", type=token_count, default=10_000_000, help="non-pad tokens per evaluation")
    flag("--packing", help="concatenate documents instead of truncate-and-pad")
    flag("--autocast", help="fp32 master weights, forward/backward under bf16 autocast")
    p.add_argument(
        "--loss_chunk",
        type=int,
        default=0,
        help="token positions per chunk of the output head and loss, their gradients made in forward "
        "(0: the whole micro-batch at once); bounds the logits' memory to one chunk",
    )
    p.add_argument("--proj_lr", type=float, help="online PCA: fixed P lr (default (1/gap) * lr_t/lr_0)")
    p.add_argument("--orth_reg", type=float, default=0.0, help="online PCA: orthogonality penalty (paper: 0.1)")
    flag("--transport", help="subspace groups: carry the moments into the new basis when it moves")
    p.add_argument("--retract_every", type=int, default=0, help="online PCA: QR-retract P every k steps (0: never)")
    p.add_argument(
        "--proj_dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype of the projection matmuls (auto: the gradient's, as the references)",
    )
    p.add_argument(
        "--basis_dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="storage dtype of the projection bases (bfloat16: half their memory; basis maths stays fp32)",
    )
    p.add_argument(
        "--svd_method",
        default="exact",
        choices=["exact", "randomized"],
        help="SVD for the bases (svd refreshes, online PCA's first basis): randomized is O(mnr)",
    )
    p.add_argument(
        "--correction",
        default="none",
        choices=["none", "fira", "apollo", "apollo_mini"],
        help="full-rank correction of subspace updates: fira adds the scaled, norm-limited residual; "
        "apollo / apollo_mini scale the whole gradient channel-wise / tensor-wise",
    )
    p.add_argument("--log_dir", help="metrics.jsonl and run_config.json (default: --save_dir)")
    p.add_argument("--log_every", type=int, default=10, help="steps between log lines")
    p.add_argument("--keep_checkpoints", type=int, default=3, help="newest checkpoints kept (0: all)")
    flag(
        "--auto_resume",
        help="resume from the newest intact checkpoint of --continue_from or else --save_dir; start fresh if none",
    )
    flag("--overwrite", help="start a fresh run in a --save_dir that holds another run (deletes its checkpoints)")
    flag("--wandb", help="also log to Weights & Biases")
    return p


def read_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """TOML keys -> parser defaults, checked against the flags' types."""
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except OSError as e:
        raise UsageError(f"--config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"--config {path}: not valid TOML ({e})") from None
    actions = {a.dest: a for a in parser._actions}
    for key, value in values.items():
        action = actions.get(key)
        if action is None or key in ("config", "help"):
            raise UsageError(f"--config {path}: unknown key {key!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            ok = isinstance(value, bool)
        elif action.type is float:
            ok, value = isinstance(value, int | float) and not isinstance(value, bool), float(value)
        elif action.type is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif action.type is token_count:
            ok = isinstance(value, int | str)
            value = token_count(value) if ok else value
        else:
            ok = isinstance(value, str)
        if not ok or (action.choices and value not in action.choices):
            raise UsageError(f"--config {path}: bad value {value!r} for {key}")
        values[key] = value
    return values


def parse_args(argv) -> argparse.Namespace:
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**read_config(known.config, parser))
    return parser.parse_args(argv)


def resolve(args, world_size: int) -> argparse.Namespace:
    """Check the arguments and fill in derived values; raises UsageError. Writes nothing."""
    for key in ("model_config", "batch_size"):
        if getattr(args, key) is None:
            raise UsageError(f"--{key} is required (flag or --config key)")
    try:
        choice = cli_options.parse_optimizer(args.optimizer)
        cli_options.subspace_options(args.proj_type)
        cli_options.optimizer_kwargs(choice, args.lr, args.weight_decay, args.beta1)
        args.model = models.model_config(args.model_config).to_dict()  # with LlamaConfig's defaults
    except ValueError as e:
        raise UsageError(str(e)) from None
    args.per_layer, args.subspace = choice.per_layer, choice.subspace
    args.osd_optimizer = choice.class_name  # recorded in run_config.json
    if choice.subspace:
        args.subspace_options = cli_options.subspace_options(args.proj_type)
    positive = ["batch_size", "max_length", "num_training_steps", "eval_every", "save_every", "log_every"]
    positive += ["rank", "update_proj_gap"] if choice.subspace else []
    for key in positive + ["gradient_accumulation", "total_batch_size"]:
        value = getattr(args, key)
        if value is not None and value <= 0:
            raise UsageError(f"--{key} must be positive, got {value}")
    check_numbers(args)

    per_step = args.batch_size * world_size
    if args.total_batch_size is None:
        args.gradient_accumulation = args.gradient_accumulation or 1
        args.total_batch_size = per_step * args.gradient_accumulation
    elif args.gradient_accumulation is None:
        if args.total_batch_size % per_step:
            raise UsageError(
                f"--total_batch_size {args.total_batch_size} is not divisible by "
                f"--batch_size {args.batch_size} x {world_size} process(es)"
            )
        args.gradient_accumulation = args.total_batch_size // per_step
    if args.gradient_accumulation * per_step != args.total_batch_size:
        raise UsageError(
            f"--gradient_accumulation {args.gradient_accumulation} x --batch_size {args.batch_size} x "
            f"{world_size} process(es) != --total_batch_size {args.total_batch_size}"
        )
    if args.max_train_tokens is not None:
        args.num_training_steps = args.max_train_tokens // (args.total_batch_size * args.max_length)
        if args.num_training_steps < 1:
            raise UsageError(f"--max_train_tokens {args.max_train_tokens} is less than one step")

    dtype = {"auto": None, "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
    if args.dtype not in dtype:
        raise UsageError(f"--dtype {args.dtype!r}: use bfloat16 or float32 (float16 is not supported)")
    if args.autocast and dtype[args.dtype] == "bfloat16":
        raise UsageError("--autocast keeps float32 master weights: drop --dtype bfloat16")
    cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    args.dtype = dtype[args.dtype] or ("bfloat16" if cuda_bf16 and not args.autocast else "float32")
    limit = args.model["max_position_embeddings"]
    if args.max_length > limit:
        raise UsageError(f"--max_length {args.max_length} exceeds the model's max_position_embeddings {limit}")

    if args.single_gpu and world_size > 1:
        raise UsageError(f"--single_gpu with {world_size} processes: each would train its own copy")
    if args.fsdp:
        check_fsdp(args)
    elif args.per_layer and world_size > 1:
        raise UsageError(
            "per-layer optimizers step inside backward, before DDP's all-reduce: use one process, or --fsdp"
        )
    if args.eval_dataset is None:
        if args.dataset != "allenai/c4" and (os.path.exists(args.dataset) or "/" not in args.dataset):
            raise UsageError("--eval_dataset is required with a local --dataset")
        args.eval_dataset = args.dataset  # the Hub dataset's validation split
    args.save_dir = args.save_dir or f"checkpoints/{Path(args.model_config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    args.log_dir = args.log_dir or args.save_dir
    args.world_size = world_size
    return args


# flag -> (lowest, lowest allowed?, highest, highest allowed?); None: unbounded
RANGES = {
    "lr": (0, False, None, None),
    "weight_decay": (0, True, None, None),
    "min_lr_ratio": (0, False, 1, True),
    "grad_clipping": (0, True, None, None),
    "beta1": (0, True, 1, False),
    "galore_scale": (0, False, None, None),
    "proj_lr": (0, False, None, None),
    "orth_reg": (0, True, None, None),
    "warmup_steps": (0, True, None, None),
    "retract_every": (0, True, None, None),
    "loss_chunk": (0, True, None, None),
    "keep_checkpoints": (0, True, None, None),
    "eval_tokens": (0, False, None, None),
    "seed": (0, True, None, None),
    "workers": (0, True, None, None),
}


def check_fsdp(args) -> None:
    """What --fsdp does not combine with (raises UsageError)."""
    if args.single_gpu:
        raise UsageError("--fsdp and --single_gpu exclude each other")
    if args.autocast:
        raise UsageError("--fsdp with --autocast: use --dtype bfloat16 (FSDP2 keeps fp32 weights and computes in bf16)")


def check_numbers(args) -> None:
    """Every numeric flag finite and in its range (raises UsageError naming it)."""
    cli_options.check_ranges(args, RANGES)


def training_flags(args) -> dict:
    """The flags that shape the run's trajectory (all but RESUMABLE_CHANGES), as stored in
    each checkpoint and compared on resume."""
    keys = [a.dest for a in build_parser()._actions if a.dest not in RESUMABLE_CHANGES and a.dest != "help"]
    return json.loads(json.dumps({k: getattr(args, k) for k in sorted(keys)}))


def resume_candidates(args) -> list[Path]:
    """Checkpoints to try, newest first ([] for a fresh start)."""
    where = args.continue_from or (args.save_dir if args.auto_resume else None)
    if where is None:
        return []
    if args.auto_resume and not (Path(where) / checkpoint.MARKER).is_file():
        if Path(where).exists() and not Path(where).is_dir():
            raise UsageError(f"--auto_resume: {where} is not a directory")
        return checkpoint.list_checkpoints(where)[::-1] if Path(where).is_dir() else []
    try:
        return checkpoint.candidates(where)
    except checkpoint.CheckpointError as e:
        raise UsageError(str(e)) from None


def check_resume(args) -> Path | None:
    """The checkpoint to resume from: the newest intact one (a damaged newer one is skipped
    with a warning naming it), after checking it belongs to this run."""
    candidates = resume_candidates(args)
    if not candidates:
        return None
    damage = []
    for path in candidates:
        try:
            meta = checkpoint.verify(path)
            break
        except checkpoint.CheckpointError as e:
            damage.append(str(e))
    else:
        raise UsageError(f"no intact checkpoint to resume from: {'; '.join(damage)}")
    for problem in damage:
        warnings.warn(f"{problem}; resuming from the older {path}", stacklevel=2)
    mine = models.architecture(args.model)
    theirs = meta.get("model", {})
    diff = [f"{k} {theirs.get(k)} (checkpoint) vs {v}" for k, v in mine.items() if theirs.get(k) != v]
    if diff:
        raise UsageError(f"--continue_from {path} belongs to another model: {'; '.join(diff)}")
    for key in ("optimizer", "proj_type", "world_size", "packing"):
        if key in meta and meta[key] != run_identity(args)[key]:
            raise UsageError(f"--continue_from {path}: {key} {meta[key]!r} there, {run_identity(args)[key]!r} here")
    if isinstance(meta.get("flags"), dict):  # checkpoints before this check carry none
        theirs, mine = meta["flags"], training_flags(args)
        diff = [
            f"--{k} {theirs.get(k)!r} there, {mine[k]!r} here" for k in mine if k in theirs and theirs[k] != mine[k]
        ]
        if diff:
            raise UsageError(
                f"--continue_from {path} was trained with other flags: {'; '.join(diff)} "
                f"(a resume may change only {', '.join(sorted(RESUMABLE_CHANGES - {'config', 'continue_from'}))})"
            )
    return path


def holds_a_run(directory) -> list[str]:
    """What in ``directory`` belongs to a run (metrics, run config, checkpoints)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [n for n in ("metrics.jsonl", "run_config.json") if (d / n).exists()]
    return found + [p.name for p in checkpoint.list_checkpoints(d)]


def check_save_dir(args, resume_path: Path | None) -> None:
    """--save_dir / --log_dir usable, and not another run's (unless --overwrite)."""
    for flag, value in (("save_dir", args.save_dir), ("log_dir", args.log_dir)):
        path = Path(value)
        if path.exists() and not path.is_dir():
            raise UsageError(f"--{flag} {value}: exists and is not a directory")
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            raise UsageError(f"--{flag} {value}: {existing} is a file, not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UsageError(f"--{flag} {value}: {existing} is not writable")
    if args.overwrite:
        return
    resuming_here = resume_path is not None and {Path(args.save_dir).resolve(), Path(args.log_dir).resolve()} <= {
        resume_path.parent.resolve()
    }
    if resuming_here or (args.auto_resume and resume_path is None):
        return  # the same run: continue it (or, before its first checkpoint, restart it)
    for flag, value in (("save_dir", args.save_dir), ("log_dir", args.log_dir)):
        found = holds_a_run(value)
        if found:
            raise UsageError(
                f"--{flag} {value} holds another run ({', '.join(found[:4])}): resume it with --continue_from "
                f"{value} (or --auto_resume), choose another --{flag}, or pass --overwrite to replace it"
            )


def run_identity(args) -> dict:
    """What must not change across a resume (stored in each checkpoint)."""
    return {
        "model": models.architecture(args.model),
        "optimizer": args.optimizer.lower(),
        "proj_type": args.proj_type.lower() if args.subspace else None,
        "world_size": args.world_size,
        "packing": args.packing,
    }


# --------------------------------------------------------------------------- training


def lr_lambda(step, *, warmup, total, min_ratio, kind):
    """Linear warmup from 0, then cosine (or linear) decay to ``min_ratio`` at ``total``
    (the seed's schedule; step 0 of a warmup has lr 0, as there)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


class Dist:
    """Rank, world size and device, with collectives that are no-ops in one process."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        local = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        self.main = self.rank == 0

    def start(self, group: bool = False):
        """Set the device; start the process group when there are several processes, or
        when ``group`` (FSDP2 needs one in a single process too)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.world > 1:
            torch.distributed.init_process_group(backend)
        elif group and not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)

    def sum(self, values) -> list:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.main else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out


def shard(loss: TokenLoss, dtype: str) -> None:
    """FSDP2: ``fully_shard`` each decoder layer, then the model with its loss (the root:
    embeddings, final norm, head); with ``dtype`` bfloat16 the weights stay fp32 and are gathered in bf16 for
    compute, gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    policy = policy if dtype == "bfloat16" else MixedPrecisionPolicy()
    for layer in loss.lm.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(loss, mp_policy=policy)


class TokenLoss(torch.nn.Module):
    """A causal LM and its loss as one module: the sum of next-token cross-entropy over the
    labelled tokens, from fp32 logits. DDP and FSDP2 wrap this module, so the output head
    and the loss run inside their forward.

    With ``chunk`` > 0 the head and the loss run on ``chunk`` token positions at a time, with
    their gradients made in forward (:func:`osd.lean.chunked_cross_entropy`): the logits
    and their fp32 copy exist for one chunk at a time instead of the whole micro-batch, and
    the head's gradient is one buffer the chunks add into; the same matmuls as unchunked."""

    def __init__(self, lm, chunk: int = 0):
        super().__init__()
        self.lm, self.chunk = lm, chunk

    def forward(self, input_ids, labels):
        # No attention mask: padding is on the right, so causal attention never lets a real
        # token see a pad, and pad positions carry no loss; this keeps SDPA's causal kernel.
        hidden = self.lm.model(input_ids=input_ids).last_hidden_state.flatten(0, 1)
        # position t predicts token t + 1; each sequence's last position predicts nothing
        targets = F.pad(labels[:, 1:], (0, 1), value=-100).flatten()
        if not self.chunk or self.chunk >= len(targets):
            return self.head_loss(hidden, targets)
        return lean.chunked_cross_entropy(hidden, self.lm.lm_head.weight, targets, self.chunk)

    def head_loss(self, hidden, targets):
        return F.cross_entropy(self.lm.lm_head(hidden).float(), targets, reduction="sum")


def token_loss_sum(loss: TokenLoss, batch, device):
    """Sum of next-token cross-entropy over the batch's labelled tokens (fp32 logits)."""
    return loss(batch["input_ids"].to(device), batch["labels"].to(device))


@torch.no_grad()
def evaluate(loss_of: TokenLoss, args, dist, tokenizer, eval_source, precision):
    """Token-weighted mean loss over about ``--eval_tokens`` non-pad tokens of the eval set
    (each rank reads its share), and its perplexity."""
    docs = Documents(eval_source, dist.rank, dist.world, epochs=1, name="eval dataset")
    batches = TokenBatches(docs, tokenizer, args.batch_size, args.max_length, args.model["vocab_size"], args.packing)
    loss, predicted, seen = 0.0, 0, 0
    loss_of.eval()
    stream = iter(batches)
    idle = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "labels": torch.zeros(1, 2, dtype=torch.long)}
    while True:
        batch = next(stream, None) if seen * dist.world < args.eval_tokens else None
        if args.fsdp:  # each forward gathers weights from every rank: all go on while one has a batch
            if dist.sum([batch is not None])[0] == 0:
                break
            if batch is None:
                with precision():
                    token_loss_sum(loss_of, idle, dist.device)
                continue
        elif batch is None:
            break
        with precision():
            loss += token_loss_sum(loss_of, batch, dist.device).item()
        n_input, n_pred = count_tokens(batch)
        seen, predicted = seen + n_input, predicted + n_pred
    loss_of.train()
    loss, predicted, seen = dist.sum([loss, predicted, seen])
    mean = loss / max(predicted, 1)
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 700)), "eval_tokens": int(seen)}


def train(args, dist, tokenizer, train_source, eval_source, resume_path, log, build_optimizer=None):
    import transformers
    from transformers import LlamaForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # save_pretrained's shard bar
    torch.manual_seed(args.seed)  # same initial weights on every rank
    random.seed(args.seed)
    np.random.seed(args.seed)
    config = models.model_config(args.model_config)
    model = LlamaForCausalLM(config)
    lean.apply(model)  # the same values, fewer saved activations
    if args.activation_checkpointing:
        models.checkpoint_layers(model)
    # FSDP2 keeps fp32 weights and casts them to bf16 for compute (its mixed-precision policy)
    model.to(device=dist.device, dtype=torch.float32 if args.fsdp else getattr(torch, args.dtype))
    loss_of = TokenLoss(model, args.loss_chunk)
    if args.fsdp:
        shard(loss_of, args.dtype)
    try:
        optimizer = (build_optimizer or cli_options.build_optimizer)(model, args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    schedule = partial(
        lr_lambda,
        warmup=args.warmup_steps,
        total=args.num_training_steps,
        min_ratio=args.min_lr_ratio,
        kind=args.scheduler,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    docs = Documents(train_source, dist.rank, dist.world, name="dataset")
    batches = TokenBatches(docs, tokenizer, args.batch_size, args.max_length, config.vocab_size, args.packing)

    step, tokens = 0, 0
    if resume_path is not None:
        state, data_states = checkpoint.load(resume_path, model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        step, tokens = state["step"], state["tokens"]
        checkpoint.set_rng_state(state["rng"][dist.rank])
        batches.load_state_dict(data_states[dist.rank])
    ddp = None
    if dist.world > 1 and not args.fsdp:
        ddp = torch.nn.parallel.DistributedDataParallel(loss_of, broadcast_buffers=False)
    forward = ddp or loss_of
    precision = partial(torch.autocast, dist.device.type, dtype=torch.bfloat16, enabled=args.autocast)
    metrics = MetricsLog(args.log_dir, resume_step=step) if dist.main else None
    wandb = _wandb(args) if dist.main and args.wandb else None

    def record(entry):
        if dist.main:
            metrics.write(entry)
            if wandb:
                wandb.log(entry, step=entry["step"])

    def save():
        # one host read per save: a checkpoint is only written from finite weights
        finite = torch.stack([torch.isfinite(shards.local(p)).all() for p in model.parameters()]).all()
        if not bool(dist.sum([0.0 if finite else 1.0])[0] == 0):
            raise Diverged(f"non-finite weights after step {step}: not saved; {last_checkpoint()}")
        meta = {"step": step, **run_identity(args), "run": args.name, "flags": training_flags(args)}
        trainer_state = {"step": step, "tokens": tokens, "scheduler": scheduler.state_dict()}
        rng = dist.gather(checkpoint.rng_state())
        data_states = dist.gather(batches.state_dict())
        if args.fsdp:  # every rank writes its shards
            trainer_state["rng"] = rng
            where = Path(args.save_dir) / f"model_{step}"
            token = dist.broadcast(os.getpid())
            path = checkpoint.save_sharded(
                where, model, optimizer, trainer_state, data_states, meta, args.keep_checkpoints, dist.main, token
            )
            log(f"saved {path}")
        elif dist.main:
            trainer_state["rng"] = rng
            path = checkpoint.save(
                Path(args.save_dir) / f"model_{step}",
                model,
                optimizer,
                trainer_state,
                data_states,
                meta,
                args.keep_checkpoints,
            )
            log(f"saved {path}")

    def last_checkpoint():
        found = checkpoint.list_checkpoints(args.save_dir) if dist.main else []
        return f"the last checkpoint is {found[-1]}" if found else "no checkpoint was saved"

    inner = getattr(optimizer, "optimizer", optimizer)  # osd.Layerwise wraps one
    counter = getattr(inner, "basis_updates_skipped", None)  # not for optimizers outside osd

    def basis_skips() -> int:
        """Basis updates skipped (zero or non-finite gradient) so far, all ranks; a host
        read, so only at log steps."""
        return int(dist.sum([counter() if counter else 0])[0]) // dist.world

    from tqdm import tqdm

    bar = tqdm(total=args.num_training_steps, initial=step, desc="steps", disable=None if dist.main else True)
    stream = iter(batches)
    params = [p for p in model.parameters() if p.requires_grad]
    while step < args.num_training_steps:
        start = time.perf_counter()
        micro = [next(stream) for _ in range(args.gradient_accumulation)]
        counts = [count_tokens(b) for b in micro]
        step_input, step_pred = dist.sum([sum(c[0] for c in counts), sum(c[1] for c in counts)])
        # Each rank's sum of token losses / all ranks' token count, times world size because
        # DDP averages gradients over ranks: the gradient is that of the global token mean.
        norm = dist.world / max(step_pred, 1)
        loss_sum = 0.0
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            sync = contextlib.nullcontext() if ddp is None or last else ddp.no_sync()
            if args.fsdp and not args.per_layer:  # reduce-scatter in the last backward only
                loss_of.set_requires_gradient_sync(last)  # (per-layer updates need every one: each fires the hooks)
            with sync:
                with precision():
                    loss = token_loss_sum(forward, batch, dist.device)
                (loss * norm).backward()
            loss_sum += loss.item()
        entry = {"step": step + 1, "loss": dist.sum([loss_sum])[0] / max(step_pred, 1)}
        entry["lr"] = optimizer.param_groups[0]["lr"]
        if not math.isfinite(entry["loss"]):  # before the step: the weights stay as they were
            record(entry)
            raise Diverged(
                f"loss is {entry['loss']} at step {step + 1}: training stopped; {last_checkpoint()} "
                f"(lower --lr, or set --grad_clipping)"
            )
        if args.grad_clipping and not args.per_layer:  # per-layer clips inside backward
            norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clipping)
            entry["grad_norm"] = (norm.full_tensor() if args.fsdp else norm).item()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step, tokens = step + 1, tokens + int(step_input)
        entry.update(tokens=tokens, tokens_per_s=step_input / (time.perf_counter() - start))
        if step % args.log_every == 0 or step == args.num_training_steps:
            skipped = basis_skips()
            if skipped:
                entry["basis_updates_skipped"] = skipped
        record(entry)
        bar.update(1)
        bar.set_postfix(loss=f"{entry['loss']:.3f}")
        if step % args.log_every == 0 or step == args.num_training_steps:
            log(
                f"step {step}/{args.num_training_steps} loss {entry['loss']:.4f} lr {entry['lr']:.3g} "
                f"tokens {tokens} tok/s {entry['tokens_per_s']:.0f}"
                + (
                    f" basis updates skipped {entry['basis_updates_skipped']}"
                    if "basis_updates_skipped" in entry
                    else ""
                )
            )
        if step % args.eval_every == 0 or step == args.num_training_steps:
            result = {"step": step, **evaluate(loss_of, args, dist, tokenizer, eval_source, precision)}
            record(result)
            log(
                f"eval step {step}: loss {result['eval_loss']:.4f} ppl {result['eval_ppl']:.2f} "
                f"({result['eval_tokens']} tokens)"
            )
        if step % args.save_every == 0 or step == args.num_training_steps:
            save()
    bar.close()
    if wandb:
        wandb.finish()
    return model, optimizer


def _wandb(args):
    import wandb

    wandb.init(project="osd", name=args.name, tags=args.tags.split(",") if args.tags else None, config=args.resolved)
    return wandb


def versions() -> dict:
    import datasets
    import transformers

    import osd

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "osd": osd.__version__,
    }


def prepare(argv, dist):
    """Everything that can fail on bad input, before anything is written."""
    args = resolve(parse_args(argv), dist.world)
    if args.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UsageError("--wandb needs the wandb package (pip install wandb)") from None
    # the one write before the checks: complete checkpoints a killed re-save moved aside go
    # back under their names, so that the newest one is found
    args.restored = []
    for where in dict.fromkeys(str(d) for d in (args.save_dir, args.continue_from) if d):
        args.restored += checkpoint.restore(
            where if not (Path(where) / checkpoint.MARKER).is_file() else Path(where).parent
        )
    resume_path = check_resume(args)
    check_save_dir(args, resume_path)
    train_source = open_source(args.dataset, "train")  # first: its offline message names every flag
    eval_source = open_source(args.eval_dataset, "validation")
    tokenizer = load_tokenizer(args.tokenizer)
    for source, name in ((train_source, "dataset"), (eval_source, "eval dataset")):
        docs = Documents(source, dist.rank, dist.world, epochs=1, name=name)
        # The first batch proves the data readable, non-empty and within the model's vocab.
        next(iter(TokenBatches(docs, tokenizer, 1, args.max_length, args.model["vocab_size"], args.packing)))
    return args, tokenizer, train_source, eval_source, resume_path


def run(argv, dist=None, build_optimizer=None):
    """Train as ``argv`` asks; return (model, optimizer). The process group stays up.

    ``build_optimizer(model, args)``, when given, replaces :func:`osd.cli_options.build_optimizer`
    (benchmarks use it for optimizers outside osd); ``--optimizer`` is then only recorded."""
    dist = dist or Dist()
    args, tokenizer, train_source, eval_source, resume_path = prepare(argv, dist)
    dist.start(group=args.fsdp)
    log = print if dist.main else (lambda *a, **k: None)
    resolved = {k: v for k, v in vars(args).items() if k not in ("model", "restored")}
    resolved.update(model=args.model, versions=versions(), device=str(dist.device))
    resolved["resumed_from"] = str(resume_path) if resume_path else None
    args.resolved = resolved
    if dist.main:
        for line in args.restored + checkpoint.clean(args.save_dir):
            log(line)
        if args.overwrite and resume_path is None:
            removed = replace_run(args)
            if removed:
                log(f"--overwrite: removed {', '.join(removed)}")
        Path(args.log_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.log_dir) / "run_config.json").write_text(json.dumps(resolved, indent=2))
        log(json.dumps(resolved, indent=2))
        log(f"world size {dist.world}, device {dist.device}, resume from {resume_path}")
    return train(args, dist, tokenizer, train_source, eval_source, resume_path, log, build_optimizer)


def replace_run(args) -> list[str]:
    """--overwrite: delete the previous run's metrics, run config and checkpoints."""
    removed = []
    for directory in dict.fromkeys([Path(args.save_dir), Path(args.log_dir)]):
        for name in holds_a_run(directory):
            path = directory / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(str(path))
    return removed


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plot"]:
        return plot_main(argv[1:])

    def body():
        run(argv)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    return cli_options.run_command(PROG, body, handled=(DataError,))


if __name__ == "__main__":
    sys.exit(main())
