"""Choosing which weights live in a subspace."""

from __future__ import annotations

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

    The subspace group holds the 2-D weights of the ``nn.Linear`` modules whose qualified
    name contains one of ``target_modules`` (attention and MLP projections of a
    transformer); everything else (embeddings, norms, biases, the output head) goes to the
    plain group. Each trainable parameter appears exactly once; a weight shared by several
    modules (tied embeddings) is placed by its first name. ``subspace_options`` (``projector``,
    ``update_gap``, ``scale``, ``side``, ``proj_optimizer``, ...) are copied into the
    subspace group. Groups carry ``param_names`` so errors can name parameters.

    Raises ValueError when no module matches, naming the targets and some module names.
    """
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    targets = tuple(target_modules)
    chosen = set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(t in module_name for t in targets):
            if module.weight.requires_grad and module.weight.dim() == 2:
                chosen.add(id(module.weight))
    if not chosen:
        linears = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear)]
        raise ValueError(
            f"no nn.Linear module name contains any of {list(targets)}; Linear modules are e.g. {linears[:6] or 'none'}"
        )
    plain = {"params": [], "param_names": []}
    subspace = {"params": [], "param_names": [], "rank": rank, **subspace_options}
    for name, p in model.named_parameters():  # named_parameters yields a shared tensor once
        if p.requires_grad:
            group = subspace if id(p) in chosen else plain
            group["params"].append(p)
            group["param_names"].append(name)
    return [plain, subspace]
