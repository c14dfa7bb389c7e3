"""Trainer checkpoints: everything needed to continue a run exactly.

A checkpoint is a directory ``SAVE_DIR/model_STEP`` holding::

    config.json, model.safetensors   the model, Hugging Face format (save_pretrained)
    optimizer.pt                     the optimizer's tensor-only state_dict
    trainer_state.pt                 scheduler, counters, RNG states of every rank
    data_state.json                  every rank's data position (datasets state + buffer)
    osd_checkpoint.json              what the run was (model architecture, optimizer, world
                                     size): marks the directory as a checkpoint and lets
                                     --continue_from refuse a mismatch

It is written to a hidden temporary directory and renamed into place, so a process dying
while saving leaves the previous checkpoints intact; only the newest ``keep`` are kept.
Every ``.pt`` file loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

MARKER = "osd_checkpoint.json"
NAME = re.compile(r"model_(\d+)$")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


def save(directory, model, optimizer, trainer_state: dict, data_states: list, meta: dict, keep: int) -> Path:
    """Write a checkpoint to ``directory`` atomically; delete all but the newest ``keep``
    checkpoints beside it (``keep`` <= 0 keeps all)."""
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="100GB")  # one file, as the seed does
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(trainer_state, tmp / "trainer_state.pt")
    (tmp / "data_state.json").write_text(json.dumps(data_states))
    (tmp / MARKER).write_text(json.dumps(meta, indent=2))  # written last: marks it complete
    if final.exists():  # a re-run over the same step: swap, then drop the old copy
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    if keep > 0:
        for stale in list_checkpoints(final.parent)[:-keep]:
            if stale != final:
                shutil.rmtree(stale)
    return final


def list_checkpoints(save_dir) -> list[Path]:
    """Complete checkpoints in ``save_dir``, oldest first."""
    found = []
    for p in Path(save_dir).glob("model_*"):
        match = NAME.match(p.name)
        if match and (p / MARKER).is_file():
            found.append((int(match.group(1)), p))
    return [p for _, p in sorted(found)]


def find(path) -> Path:
    """The checkpoint ``path`` names: itself, or the newest one inside it (a save_dir).
    Raises ValueError when there is none."""
    path = Path(path)
    if (path / MARKER).is_file():
        return path
    if not path.is_dir():
        raise ValueError(f"--continue_from {path}: no such directory")
    found = list_checkpoints(path)
    if not found:
        raise ValueError(f"--continue_from {path}: not an osd-train checkpoint (no {MARKER}) and holds none")
    return found[-1]


def read_meta(path: Path) -> dict:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--continue_from {path}: unreadable {MARKER} ({e})") from None


def load(path: Path, model, optimizer) -> tuple[dict, list]:
    """Load model and optimizer state in place; return (trainer_state, data_states)."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(path / "model.safetensors"), strict=True)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    trainer_state = torch.load(path / "trainer_state.pt", weights_only=True)
    data_states = json.loads((path / "data_state.json").read_text())
    return trainer_state, data_states
