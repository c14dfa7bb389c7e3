"""Start N processes as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the
environment) and wait for them: the launcher of the multi-process tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def env(**extra) -> dict:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **extra,
    }


def launch(script: Path, args: list[str], world: int, logs: Path, timeout: float, **extra_env) -> list[str]:
    """Run ``python script *args`` as ``world`` ranks; return each rank's log. Asserts that
    every rank exits with 0 (the logs' tails in the message)."""
    logs.mkdir(parents=True, exist_ok=True)
    port = str(free_ports(1)[0])
    procs, files = [], []
    for rank in range(world):
        files.append(log := open(logs / f"rank{rank}.log", "w"))  # noqa: SIM115
        rank_env = env(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            **extra_env,
        )
        cmd = [sys.executable, str(script), *args]
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=rank_env))
    try:
        codes = wait_all(procs, timeout)
    finally:
        for log in files:
            log.close()
    texts = [(logs / f"rank{rank}.log").read_text() for rank in range(world)]
    assert codes == [0] * world, {rank: text[-3000:] for rank, text in enumerate(texts)}
    return texts


def wait_all(procs, timeout: float) -> list[int]:
    """Exit codes of all processes; a rank that fails leaves the others waiting in a
    collective, so they are killed 10 s after the first failure (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.poll() for p in procs):  # a non-zero exit code
            deadline = min(deadline, time.monotonic() + 10)
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    return [p.returncode for p in procs]


def run_jobs(worker: Path, argvs: dict, dirs: dict, root: Path, world: int, timeout: float) -> None:
    """Every trainer command line of ``argvs`` (name -> argv), in turn, in one launch of
    ``world`` ranks of ``worker`` (tests/train_ddp_worker.py), each job on a port of its own;
    the ranks dump their weights and optimizer state into ``dirs[name] / "dump"``."""
    jobs = [
        {"argv": argv, "port": port, "dump": str(dirs[name] / "dump")}
        for (name, argv), port in zip(argvs.items(), free_ports(len(argvs)), strict=True)
    ]
    (root / "jobs.json").write_text(json.dumps(jobs))
    launch(worker, [str(root / "jobs.json")], world, root, timeout=timeout)
