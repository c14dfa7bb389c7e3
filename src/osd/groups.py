"""Choosing which weights live in a subspace."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from torch import nn

TARGET_MODULES = ("attn", "mlp")


def param_groups(
    model: nn.Module,
    rank: int,
    target_modules: Iterable[str] = TARGET_MODULES,
    **subspace_options,
) -> list[dict]:
    """``[plain_group, subspace_group]`` for an osd optimizer.

    The subspace group holds the 2-D weights of the matrix modules (``nn.Linear``, and the
    ``transformers`` ``Conv1D`` of the GPT-2 family) whose qualified name contains one of
    ``target_modules`` (attention and MLP projections of a transformer); everything else
    (embeddings, norms, biases, the output head) goes to the plain group. A ``Conv1D``
    weight is stored transposed, ``(in, out)``; the optimizer treats it as the matrix it
    is (``side="auto"`` projects the smaller dimension whichever way round it is stored;
    ``left``/``right`` refer to the rows/columns of the stored weight).

    Each trainable parameter appears exactly once, under its first name in
    ``model.named_parameters()``. A weight shared by a targeted module and any other
    module (an output head tied to the input embedding, when ``target_modules`` selects the
    head) goes to the plain group: an embedding is not a matrix to project. A weight
    shared only by targeted matrix modules stays in the subspace group.
    ``subspace_options`` (``projector``, ``update_gap``, ``scale``, ``side``,
    ``proj_optimizer``, ...) are copied into the subspace group. Groups carry
    ``param_names`` so errors can name parameters.

    Raises ValueError when no module matches, naming the targets and some module names.
    """
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    targets = tuple(target_modules)
    targeted, elsewhere = set(), set()  # ids of weights of targeted matrix modules / used otherwise
    for module_name, module in model.named_modules():
        hit = _is_matrix_module(module) and any(t in module_name for t in targets)
        for name, p in module.named_parameters(recurse=False):
            if hit and name == "weight" and p.dim() == 2 and p.requires_grad:
                targeted.add(id(p))
            else:
                elsewhere.add(id(p))
    chosen = targeted - elsewhere
    if targeted and not chosen:
        raise ValueError(
            f"every weight of the modules matching {list(targets)} is shared with another module "
            "(tied embedding/head weights), so it stays in the plain group: nothing to put in a subspace"
        )
    if not chosen:
        matrices = [n for n, mod in model.named_modules() if _is_matrix_module(mod)]
        raise ValueError(
            f"no nn.Linear module name contains any of {list(targets)}; matrix modules (nn.Linear, "
            f"transformers Conv1D) are e.g. {matrices[:6] or 'none'}"
        )
    plain = {"params": [], "param_names": []}
    subspace = {"params": [], "param_names": [], "rank": rank, **subspace_options}
    for name, p in model.named_parameters():  # named_parameters yields a shared tensor once
        if p.requires_grad:
            group = subspace if id(p) in chosen else plain
            group["params"].append(p)
            group["param_names"].append(name)
    return [plain, subspace]


def _is_matrix_module(module: nn.Module) -> bool:
    """``nn.Linear``, or ``transformers.pytorch_utils.Conv1D`` (GPT-2's linear layer, weight
    ``(in, out)``). transformers is never imported here: a Conv1D can only exist once its
    module is loaded."""
    if isinstance(module, nn.Linear):
        return True
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(pytorch_utils, "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)
