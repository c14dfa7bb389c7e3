"""osd-glue: every task type on tiny generated data, the metrics, the subspace-group choice on
BERT/RoBERTa, bad input (one line, exit 2, nothing written), and a smoke run on real SST-2."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from glue_fixtures import write_glue, write_model

from osd import glue

SHARED = Path(os.environ.get("OSD_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue")
    return {"data": write_glue(root, n_train=16, n_dev=12), "model": write_model(root)}


def argv(fx, out, task="sst2", **flags):
    base = {
        "task_name": task,
        "data_dir": fx["data"],
        "model_name_or_path": fx["model"],
        "output_dir": out,
        "optimizer": "galore_adamw",
        "rank": 2,
        "num_train_epochs": 1,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-3,
        "max_length": 32,
    }
    base.update(flags)
    out = []
    for k, v in base.items():
        if v is True:
            out.append(f"--{k}")
        elif v is not None:
            out += [f"--{k}", str(v)]
    return out


EXPECTED_KEYS = {
    "cola": {"eval_matthews_correlation"},
    "sst2": {"eval_accuracy"},
    "mrpc": {"eval_accuracy", "eval_f1", "eval_combined_score"},
    "rte": {"eval_accuracy"},
    "stsb": {"eval_pearson", "eval_spearmanr", "eval_combined_score"},
}


@pytest.mark.parametrize("task", list(EXPECTED_KEYS))
def test_task_runs_and_saves(fx, tmp_path, task, capsys):
    out = tmp_path / "run"
    assert glue.main(argv(fx, out, task)) == 0
    results = json.loads((out / "eval_results.json").read_text())
    assert EXPECTED_KEYS[task] <= results.keys()
    assert results["train_examples"] == 16 and results["eval_examples"] == 12 and results["train_steps"] == 2
    assert results["optimizer_state_bytes"] > 0 and len(results["optimizer_state_bytes_per_group"]) == 2
    for name in ("config.json", "model.safetensors", "tokenizer.json", "run_config.json", "train_log.jsonl"):
        assert (out / name).is_file(), name
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out)
    assert config.num_labels == (1 if task == "stsb" else 2)
    if task == "stsb":
        assert config.problem_type == "regression"


def test_data_reading(fx):
    """CoLA without header, MRPC's BOM and bare quotes, RTE's string labels, STS-B floats."""
    cola, _ = glue.load_local(str(fx["data"]), glue.TASKS["cola"])
    assert len(cola["train"]["label"]) == 16 and cola["train"]["text_b"] is None
    assert set(cola["train"]["label"]) <= {0, 1}
    mrpc, _ = glue.load_local(str(fx["data"]), glue.TASKS["mrpc"])
    assert all(b.startswith('" ') for b in mrpc["train"]["text_b"])  # the quote is kept, not parsed
    rte, _ = glue.load_local(str(fx["data"] / "RTE"), glue.TASKS["rte"])  # the task folder itself
    assert set(rte["validation"]["label"]) <= {0, 1} and rte["train"]["text_a"][0].startswith('"')
    stsb, _ = glue.load_local(str(fx["data"]), glue.TASKS["stsb"])
    assert all(isinstance(x, float) for x in stsb["train"]["label"])
    # the label follows "good" in sentence 1 in every generated task
    for split in (cola["train"], mrpc["train"], rte["train"]):
        good = [int("good" in a.split()) for a in split["text_a"]]
        assert good == split["label"] or good == [1 - x for x in split["label"]]


def test_malformed_rows_skipped(tmp_path):
    d = tmp_path / "QQP"
    d.mkdir()
    header = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
    (d / "train.tsv").write_text(header + "1\t1\t2\ta?\tb?\t1\n2\t3\t4\tbroken row\n3\t5\t6\tc?\td?\t0\n")
    (d / "dev.tsv").write_text(header + "1\t1\t2\ta?\tb?\t1\n")
    splits, notes = glue.load_local(str(tmp_path), glue.TASKS["qqp"])
    assert splits["train"]["label"] == [1, 0] and len(notes) == 1 and "skipped 1" in notes[0]


def test_metrics_hand_computed():
    # accuracy 4/6; positives: tp 2, fp 1, fn 1 -> F1 = 2*2/(2*2+1+1) = 2/3
    pred, gold = [1, 1, 0, 0, 1, 0], [1, 1, 0, 1, 0, 0]
    m = glue.compute_metrics("mrpc", pred, gold)
    assert m["accuracy"] == pytest.approx(4 / 6) and m["f1"] == pytest.approx(2 / 3)
    assert m["combined_score"] == pytest.approx((4 / 6 + 2 / 3) / 2)
    # MCC = (tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (4 - 1) / sqrt(3*3*3*3) = 1/3
    assert glue.compute_metrics("cola", pred, gold)["matthews_correlation"] == pytest.approx(1 / 3)
    assert glue.compute_metrics("sst2", pred, gold) == {"accuracy": pytest.approx(4 / 6)}
    # Pearson of x and 2x+1 is 1; of (1,2,3) and (1,3,2): cov 0.5 / (1*1) = 0.5; Spearman by ranks
    s = glue.compute_metrics("stsb", [1.0, 2.0, 3.0], [3.0, 5.0, 7.0])
    assert s["pearson"] == pytest.approx(1.0) and s["spearmanr"] == pytest.approx(1.0)
    s = glue.compute_metrics("stsb", [1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert s["pearson"] == pytest.approx(0.5) and s["spearmanr"] == pytest.approx(0.5)
    s = glue.compute_metrics("stsb", [1.0, 2.0, 3.0, 4.0], [1.0, 4.0, 9.0, 100.0])  # monotone, not linear
    assert s["spearmanr"] == pytest.approx(1.0) and s["pearson"] < 0.9


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_subspace_group_is_encoder_matrices(model_type):
    import transformers

    import osd

    kw = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, vocab_size=50)
    if model_type == "bert":
        model = transformers.BertForSequenceClassification(transformers.BertConfig(**kw))
    else:
        model = transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**kw))
    plain, sub = osd.param_groups(model, 2, glue.ENCODER_TARGETS)
    expected = {
        f"{model_type}.encoder.layer.{i}.{m}.weight"
        for i in range(2)
        for m in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        )
    }
    assert set(sub["param_names"]) == expected
    assert any("pooler" in n for n in plain["param_names"]) == (model_type == "bert")
    assert any(n.startswith("classifier") for n in plain["param_names"])
    assert not any(n.endswith("bias") or "LayerNorm" in n or "embeddings" in n for n in sub["param_names"])


def test_overwrite_and_plain_optimizer(fx, tmp_path):
    out = tmp_path / "run"
    assert glue.main(argv(fx, out, optimizer="adamw", save_model=None) + ["--no-save_model"]) == 0
    assert not (out / "model.safetensors").exists()
    first = json.loads((out / "eval_results.json").read_text())
    assert "optimizer_state_bytes_per_group" not in first
    assert glue.main(argv(fx, out, optimizer="adamw_per_layer", overwrite=True, max_grad_norm=0.5)) == 0
    assert (out / "model.safetensors").exists()


def test_device_and_bf16(fx, tmp_path):
    """--device cpu is the default here, bitwise; --bf16 autocast trains to a finite, different loss."""
    results = {}
    for name, flags in {"auto": {}, "cpu": {"device": "cpu"}, "bf16": {"bf16": True}}.items():
        assert glue.main(argv(fx, tmp_path / name, save_model=None, **flags) + ["--no-save_model"]) == 0
        results[name] = json.loads((tmp_path / name / "eval_results.json").read_text())
        config = json.loads((tmp_path / name / "run_config.json").read_text())
        assert config["device"] == "cpu" and config["bf16"] == (name == "bf16")
    assert results["auto"] == {**results["cpu"], "train_seconds": results["auto"]["train_seconds"]}
    assert (
        math.isfinite(results["bf16"]["train_loss"]) and results["bf16"]["train_loss"] != results["cpu"]["train_loss"]
    )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(fx, tmp_path):
    """The same seeded run on CUDA and on the CPU (fp32): the same steps, losses within 1e-3."""
    results = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        assert glue.main(argv(fx, out, device=device, save_model=None) + ["--no-save_model"]) == 0
        results[device] = json.loads((out / "eval_results.json").read_text())
    assert results["cuda"]["train_steps"] == results["cpu"]["train_steps"]
    assert results["cuda"]["train_loss"] == pytest.approx(results["cpu"]["train_loss"], rel=1e-3)


def bad(fx, tmp_path, capsys, *extra, **flags):
    out = tmp_path / "out"
    code = glue.main(argv(fx, out, **flags) + list(extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("osd-glue: error: "), err
    assert not out.exists()
    return err[0]


@pytest.mark.parametrize(
    "flags,message",
    [
        ({"task_name": "wnli2"}, "unknown --task_name 'wnli2'; valid: cola, sst2"),
        ({"optimizer": "galore_adamx"}, "unknown --optimizer 'galore_adamx'; valid:"),
        ({"proj_type": "sideways"}, "unknown --proj_type 'sideways'; valid: std"),
        ({"learning_rate": -1}, r"--learning_rate must be in (0, inf), got -1"),
        ({"learning_rate": "nan"}, "--learning_rate must be a finite number, got nan"),
        ({"rank": 0}, "--rank must be positive, got 0"),
        ({"num_train_epochs": 0}, "--num_train_epochs must be positive, got 0"),
        ({"max_train_samples": -5}, "--max_train_samples must be positive, got -5"),
        ({"warmup_ratio": 2}, r"--warmup_ratio must be in [0, 1], got 2.0"),
        ({"per_device_train_batch_size": "x"}, "argument --per_device_train_batch_size: invalid int value: 'x'"),
        ({"beta1": 0.9}, "--beta1 0.9 is only used by adafactor"),
        ({"max_length": 500}, "--max_length 500 exceeds the model's 160 positions"),
        ({"target_modules": "decoder"}, "--target_modules decoder: no nn.Linear module name contains"),
        ({"task_name": "qnli"}, "no QNLI/train.tsv (nor train.tsv) for this task"),
        ({"device": "gpu0"}, "unknown --device 'gpu0'; valid: auto, cpu, cuda, cuda:N"),
        ({"device": "meta"}, "--device meta: only cpu and cuda are supported"),
        ({"device": "cuda:64"}, "--device cuda:64: torch sees"),
    ],
)
def test_bad_input(fx, tmp_path, capsys, flags, message):
    assert message in bad(fx, tmp_path, capsys, **flags)


def test_bad_paths(fx, tmp_path, capsys):
    assert "no such directory" in bad(fx, tmp_path, capsys, data_dir=tmp_path / "nowhere")
    incomplete = tmp_path / "glue_data"
    (incomplete / "SST-2").mkdir(parents=True)
    (incomplete / "SST-2" / "train.tsv").write_text("sentence\tlabel\nok\t1\n")
    assert "SST-2/dev.tsv: no such file" in bad(fx, tmp_path, capsys, data_dir=incomplete)
    (incomplete / "SST-2" / "dev.tsv").write_text("text\tlabel\nok\t1\n")
    assert "no column 'sentence' in its header" in bad(fx, tmp_path, capsys, data_dir=incomplete)
    (incomplete / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nok\tmaybe\n")
    assert "unknown label(s) ['maybe']" in bad(fx, tmp_path, capsys, data_dir=incomplete)
    assert "not a local directory" in bad(fx, tmp_path, capsys, model_name_or_path=tmp_path / "no-model")
    (tmp_path / "afile").write_text("x")
    message = bad(fx, tmp_path, capsys, output_dir=tmp_path / "afile")
    assert "exists and is not a directory" in message


def test_output_dir_holding_a_run(fx, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval_results.json").write_text("{}")
    assert glue.main(argv(fx, out)) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"osd-glue: error: --output_dir {out} holds another run (eval_results.json): choose another --output_dir or pass --overwrite to replace it"
    )
    assert (out / "eval_results.json").read_text() == "{}"


def test_offline_defaults(fx, tmp_path, capsys, monkeypatch):
    """The Hub defaults (roberta-base, the Hub's glue) fail offline with one line naming what to pass."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    message = bad(fx, tmp_path, capsys, model_name_or_path=None)
    assert "--model_name_or_path roberta-base: not a local directory and the Hub is offline here" in message
    assert "pass a local model directory, e.g. --model_name_or_path" in message
    message = bad(fx, tmp_path, capsys, data_dir=None)
    assert "the Hub's nyu-mll/glue dataset (sst2) could not be loaded: offline here" in message
    assert "pass --data_dir DIR" in message


def test_cli_module_entry(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "-m", "osd.glue", "--task_name", "mnli2", "--output_dir", str(tmp_path / "o")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("osd-glue: error: unknown --task_name 'mnli2'")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "glue" / "SST-2").is_dir(), reason="needs ../shared/data (real SST-2, MiniLM)")
def test_smoke_sst2_osd_rank8(tmp_path):
    """The issue's target: 1 epoch on 2,000 SST-2 examples with OSD rank 8, >= 75% dev accuracy."""
    out = tmp_path / "sst2"
    flags = ["--task_name", "sst2", "--max_train_samples", "2000", "--num_train_epochs", "1"]
    flags += ["--optimizer", "galore_adamw", "--proj_type", "continuous", "--rank", "8", "--no-save_model"]
    flags += ["--model_name_or_path", str(SHARED / "models" / "all-MiniLM-L6-v2"), "--data_dir", str(SHARED / "glue")]
    start = time.perf_counter()
    assert glue.main([*flags, "--output_dir", str(out)]) == 0
    results = json.loads((out / "eval_results.json").read_text())
    print(f"smoke: accuracy {results['eval_accuracy']:.4f} in {time.perf_counter() - start:.0f}s")
    assert results["eval_accuracy"] >= 0.75 and results["train_steps"] == 63
