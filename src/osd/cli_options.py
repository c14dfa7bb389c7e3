"""The seed's ``--optimizer`` and ``--proj_type`` strings, resolved to osd classes and
subspace-group options. This is the only place those strings are interpreted.

``--optimizer``: a base name from :data:`BASE_OPTIMIZERS`, optionally prefixed ``galore_``
(attention and MLP matrices in a rank-``--rank`` subspace group) and/or suffixed
``_per_layer`` (in-backward updates through ``osd.Layerwise``; there ``--grad_clipping``
clips each parameter's gradient norm, as a global norm would need all gradients at once).
``--proj_type``: how the subspace basis is chosen, :data:`PROJ_TYPES`.

Differences from the seed, on purpose: ``adam`` is ``osd.AdamW`` (decoupled weight decay;
the seed's ``torch.optim.Adam`` couples it, identical at the recipes' weight decay 0), and
``sgd`` has no momentum (``--beta1`` > 0 with sgd is refused rather than ignored).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

# base name -> osd class name
BASE_OPTIMIZERS = {
    "adam": "AdamW",
    "adamw": "AdamW",
    "adam8bit": "AdamW8bit",
    "adamw8bit": "AdamW8bit",
    "lion": "Lion",
    "adafactor": "Adafactor",
    "sgd": "SGD",
}

# proj_type -> subspace-group options (osd.param_groups keyword arguments)
PROJ_TYPES = {
    "std": dict(projector="svd", side="auto"),
    "reverse_std": dict(projector="svd", side="reverse_auto"),
    "left": dict(projector="svd", side="left"),
    "right": dict(projector="svd", side="right"),
    "full": dict(projector="svd", side="both"),
    "random": dict(projector="random", side="auto"),
    "continuous": dict(projector="online_pca", side="auto", proj_optimizer="adamw"),
    "continuous_adam8bit": dict(projector="online_pca", side="auto", proj_optimizer="adam8bit"),
    "continuous_lion": dict(projector="online_pca", side="auto", proj_optimizer="lion"),
    "continuous_adafactor": dict(projector="online_pca", side="auto", proj_optimizer="adafactor"),
    "continuous_sgd": dict(projector="online_pca", side="auto", proj_optimizer="sgd"),
}


def optimizer_names() -> list[str]:
    """Every accepted ``--optimizer`` string."""
    names = []
    for base in BASE_OPTIMIZERS:
        for galore in ("", "galore_"):
            names += [galore + base, galore + base + "_per_layer"]
    return names


@dataclass(frozen=True)
class OptimizerChoice:
    class_name: str  # attribute of the osd package
    subspace: bool  # galore_*: a rank-r subspace group for attention/MLP matrices
    per_layer: bool  # *_per_layer: wrapped in osd.Layerwise


def parse_optimizer(name: str) -> OptimizerChoice:
    """Raises ValueError naming the valid strings."""
    key = name.lower()
    per_layer = key.endswith("_per_layer")
    key = key.removesuffix("_per_layer")
    subspace = key.startswith("galore_")
    key = key.removeprefix("galore_")
    if key not in BASE_OPTIMIZERS:
        raise ValueError(f"unknown --optimizer {name!r}; valid: {', '.join(optimizer_names())}")
    return OptimizerChoice(BASE_OPTIMIZERS[key], subspace, per_layer)


def subspace_options(proj_type: str) -> dict:
    """Raises ValueError naming the valid strings."""
    if proj_type.lower() not in PROJ_TYPES:
        raise ValueError(f"unknown --proj_type {proj_type!r}; valid: {', '.join(PROJ_TYPES)}")
    return dict(PROJ_TYPES[proj_type.lower()])


def optimizer_kwargs(choice: OptimizerChoice, lr: float, weight_decay: float, beta1: float) -> dict:
    """Constructor arguments the seed passes for each optimizer (``--beta1`` is Adafactor's
    first-moment coefficient, 0 meaning none, as in the seed)."""
    kwargs = dict(lr=lr, weight_decay=weight_decay)
    if choice.class_name == "Adafactor":
        kwargs["beta1"] = beta1 or None
    elif beta1:
        raise ValueError(f"--beta1 {beta1} is only used by adafactor (osd.{choice.class_name} ignores it)")
    return kwargs


def build_optimizer(model, args, target_modules=None):
    """The optimizer for ``model`` that ``args`` (the trainer's namespace) asks for;
    ``target_modules`` (default :data:`osd.groups.TARGET_MODULES`, LLaMA's attention and MLP)
    choose the subspace group's matrices (``osd-glue`` passes an encoder's).

    Raises ValueError for unknown strings and for what this osd version lacks."""
    import osd

    choice = parse_optimizer(args.optimizer)
    kwargs = optimizer_kwargs(choice, args.lr, args.weight_decay, args.beta1)
    cls = getattr(osd, choice.class_name, None)
    if cls is None:
        raise ValueError(f"--optimizer {args.optimizer} needs osd.{choice.class_name}, missing in this osd")
    if choice.subspace:
        options = subspace_options(args.proj_type)
        options.update(update_gap=args.update_proj_gap, scale=args.galore_scale, proj_lr=args.proj_lr)
        if args.orth_reg:
            options["orth_reg"] = args.orth_reg
        if args.transport:
            options["transport"] = True
        if args.retract_every:
            options["retract_every"] = args.retract_every
        if getattr(args, "proj_dtype", "auto") != "auto":
            options["proj_dtype"] = args.proj_dtype
        if getattr(args, "basis_dtype", "float32") != "float32":
            options["basis_dtype"] = args.basis_dtype
        if getattr(args, "svd_method", "exact") != "exact":
            options["svd_method"] = args.svd_method
        # always explicit: the library's default correction (fira) is not the seed's (none)
        options["correction"] = getattr(args, "correction", "none")
        groups = osd.param_groups(model, args.rank, target_modules or osd.groups.TARGET_MODULES, **options)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    optimizer = cls(groups, **kwargs)
    if not choice.per_layer:
        return optimizer
    # In-backward updates: Layerwise steps at the last of gradient_accumulation backwards,
    # and can only clip each parameter's gradient (a global norm needs them all at once).
    return osd.Layerwise(optimizer, args.gradient_accumulation, max_grad_norm=args.grad_clipping or None)


def quiet_stderr(prog: str) -> None:
    """Keep a command's stderr to what a user must read: one-line warnings prefixed with
    ``prog``, no library chatter (``osd-train`` and ``osd-glue``)."""
    import logging
    import os
    import warnings

    warnings.formatwarning = lambda msg, category, *a, **k: f"{prog}: warning: {msg}\n"
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("torchao", "torch.utils._pytree", "datasets", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# -- what osd-train and osd-glue share as command lines ---------------------------------

EXIT_USAGE, EXIT_DIVERGED = 2, 3


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit code 2, before anything is written."""


def check_ranges(args, ranges: dict) -> None:
    """Every flag of ``ranges`` (flag -> (lowest, lowest allowed?, highest, highest
    allowed?); highest None: unbounded) finite and in its range when set (raises UsageError
    naming it)."""
    for key, (low, low_ok, high, high_ok) in ranges.items():
        value = getattr(args, key)
        if value is None:
            continue
        if not math.isfinite(value):
            raise UsageError(f"--{key} must be a finite number, got {value}")
        below = value < low or (value == low and not low_ok)
        above = high is not None and (value > high or (value == high and not high_ok))
        if below or above:
            bounds = f"{'[' if low_ok else '('}{low}, {high if high is not None else 'inf'}{']' if high_ok else ')'}"
            raise UsageError(f"--{key} must be in {bounds}, got {value}")


class Diverged(Exception):
    """The loss (or the weights) became non-finite: one line on stderr, exit code 3."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise UsageError(message)


def run_command(prog: str, run: Callable[[], object], handled: tuple = ()) -> int:
    """Run a command's body with quiet stderr: 0 when it returns, else one line
    ``prog: error: ...`` and :data:`EXIT_USAGE` (UsageError and the ``handled`` exception
    types) or :data:`EXIT_DIVERGED` (Diverged)."""
    quiet_stderr(prog)
    try:
        run()
        return 0
    except (UsageError, *handled) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Diverged as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
