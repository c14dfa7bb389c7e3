"""bench/quality.py end to end on the generated fixture data: two methods, two steps."""

from __future__ import annotations

import json

import pytest
from bench_loader import bench_module
from train_fixtures import make_fixture


@pytest.fixture(scope="module")
def quality():
    with bench_module("quality") as module:
        yield module


def test_quality_bench_writes_results_and_reuses_runs(quality, tmp_path, capsys):
    pytest.importorskip("galore_torch")
    fx = make_fixture(tmp_path / "fx")
    out = tmp_path / "out"
    argv = [
        "--preset", "quick",
        "--out", str(out),
        "--train_data", fx["train"],
        "--eval_data", fx["eval"],
        "--tokenizer", fx["tokenizer"],
        "--model_config", fx["model"],
        "--methods", "adamw,galore_ref",
        "--ranks", "8",
        "--seeds", "0",
        "--max_length", "32",
        "--batch_size", "4",
        "--num_training_steps", "2",
        "--eval_every", "1",
        "--eval_tokens", "200",
    ]  # fmt: skip
    assert quality.main(argv) == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["protocol"]["preset"] == "quick" and summary["protocol"]["num_training_steps"] == 2
    rows = {r["method"]: r for r in summary["rows"]}
    assert set(rows) == {"adamw", "galore_ref"}
    assert rows["adamw"]["rank"] is None and rows["galore_ref"]["rank"] == 8
    for r in rows.values():
        for key in ("eval_loss_mean", "eval_loss_spread", "eval_ppl_mean", "state_bytes", "step_time_ratio", "lr"):
            assert r[key] is not None, key
        assert len(r["eval_curve"]) == 2 and r["eval_curve"][-1][0] > r["eval_curve"][0][0]
    assert rows["adamw"]["step_time_ratio"] == 1.0
    # rank-8 subspace state is smaller than full-rank AdamW's, counted with galore's bases
    assert 0 < rows["galore_ref"]["state_bytes"] < rows["adamw"]["state_bytes"]
    assert 0 < rows["galore_ref"]["matrix_state_bytes"] < rows["adamw"]["matrix_state_bytes"]
    assert rows["adamw"]["matrix_state_bytes"] < rows["adamw"]["state_bytes"]  # embeddings and head excluded
    assert len(summary["runs"]) == 2 and summary["winners"]
    assert "| GaLore (galore-torch) | 8 |" in (out / "results.md").read_text()
    # titles and captions name the data actually used, not the default C4 sample
    names = (quality.data_name(fx["train"]), quality.data_name(fx["eval"]))
    assert f"Data: {names[0]} (training), {names[1]} (evaluation)." in (out / "results.md").read_text()
    assert "C4" not in (out / "results.md").read_text()
    assert (out / "eval_loss.png").stat().st_size > 0 and (out / "pareto.png").stat().st_size > 0

    # a second invocation reuses the finished runs instead of training again
    capsys.readouterr()
    assert quality.main(argv) == 0
    assert capsys.readouterr().out.count("reused") == 2
    assert json.loads((out / "results.json").read_text())["rows"] == summary["rows"]


def test_quality_bench_plans_every_method_at_every_rank(quality, capsys):
    assert quality.main(["--preset", "quick", "--dry_run", "--methods", "adamw,osd_adamw,random"]) == 0
    names = capsys.readouterr().out.split()
    assert names[:5] == [
        "adamw-lr0.001-s0",
        "osd_adamw-r32-lr0.01-s0",
        "osd_adamw-r64-lr0.01-s0",
        "random-r32-lr0.01-s0",
        "random-r64-lr0.01-s0",
    ]
    assert sum(n.endswith("-s1") for n in names) == 5


