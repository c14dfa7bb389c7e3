"""bench/glue.py: the lr-selection protocol (with a stand-in for the runs), its argument
errors, and one real run of each kind (full, LoRA, GaLore, OSD) on the tiny fixtures."""

from __future__ import annotations

import json

import pytest
from bench_loader import bench_module
from glue_fixtures import write_glue, write_model


@pytest.fixture(scope="module")
def bench():
    with bench_module("glue") as module:
        yield module


@pytest.fixture
def data(bench, tmp_path, monkeypatch):
    """A DATA folder with glue/ (the bench checks it exists) and a model folder."""
    (tmp_path / "glue").mkdir()
    (tmp_path / "model").mkdir()
    monkeypatch.setattr(bench, "DATA", tmp_path)
    return tmp_path


def fake_run(bench, calls):
    """A stand-in for one_run: the score prefers the grid's second lr on SST-2 and the first
    elsewhere, and moves with the seed, so the protocol's choices are visible."""

    def run(task, method, lr, seed, cfg, out_dir, model):
        calls.append((task, method, lr, seed))
        second = lr == bench.METHODS[method][1][1]
        score = (60.0 if second == (task == "sst2") else 50.0) + seed
        return {"score": score, "train_steps": 1, "optimizer_state_bytes": 8 << 20, "matrix_state_bytes": 1 << 20}

    return run


def test_lr_chosen_on_one_task_then_used_everywhere(bench, data, capsys):
    calls = []
    argv = ["--out", str(data / "out"), "--model", str(data / "model"), "--tasks", "cola,sst2,mrpc"]
    assert bench.main([*argv, "--methods", "full,osd-r8"], run=fake_run(bench, calls)) == 0
    grid = {m: bench.METHODS[m][1] for m in ("full", "osd-r8")}
    # seed 0: SST-2 first with the whole grid, then the other tasks at SST-2's best lr
    expected = [("sst2", m, lr, 0) for m in grid for lr in grid[m]]
    for seed in (0, 1):
        tasks = ["cola", "mrpc"] if seed == 0 else ["sst2", "cola", "mrpc"]
        expected += [(t, m, grid[m][1], seed) for t in tasks for m in grid]
    assert calls == expected
    results = json.loads((data / "out" / "results.json").read_text())
    assert results["chosen_lr"] == {f"{m}/{t}": grid[m][1] for m in grid for t in ("cola", "sst2", "mrpc")}
    table = (data / "out" / "table.md").read_text().splitlines()
    assert table[0] == "| method | CoLA | MRPC | SST-2 | avg | lr | state MB | matrix state MB |"
    # columns in TASKS order; mean over seeds 0 and 1 at the chosen lr: SST-2 60.5 ± 0.5, the others 50.5
    assert table[2] == f"| full | 50.5 ±0.5 | 50.5 ±0.5 | 60.5 ±0.5 | 53.8 | {grid['full'][1]:g} | 8.0 | 1.00 |"
    assert "lr grid on seed 0 of sst2, the chosen lr on the rest" in capsys.readouterr().out


def test_each_task_picks_its_own_lr(bench, data):
    calls = []
    argv = ["--out", str(data / "out"), "--model", str(data / "model"), "--tasks", "cola,sst2"]
    assert (
        bench.main([*argv, "--methods", "galore-r4", "--lr_task", "each", "--seeds", "3"], run=fake_run(bench, calls))
        == 0
    )
    lrs = bench.METHODS["galore-r4"][1]
    assert calls == [("cola", "galore-r4", lr, 3) for lr in lrs] + [("sst2", "galore-r4", lr, 3) for lr in lrs]
    chosen = json.loads((data / "out" / "results.json").read_text())["chosen_lr"]
    assert chosen == {"galore-r4/cola": lrs[0], "galore-r4/sst2": lrs[1]}


def test_time_limit_stops_starting_runs(bench, data, capsys):
    calls = []
    argv = ["--out", str(data / "out"), "--model", str(data / "model"), "--tasks", "sst2", "--time_limit", "0"]
    assert bench.main(argv, run=fake_run(bench, calls)) == 0
    assert calls == [] and "--time_limit 0 s reached: no more runs" in capsys.readouterr().out
    assert json.loads((data / "out" / "results.json").read_text())["runs"] == []
    assert "| osd-r8 | - | - | - |" in (data / "out" / "table.md").read_text()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tasks", "cola,qnli2"], "unknown task(s) qnli2"),
        (["--methods", "full,osd-r16"], "unknown method(s) osd-r16"),
        (["--tasks", "cola", "--lr_task", "sst2"], "--lr_task sst2 is not among --tasks cola"),
    ],
)
def test_bad_arguments(bench, data, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        bench.main(["--out", str(data / "out"), "--model", str(data / "model"), *flags], run=fake_run(bench, []))
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (data / "out").exists()


def test_missing_data_is_one_line(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "DATA", tmp_path)
    assert bench.main(["--out", str(tmp_path / "out")], run=fake_run(bench, [])) == 2
    assert "needs" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_real_runs_on_fixtures(bench, tmp_path, monkeypatch):
    """Every kind of method through osd.glue.run on the tiny model: scores, state bytes."""
    pytest.importorskip("peft")
    glue_root = write_glue(tmp_path).parent
    (glue_root / "glue").symlink_to(glue_root / "glue_data")
    monkeypatch.setattr(bench, "DATA", glue_root)
    model = write_model(tmp_path / "m")
    out = tmp_path / "out"
    flags = ["--out", str(out), "--model", str(model), "--tasks", "sst2,stsb", "--seeds", "0", "--one_lr"]
    assert bench.main([*flags, "--methods", "full,lora-r4,galore-r4,osd-r8", "--epochs", "1"]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert len(runs) == 8 and all(r["train_steps"] == 3 for r in runs)  # 48 examples, batch 16
    by = {(r["method"], r["task"]): r for r in runs}
    full = by[("full", "sst2")]["matrix_state_bytes"]
    assert full == 8 * by[("full", "sst2")]["target_matrix_parameters"]
    assert 0 < by[("lora-r4", "sst2")]["matrix_state_bytes"] < full
    assert 0 < by[("galore-r4", "sst2")]["matrix_state_bytes"] < full  # rank 8 of the tiny model is not smaller
    assert by[("osd-r8", "sst2")]["matrix_state_bytes"] > by[("galore-r4", "sst2")]["matrix_state_bytes"]
