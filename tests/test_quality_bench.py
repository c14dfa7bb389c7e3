"""bench/quality.py end to end on the generated fixture data: two methods, two steps."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from train_fixtures import make_fixture

BENCH = Path(__file__).resolve().parents[1] / "bench" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("bench_quality", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


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
