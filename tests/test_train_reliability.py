"""What the trainer guarantees around a long run: resumes refuse changed flags, damaged
checkpoints are named (and skipped when an older one is intact), another run's directory
is not overwritten, a diverging run stops without saving non-finite weights, what killed
processes leave behind is cleaned, and every refusal is one line with exit code 2 before
anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from train_fixtures import base_args, make_fixture, read_metrics

from osd import checkpoint, train


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_fixture(tmp_path_factory.mktemp("reliability_fixture"))


@pytest.fixture(scope="module")
def trained(fx, tmp_path_factory):
    """A finished run (4 steps, checkpoints at 2 and 4) to copy from."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert train.main(args(fx, run)) == 0
    return run


def args(fx, run, **overrides):
    flags = dict(num_training_steps=4, save_every=2, eval_every=100, keep_checkpoints=0)
    flags.update(overrides)
    return base_args(fx, run, **flags)


def copy_run(trained, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


def one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("osd-train: error: "), err
    return err[0]


def snapshot(run: Path) -> dict:
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- 1. changed flags on resume


def test_resume_with_changed_flags_is_refused_listing_the_differences(fx, trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    before = snapshot(run)
    code = train.main(args(fx, run, rank=4, galore_scale=5, lr=0.5, continue_from=run / "model_2"))
    line = one_line_error(capsys)
    assert code == 2
    for diff in ("--galore_scale 0.25 there, 5.0 here", "--lr 0.01 there, 0.5 here", "--rank 8 there, 4 here"):
        assert diff in line, line
    assert "a resume may change only" in line and "num_training_steps" in line
    assert snapshot(run) == before  # run_config.json and metrics untouched


def test_resume_may_change_steps_and_cadence_and_records_what_it_used(fx, trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    argv = args(fx, run, num_training_steps=6, eval_every=3, log_every=1, continue_from=run)
    assert train.main(argv) == 0
    config = json.loads((run / "run_config.json").read_text())
    assert config["num_training_steps"] == 6 and config["resumed_from"] == str(run / "model_4")
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------- 2. damaged checkpoints


def damage(path: Path, how: str) -> None:
    if how == "missing":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    else:  # truncated
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("how", ["truncated", "empty", "missing"])
@pytest.mark.parametrize("name", ["optimizer.pt", "model.safetensors", "trainer_state.pt", "data_state.json"])
def test_damaged_checkpoint_is_one_line_and_an_older_intact_one_is_used(fx, trained, tmp_path, capsys, name, how):
    run = copy_run(trained, tmp_path)
    damage(run / "model_4" / name, how)
    # named directly: one line, exit 2, nothing written
    before = snapshot(run)
    assert train.main(args(fx, run, continue_from=run / "model_4")) == 2
    line = one_line_error(capsys)
    assert f"{run / 'model_4'}: {name}" in line, line
    assert snapshot(run) == before
    # a save_dir: the newest intact checkpoint, with a warning naming the damaged one
    with pytest.warns(UserWarning, match=rf"model_4: {name} .*resuming from the older {run / 'model_2'}"):
        assert train.main(args(fx, run, continue_from=run)) == 0
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]
    assert checkpoint.verify(run / "model_4")  # re-saved intact


def test_marker_that_is_not_an_object_and_a_checkpoint_without_manifest(fx, trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    (run / "model_4" / checkpoint.MARKER).write_text("[1, 2]")
    assert train.main(args(fx, run, continue_from=run / "model_4")) == 2
    assert "osd_checkpoint.json holds a list, not an object" in one_line_error(capsys)
    # a checkpoint written before checksums: its files are opened instead
    meta = json.loads((run / "model_2" / checkpoint.MARKER).read_text())
    del meta["files"]
    (run / "model_2" / checkpoint.MARKER).write_text(json.dumps(meta))
    assert checkpoint.verify(run / "model_2")["step"] == 2
    damage(run / "model_2" / "optimizer.pt", "truncated")
    with pytest.raises(checkpoint.CheckpointError, match="model_2: unreadable"):
        checkpoint.verify(run / "model_2")
    assert train.main(args(fx, run, continue_from=run)) == 2
    line = one_line_error(capsys)
    assert line.startswith("osd-train: error: no intact checkpoint to resume from") and "model_4" in line


def test_bit_flip_is_caught_by_the_checksum(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    data = bytearray((run / "model_4" / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (run / "model_4" / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="model.safetensors does not match its SHA-256"):
        checkpoint.verify(run / "model_4")


# ---------------------------------------------------------------- 3. another run's directory


def test_fresh_run_into_another_runs_directory_is_refused_unless_overwrite(fx, trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    before = snapshot(run)
    assert train.main(args(fx, run, num_training_steps=2)) == 2
    line = one_line_error(capsys)
    assert f"--save_dir {run} holds another run (metrics.jsonl, run_config.json, model_2, model_4)" in line
    assert "--overwrite" in line and "--continue_from" in line
    assert snapshot(run) == before
    assert train.main(args(fx, run, num_training_steps=2, overwrite=True)) == 0
    assert "--overwrite: removed" in capsys.readouterr().out
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["model_2"]
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2]


# ---------------------------------------------------------------- 4. divergence


def test_non_finite_loss_stops_the_run_keeping_the_last_finite_checkpoint(fx, tmp_path, capsys):
    run = tmp_path / "run"
    code = train.main(args(fx, run, optimizer="sgd", lr=1e30, warmup_steps=0, save_every=1, eval_every=100))
    line = one_line_error(capsys)
    assert code == 3
    assert "training stopped" in line and "the last checkpoint is" in line, line
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]  # valid JSON
    assert records[-1]["loss"] is None
    last = checkpoint.list_checkpoints(run)
    for path in last:  # every checkpoint written holds finite weights
        from safetensors.torch import load_file

        assert all(torch.isfinite(t).all() for t in load_file(path / "model.safetensors").values())
    assert str(last[-1]) in line


def test_non_finite_weights_are_not_saved(fx, tmp_path, capsys):
    def poisoning(model, args):
        class Poison(torch.optim.SGD):
            def step(self, closure=None):
                with torch.no_grad():
                    next(iter(model.parameters())).fill_(float("nan"))

        return Poison(model.parameters(), lr=args.lr)

    run = tmp_path / "run"
    with pytest.raises(train.Diverged, match="non-finite weights after step 1: not saved; no checkpoint was saved"):
        train.run(args(fx, run, save_every=1), build_optimizer=poisoning)
    assert checkpoint.list_checkpoints(run) == []


# ---------------------------------------------------------------- 8, 9: what a kill leaves


def test_leftovers_of_killed_saves_are_cleaned_and_a_moved_aside_checkpoint_restored(fx, trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    junk = run / ".tmp-model_6-4242"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"x" * 1000)
    os_replace = run / ".old-model_4-4242"
    (run / "model_4").rename(os_replace)  # killed between the two renames of a re-save
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a partial last line
    assert train.main(args(fx, run, num_training_steps=5, continue_from=run)) == 0
    out = capsys.readouterr().out
    assert f"removed {junk}" in out and f"restored {run / 'model_4'}" in out
    assert not junk.exists() and not os_replace.exists()
    assert "resume from " + str(run / "model_4") in out
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------- 10-13


def test_refusals_come_before_any_write(fx, trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    before = snapshot(run)
    for overrides in (dict(lr=float("nan")), dict(weight_decay=-0.1), dict(grad_clipping=-1)):
        assert train.main(args(fx, run, continue_from=run, **overrides)) == 2
        one_line_error(capsys)
        assert snapshot(run) == before, overrides


def test_save_dir_that_is_a_file_or_under_a_file(fx, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert train.main(args(fx, afile)) == 2
    assert f"--save_dir {afile}: exists and is not a directory" in one_line_error(capsys)
    assert train.main(args(fx, afile / "sub")) == 2
    assert f"{afile} is a file, not a directory" in one_line_error(capsys)
    assert afile.read_text() == "x"


def test_auto_resume_starts_fresh_then_continues(fx, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(args(fx, run, num_training_steps=2, auto_resume=True)) == 0
    assert "resume from None" in capsys.readouterr().out
    assert train.main(args(fx, run, num_training_steps=4, auto_resume=True)) == 0
    assert f"resume from {run / 'model_2'}" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]
    # killed before its first checkpoint: metrics but no checkpoint; a restart starts over
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    assert train.main(args(fx, fresh, num_training_steps=2, auto_resume=True)) == 0
    assert [r["step"] for r in read_metrics(fresh) if "loss" in r] == [1, 2]


def test_skipped_basis_updates_reach_the_metrics(fx, tmp_path):
    import osd

    def counting(model, args):
        opt = osd.AdamW(osd.param_groups(model, 8), lr=args.lr)
        opt.basis_updates_skipped = lambda: 3  # as if 3 matrices had skipped their P step
        return opt

    run = tmp_path / "run"
    train.run(args(fx, run, num_training_steps=4, log_every=2), build_optimizer=counting)
    lines = [r for r in read_metrics(run) if "loss" in r]
    assert [r.get("basis_updates_skipped") for r in lines] == [None, 3, None, 3]
