"""The trainer under FSDP2 (``--fsdp``): 2 CPU processes (gloo).

One launch of tests/train_ddp_worker.py trains, in 2 processes: an FSDP2 run, its DDP twin,
a resume of the FSDP2 run from its step-4 checkpoint, an FSDP2 run with SVD bases,
gradient accumulation and the loss in chunks beside its DDP twin, and a per-layer FSDP2 run
(chunked loss too). Checked: FSDP2 gives
DDP's losses and evaluations (fp32: within 1e-6 relative), per-layer FSDP2 those of one
per-layer process with the same global batch, the resume repeats the metrics exactly, the
checkpoint is a DCP directory that ``osd-train`` verifies. Plus the real ``torchrun -m
osd.train --fsdp``, killed and restarted, and the combinations ``--fsdp`` refuses, each with
one line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launcher import env, run_jobs
from train_fixtures import base_args, make_fixture, read_metrics, without_timing

from osd import checkpoint, train

WORKER = Path(__file__).with_name("train_ddp_worker.py")
WORLD = 2
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD)]
COMMON = dict(eval_tokens=1_000_000, keep_checkpoints=0, log_every=100, batch_size=2)
RUNS = {
    "fsdp": dict(fsdp=True),
    "ddp": dict(),
    # with the loss in chunks of 9 tokens (osd.lean.chunked_cross_entropy) under FSDP2 and DDP
    "fsdp_svd_accumulation": dict(
        fsdp=True, proj_type="std", update_proj_gap=3, batch_size=1, total_batch_size=4, loss_chunk=9
    ),
    "ddp_svd_accumulation": dict(proj_type="std", update_proj_gap=3, batch_size=1, total_batch_size=4, loss_chunk=9),
    # per-layer: each shard updated in the hook FSDP2 calls after its reduce-scatter
    "fsdp_per_layer": dict(fsdp=True, optimizer="galore_adamw_per_layer", grad_clipping=0.5, loss_chunk=9),
}


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_fixture(tmp_path_factory.mktemp("train_fixture"))


@pytest.fixture(scope="module")
def runs(fx, tmp_path_factory):
    """Every run of RUNS, then the resume of "fsdp" from step 4, in one 2-process launch."""
    root = tmp_path_factory.mktemp("fsdp")
    dirs = {name: root / name for name in [*RUNS, "resumed"]}
    argvs = {name: base_args(fx, dirs[name], **{**COMMON, **flags}) for name, flags in RUNS.items()}
    argvs["resumed"] = base_args(fx, dirs["resumed"], **COMMON, fsdp=True, continue_from=dirs["fsdp"] / "model_4")
    run_jobs(WORKER, argvs, dirs, root, WORLD, timeout=400)
    return dirs


def close(a: list[dict], b: list[dict], rtol: float) -> list[str]:
    """Metric values of two runs that differ by more than ``rtol`` relative."""
    bad = []
    for x, y in zip(without_timing(a), without_timing(b), strict=True):
        for k in x:
            if isinstance(x[k], float) and abs(x[k] - y[k]) > rtol * max(abs(y[k]), 1e-12):
                bad.append(f"step {x['step']} {k}: {x[k]} vs {y[k]}")
            elif not isinstance(x[k], float) and x[k] != y[k]:
                bad.append(f"step {x['step']} {k}: {x[k]} vs {y[k]}")
    return bad


@pytest.mark.parametrize("name", ["", "_svd_accumulation"])
def test_fsdp_trains_as_ddp_does(runs, name):
    fsdp, ddp = read_metrics(runs["fsdp" + name]), read_metrics(runs["ddp" + name])
    assert len(fsdp) == len(ddp) and any("eval_loss" in r for r in fsdp)
    assert close(fsdp, ddp, rtol=1e-6) == []


def test_per_layer_updates_under_fsdp_train_as_one_process_does(fx, runs, tmp_path):
    """2 ranks of 2 sequences, per-layer, against one process of 4 sequences, per-layer:
    the same losses and evaluations (fp32, within 1e-6)."""
    one = tmp_path / "one"
    flags = {**COMMON, **RUNS["fsdp_per_layer"], "fsdp": None, "batch_size": 4}
    assert train.main(base_args(fx, one, **flags)) == 0
    assert close(read_metrics(runs["fsdp_per_layer"]), read_metrics(one), rtol=1e-6) == []


def test_resuming_an_fsdp_run_repeats_its_metrics(runs):
    resumed = without_timing(read_metrics(runs["resumed"]))
    original = without_timing(read_metrics(runs["fsdp"]))
    assert resumed and resumed == original[-len(resumed) :]


def test_an_fsdp_checkpoint_is_a_verified_dcp_directory(runs):
    path = runs["fsdp"] / "model_8"
    meta = checkpoint.verify(path)
    assert meta["sharded"] and meta["world_size"] == WORLD
    assert (path / "dcp" / ".metadata").is_file() and not (path / "model.safetensors").exists()
    assert {f"dcp/__{r}_0.distcp" for r in range(WORLD)} <= set(meta["files"])
    (path / "dcp" / "__1_0.distcp").write_bytes(b"damaged")
    with pytest.raises(checkpoint.CheckpointError, match="does not match its SHA-256|bytes"):
        checkpoint.verify(path)


def test_torchrun_runs_the_trainer_with_fsdp(fx, tmp_path):
    argv = base_args(fx, tmp_path / "run", **{**COMMON, "fsdp": True, "num_training_steps": 2, "eval_every": 2})
    proc = subprocess.run([*TORCHRUN, "-m", "osd.train", *argv], capture_output=True, text=True, env=env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "saved" in proc.stdout and (tmp_path / "run" / "model_2" / "dcp" / ".metadata").is_file()


def test_a_killed_fsdp_run_restarts_to_the_same_metrics(fx, runs, tmp_path):
    """``torchrun -m osd.train --fsdp --auto_resume``, saving every 2 steps, killed (SIGKILL,
    every process) once its step-4 checkpoint exists; the same command again finishes the
    run: its metrics equal the uninterrupted run's."""
    run = tmp_path / "run"
    argv = base_args(fx, run, **{**COMMON, "fsdp": True, "save_every": 2, "auto_resume": True})
    command = [*TORCHRUN, "-m", "osd.train", *argv]
    first = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(), start_new_session=True
    )
    deadline = time.monotonic() + 240
    while not (run / "model_4" / checkpoint.MARKER).is_file():
        assert first.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not (run / "model_8").exists()  # killed mid-run
    again = subprocess.run(command, capture_output=True, text=True, env=env(), timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "resume from " + str(run / "model_") in again.stdout
    assert without_timing(read_metrics(run)) == without_timing(read_metrics(runs["fsdp"]))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (dict(autocast=True), "--fsdp with --autocast: use --dtype bfloat16"),
        (dict(single_gpu=True), "--fsdp and --single_gpu exclude each other"),
    ],
)
def test_fsdp_refuses_what_it_cannot_run_with_one_line(fx, tmp_path, capsys, flags, message):
    assert train.main(base_args(fx, tmp_path / "run", fsdp=True, **flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()


def test_an_fsdp_checkpoint_loads_into_one_unsharded_process(fx, runs):
    """The export path the docs give: osd.dcp.load of the 2-rank checkpoint into a plain
    model and optimizer in this process (no process group) gives the weights the DDP twin
    saved (within 1e-6) and every optimizer parameter its state."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from osd import cli_options, dcp, models

    args = train.resolve(train.parse_args(base_args(fx, runs["fsdp"], **COMMON, fsdp=True)), WORLD)
    model = LlamaForCausalLM(models.model_config(args.model_config))
    optimizer = cli_options.build_optimizer(model, args)
    dcp.load(runs["fsdp"] / "model_4" / "dcp", model, optimizer)  # (model_8 is damaged above)
    ddp = load_file(runs["ddp"] / "model_4" / "model.safetensors")
    for name, p in model.named_parameters():
        assert torch.allclose(p, ddp[name], rtol=1e-6, atol=1e-7), name
    assert all(optimizer.state[p]["step"] == 4 for g in optimizer.param_groups for p in g["params"])
