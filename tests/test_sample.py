"""The embedded quickstart sample (osd/assets): present, the documented size, chosen by
`make train` when ../shared/data is missing, and enough for a real run offline; and the
one-line errors that point at it when the Hub defaults cannot be used."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from train_fixtures import TINY_MODEL, base_args, read_metrics

from osd import train
from osd.data import ASSETS, sample_paths

ROOT = Path(__file__).resolve().parents[1]


def test_sample_files_are_there_with_their_licence_note():
    paths = sample_paths()
    counts = {}
    for key in ("dataset", "eval_dataset"):
        with gzip.open(paths[key], "rt", encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        assert all(set(r) == {"text", "timestamp", "url"} and r["text"] for r in records)
        counts[key] = len(records)
    assert counts == {"dataset": 160, "eval_dataset": 40}
    assert {p.name for p in Path(paths["tokenizer"]).iterdir()} >= {"tokenizer.json", "tokenizer_config.json"}
    note = (ASSETS / "README.md").read_text()
    for words in ("ODC-BY", "allenai/c4", "Common Crawl", "Apache License 2.0", "t5-base"):
        assert words in note


def test_package_data_lists_the_sample():
    """pyproject ships the files (a wheel build is too slow for the suite; see the report)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["osd"]
    shipped = {p for pattern in patterns for p in (ROOT / "src" / "osd").glob(pattern)}
    wanted = {ASSETS / "README.md", *(Path(p) for k, p in sample_paths().items() if k != "tokenizer")}
    wanted |= set(Path(sample_paths()["tokenizer"]).glob("*.json"))
    assert wanted <= shipped


def make_n_train(data) -> tuple[str, dict]:
    """`make -n train DATA=...` (prints, runs nothing): the one data line and the flags."""
    proc = subprocess.run(
        ["make", "-n", "-o", ".venv/.installed", "train", f"DATA={data}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    [note] = [line for line in proc.stdout.splitlines() if "data: " in line]
    [command] = [line for line in proc.stdout.splitlines() if "-m osd.train" in line]
    words = command.split()
    flags = {w[2:]: words[i + 1] for i, w in enumerate(words) if w.startswith("--")}
    return note, flags


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_train_falls_back_to_the_embedded_sample(tmp_path):
    note, flags = make_n_train(tmp_path / "nonexistent")
    assert "embedded quickstart sample" in note and "held-out" in note
    for key, path in sample_paths().items():
        assert (ROOT / flags[key]).resolve() == Path(path)
    assert flags["config"] == "configs/quickstart.toml"

    shared = tmp_path / "shared"  # a data folder with the three files: used as it is
    for name in ("c4-sample/c4-sample-train.json.gz", "c4-sample/c4-sample-validation.json.gz"):
        (shared / name).parent.mkdir(parents=True, exist_ok=True)
        (shared / name).write_text("")
    (shared / "tokenizers/t5-base").mkdir(parents=True)
    (shared / "tokenizers/t5-base/tokenizer.json").write_text("")
    note, flags = make_n_train(shared)
    assert note.count("data: ") == 1 and f"{shared}/c4-sample (shared" in note
    assert flags["dataset"] == f"{shared}/c4-sample/c4-sample-train.json.gz"
    assert flags["eval_dataset"] == f"{shared}/c4-sample/c4-sample-validation.json.gz"
    assert flags["tokenizer"] == f"{shared}/tokenizers/t5-base"


def test_a_tiny_run_on_the_embedded_sample(tmp_path):
    """Offline, from the package's own files: a vocab-32000 LLaMA, a few steps, evaluation
    on the held-out file."""
    model = tmp_path / "tiny32k.json"
    model.write_text(json.dumps({k: v for k, v in TINY_MODEL.items() if k != "vocab_size"}))
    fx = {"model": str(model), "train": None, "eval": None, "tokenizer": None}
    flags = dict(sample_paths(), optimizer="adamw", num_training_steps=3, eval_every=3, save_every=3)
    flags.update(max_length=64, eval_tokens=500)  # evaluation: the held-out file
    run = tmp_path / "run"
    assert train.main(base_args(fx, run, **flags)) == 0
    records = read_metrics(run)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    [evaluation] = [r for r in records if "eval_loss" in r]
    assert evaluation["eval_tokens"] >= 500 and evaluation["eval_loss"] < 11


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("osd-train: error: "), err
    return lines[0]


def test_hub_defaults_offline_say_what_to_pass(tmp_path, monkeypatch, capsys):
    """Without --tokenizer / --dataset the Hub defaults are used; offline, each stops the run
    with one line that names the embedded files to pass instead (and nothing is written)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    paths = sample_paths()
    model = tmp_path / "tiny32k.json"
    model.write_text(json.dumps({k: v for k, v in TINY_MODEL.items() if k != "vocab_size"}))
    fx = {"model": str(model), "train": None, "eval": None, "tokenizer": None}
    run = tmp_path / "run"

    assert train.main(base_args(fx, run, dataset=paths["dataset"], eval_dataset=paths["eval_dataset"])) == 2
    line = error_line(capsys)
    assert "--tokenizer t5-base needs the Hugging Face Hub, which is offline here (HF_HUB_OFFLINE=1)" in line
    assert f"--tokenizer {paths['tokenizer']}" in line

    assert train.main(base_args(fx, run, tokenizer=paths["tokenizer"])) == 2
    line = error_line(capsys)
    assert "--dataset allenai/c4 needs the Hugging Face Hub, which is offline here (HF_HUB_OFFLINE=1)" in line
    for key, path in paths.items():
        assert f"--{key} {path}" in line

    local = dict(dataset=paths["dataset"], eval_dataset=paths["eval_dataset"])
    assert train.main(base_args(fx, run, tokenizer=str(tmp_path / "no" / "t5-base"), **local)) == 2
    line = error_line(capsys)
    assert "no such directory" in line and f"--tokenizer {paths['tokenizer']}" in line
    assert not run.exists()


def test_hub_failures_are_told_apart(monkeypatch):
    from osd.data import _hub_unavailable

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    try:
        try:
            raise OSError("[Errno -3] Temporary failure in name resolution")
        except OSError as cause:
            raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (ConnectionError)") from cause
    except ConnectionError as e:
        assert (
            _hub_unavailable(e)
            == "not reachable from here (ConnectionError: Couldn't reach 'allenai/c4' on the Hub (ConnectionError))"
        )
    assert _hub_unavailable(FileNotFoundError("Dataset 'someone/nothing' doesn't exist on the Hub")) is None
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "true")
    assert _hub_unavailable(ValueError("anything")) == "offline here (HF_DATASETS_OFFLINE=true)"