def test_a_run_the_trainer_stopped_for_divergence_counts_as_nan(quality, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [
        {"step": 1, "loss": 9.0, "lr": 0.1, "tokens": 100, "tokens_per_s": 50.0},
        {"step": 1, "eval_loss": 8.0, "eval_ppl": 2981.0, "eval_tokens": 100},
        {"step": 2, "loss": None, "lr": 0.1},  # the trainer's last line before it stopped
    ]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = quality.summarize_metrics(metrics, diverged=True)
    assert summary["final_eval_loss"] != summary["final_eval_loss"]  # nan: never the best lr
    assert summary["tokens"] == 100 and len(summary["train_loss"]) == 1
    metrics.write_text(json.dumps(lines[2]) + "\n")  # stopped at step 1
    summary = quality.summarize_metrics(metrics, diverged=True)
    assert summary["tokens"] == 0 and summary["step_time_s"] != summary["step_time_s"]


def test_data_names_strip_the_extensions(quality):
    assert quality.data_name("../shared/data/blogs/blogs-validation.jsonl.gz") == "blogs-validation"
    assert quality.data_name("c4-sample-train.json.gz") == "c4-sample-train"
    assert quality.data_names({"protocol": {}}) == ("c4-sample-train", "c4-sample-validation")


def _selection_argv(fx, out) -> list[str]:
    return [
        "--preset", "cpu",
        "--out", str(out),
        "--train_data", fx["train"],
        "--eval_data", fx["eval"],
        "--tokenizer", fx["tokenizer"],
        "--model_config", fx["model"],
        "--methods", "adamw,osd_adamw",
        "--ranks", "8",
        "--seeds", "0,1",
        "--max_length", "32",
        "--batch_size", "4",
        "--num_training_steps", "3",
        "--eval_every", "3",
        "--eval_tokens", "200",
        "--select_steps", "2",
    ]  # fmt: skip


def test_lr_selection_stage_then_every_seed_at_the_chosen_lr(quality, tmp_path, capsys):
    """cpu/gpu protocol: short runs over each method's grid (seed 0, first rank), then every
    seed at the lr with the lowest selection loss; sharded in two stages, the same results."""
    fx = make_fixture(tmp_path / "fx")
    out = tmp_path / "out"
    assert quality.main([*_selection_argv(fx, out), "--jobs", "1"]) == 0
    summary = json.loads((out / "results.json").read_text())
    selection, runs = summary["selection_runs"], summary["runs"]
    assert len(selection) == 6 and all(r["spec"]["num_training_steps"] == 2 for r in selection)
    assert all(r["spec"]["seed"] == 0 and r["spec"]["stage"] == "select" for r in selection)
    assert len(runs) == 4 and all(r["spec"]["num_training_steps"] == 3 and "stage" not in r["spec"] for r in runs)
    for row in summary["rows"]:
        mine = [r for r in selection if r["spec"]["method"] == row["method"]]
        best = min(mine, key=lambda r: r["final_eval_loss"])
        assert row["lr"] == best["spec"]["lr"] and row["seeds"] == [0, 1]
        assert {r["spec"]["lr"] for r in runs if r["spec"]["method"] == row["method"]} == {row["lr"]}
        assert set(row["lr_selection"]) == {f"{x:g}" for x in quality.BY_KEY[row["method"]].lr_grid()}
    text = (out / "results.md").read_text()
    assert "by a 2-step selection run (seed 0, rank 8)" in text
    assert "lr selection (final eval loss after 2 steps, seed 0):" in text

    # the same in shards, stage by stage (what --jobs N runs in N processes); then the report reuses all
    sharded = tmp_path / "sharded"
    for stage in ("select", "full"):
        for k in range(2):
            argv = [*_selection_argv(fx, sharded), "--jobs", "1", "--stage", stage, "--shard", f"{k}/2"]
            assert quality.main(argv) == 0
    capsys.readouterr()
    assert quality.main([*_selection_argv(fx, sharded), "--jobs", "1"]) == 0
    assert capsys.readouterr().out.count("reused") == 10
    again = json.loads((sharded / "results.json").read_text())
    assert [(r["method"], r["lr"], r["eval_loss"]) for r in again["rows"]] == [
        (r["method"], r["lr"], r["eval_loss"]) for r in summary["rows"]
    ]


def test_gpu_and_cpu_presets_plan_selection_then_full_runs(quality, capsys):
    assert quality.main(["--preset", "gpu", "--dry_run"]) == 0
    names = capsys.readouterr().out.split("\n")
    assert names[0] == "select-adamw-lr0.0003-s0" and "select-galore-r128-lr0.01-s0" in names
    assert "osd_adamw-r128-lr?-s1" in names and names[-2] == "75 runs"  # 15 methods x 3 lrs + 15 x 2 seeds
    assert quality.main(["--preset", "cpu", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "osd_lion" not in out and "select-osd_sgd_fira-r32-lr0.01-s0" in out and "70 runs" in out
    args = quality.parse_args(["--preset", "gpu"])
    assert args.jobs == 4 and args.cfg["dtype"] == "bfloat16" and "blogs-train" in args.cfg["train_data"]
    spec = quality.run_spec(quality.BY_KEY["galore"], 128, 0, 0.01, args.cfg, select=True)
    assert spec["dtype"] == "bfloat16" and spec["num_training_steps"] == 160 and spec["eval_every"] == 160
    assert "dtype" not in quality.run_spec(quality.BY_KEY["adamw"], None, 0, 1e-3, quality.parse_args([]).cfg)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "cpu", "--select_steps", "-1"], "--select_steps must be >= 0"),
        (["--preset", "quick", "--select_steps", "5"], "the quick preset has no lr grid to select from"),
        (["--train_data", "x.jsonl"], "--train_data needs --eval_data"),
    ],
)
def test_bad_arguments(quality, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        quality.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
