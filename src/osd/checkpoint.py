"""Trainer checkpoints: everything needed to continue a run exactly.

A checkpoint is a directory ``SAVE_DIR/model_STEP`` holding::

    config.json, model.safetensors   the model, Hugging Face format (save_pretrained)
    optimizer.pt                     the optimizer's tensor-only state_dict
    trainer_state.pt                 scheduler, counters, RNG states of every rank
    data_state.json                  every rank's data position (datasets state + buffer)
    osd_checkpoint.json              what the run was (model architecture, optimizer, world
                                     size, the flags that shape training) and the size and
                                     SHA-256 of every other file: marks the directory as a
                                     checkpoint, lets --continue_from refuse a mismatch and
                                     :func:`verify` find a damaged file

Under ``--fsdp`` every rank writes its shards of the model and the optimizer through
``torch.distributed.checkpoint`` (:mod:`osd.dcp`) into ``dcp/`` in place of
``model.safetensors`` and ``optimizer.pt``; rank 0 writes the rest. Such a checkpoint
resumes on any number of processes for full-precision optimizer state (the trainer still
asks for the same world size: the data position is per rank).

It is written to a hidden temporary directory and renamed into place, so a process dying
while saving leaves the previous checkpoints intact; only the newest ``keep`` are kept, and
:func:`clean` removes what a killed save left behind. Every ``.pt`` file loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

MARKER = "osd_checkpoint.json"
NAME = re.compile(r"model_(\d+)$")
FILES = ("config.json", "model.safetensors", "optimizer.pt", "trainer_state.pt", "data_state.json")
SHARDED_FILES = ("config.json", "dcp/.metadata", "trainer_state.pt", "data_state.json")  # + dcp/'s data files
LEFTOVER = re.compile(r"\.(tmp|old)-(model_\d+)-(\d+)$")  # what a killed save leaves


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, damaged or not a checkpoint."""


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
    return _publish(tmp, final, trainer_state, data_states, meta, FILES, keep)


def save_sharded(
    directory, model, optimizer, trainer_state: dict, data_states: list, meta: dict, keep: int, main: bool, token
) -> Path:
    """:func:`save` for FSDP2, called on every rank: each writes its shards (``dcp/``), rank 0
    (``main``) the rest. ``token`` (rank 0's pid, the same on every rank) names the
    temporary directory."""
    import torch.distributed as dist

    from osd import dcp

    final = Path(directory)
    tmp = final.parent / f".tmp-{final.name}-{token}"
    if main:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save(tmp / "dcp", model, optimizer)  # returns when every rank's files are written
    if main:
        model.config.to_json_file(tmp / "config.json")
        files = sorted(str(f.relative_to(tmp)) for f in (tmp / "dcp").iterdir())
        _publish(tmp, final, trainer_state, data_states, {**meta, "sharded": True}, ["config.json", *files], keep)
    dist.barrier()
    return final


def _publish(tmp: Path, final: Path, trainer_state, data_states, meta, files, keep) -> Path:
    """Write the trainer's files and the manifest into ``tmp``, then rename it to ``final``."""
    torch.save(trainer_state, tmp / "trainer_state.pt")
    (tmp / "data_state.json").write_text(json.dumps(data_states))
    names = list(dict.fromkeys([*files, "trainer_state.pt", "data_state.json"]))
    meta = {**meta, "files": {name: _describe(tmp / name) for name in names}}
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


def _describe(path: Path) -> dict:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def restore(save_dir) -> list[str]:
    """Put back the complete checkpoints that a killed re-save had moved aside
    (``.old-model_N-PID`` while ``model_N`` is missing); return one line for each.

    Safe to call from every rank at once: each rename is atomic, and a rank that finds the
    work done moves on."""
    done = []
    root = Path(save_dir)
    if not root.is_dir():
        return done
    for path in sorted(root.iterdir()):
        match = LEFTOVER.match(path.name)
        if match and match.group(1) == "old" and (path / MARKER).is_file() and not (root / match.group(2)).exists():
            try:
                os.replace(path, root / match.group(2))
            except FileNotFoundError:  # another rank did it
                continue
            done.append(f"restored {root / match.group(2)} from {path.name} (a save of that step was interrupted)")
    return done


def clean(save_dir) -> list[str]:
    """Delete what killed saves left in ``save_dir`` (unfinished ``.tmp-model_N-PID``
    directories, and ``.old-model_N-PID`` copies whose ``model_N`` exists; run
    :func:`restore` first); return one line for each."""
    done = []
    root = Path(save_dir)
    if not root.is_dir():
        return done
    for path in sorted(root.iterdir()):
        if LEFTOVER.match(path.name) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path} (left by an interrupted save)")
    return done


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
    Raises CheckpointError when there is none."""
    return candidates(path)[0]


def candidates(path) -> list[Path]:
    """``[path]`` when it is a checkpoint, else the checkpoints inside it, newest first.
    Raises CheckpointError when there is none."""
    path = Path(path)
    if (path / MARKER).is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"--continue_from {path}: no such directory")
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"--continue_from {path}: not an osd-train checkpoint (no {MARKER}) and holds none")
    return found[::-1]


def read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / MARKER).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable {MARKER} ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path}: {MARKER} holds a {type(meta).__name__}, not an object")
    return meta


def verify(path: Path) -> dict:
    """Check that every file of the checkpoint is there and intact; return its meta.

    Checkpoints that record their files (this version) are checked by size and SHA-256;
    older ones by opening each file (safetensors header, torch.load of the ``.pt`` files
    with mmap, JSON). Raises CheckpointError naming the first problem."""
    meta = read_meta(path)
    files = meta.get("files")
    for name in SHARDED_FILES if meta.get("sharded") else FILES:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        if file.stat().st_size == 0:
            raise CheckpointError(f"checkpoint {path}: {name} is empty")
    if isinstance(files, dict):
        for name, want in files.items():
            got = _describe(path / name)
            if got["bytes"] != want.get("bytes"):
                raise CheckpointError(
                    f"checkpoint {path}: {name} has {got['bytes']} bytes, {want.get('bytes')} were written (truncated?)"
                )
            if got["sha256"] != want.get("sha256"):
                raise CheckpointError(f"checkpoint {path}: {name} does not match its SHA-256 (damaged)")
        return meta
    try:  # a checkpoint from before the manifest: open everything
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            list(f.keys())
        for name in ("optimizer.pt", "trainer_state.pt"):
            torch.load(path / name, map_location="cpu", weights_only=True, mmap=True)
        for name in ("config.json", "data_state.json"):
            json.loads((path / name).read_text())
    except Exception as e:  # noqa: BLE001 - any failure to open is damage
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path}: unreadable ({first})") from None
    return meta


def load(path: Path, model, optimizer) -> tuple[dict, list]:
    """Load model and optimizer state in place; return (trainer_state, data_states)."""
    if read_meta(path).get("sharded"):
        from osd import dcp

        dcp.load(path / "dcp", model, optimizer)
    else:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(path / "model.safetensors"), strict=True)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    trainer_state = torch.load(path / "trainer_state.pt", weights_only=True)
    data_states = json.loads((path / "data_state.json").read_text())
    return trainer_state, data_states
