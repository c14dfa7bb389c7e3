"""Trainer end to end on tiny models: loss falls, accumulation is token-normalised,
resume is exact, checkpoints are Hugging Face models; plus the real C4 sample if present."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from train_fixtures import SHARED_DATA, TINY_MODEL, base_args, make_fixture, read_metrics, without_timing

from osd import checkpoint, train


@pytest.fixture(scope="session")
def fx(tmp_path_factory):
    return make_fixture(tmp_path_factory.mktemp("train_fixture"))


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def test_loss_falls_and_run_dir_has_everything(fx, tmp_path):
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    run = tmp_path / "run"
    assert train.main(base_args(fx, run, num_training_steps=24, eval_every=12, save_every=12, warmup_steps=3)) == 0
    records = read_metrics(run)
    train_lines = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_lines] == list(range(1, 25))
    assert {"step", "loss", "lr", "tokens", "tokens_per_s"} <= set(train_lines[0])
    first, last = train_lines[0]["loss"], sum(r["loss"] for r in train_lines[-4:]) / 4
    assert last < first - 1.0, (first, last)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [12, 24] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[1]["eval_ppl"] == pytest.approx(torch.tensor(evals[1]["eval_loss"]).exp().item(), rel=1e-6)
    assert evals[0]["eval_tokens"] >= 400

    config = json.loads((run / "run_config.json").read_text())
    assert config["gradient_accumulation"] == 1 and config["world_size"] == 1 and "torch" in config["versions"]
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["model_12", "model_24"]
    ckpt = run / "model_24"
    # a Hugging Face model directory, and every .pt loads with weights_only
    model = LlamaForCausalLM.from_pretrained(ckpt)
    saved = load_file(ckpt / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert len(state["param_groups"]) == 2 and state["param_groups"][1]["projector"] == "online_pca"
    assert torch.load(ckpt / "trainer_state.pt", weights_only=True)["step"] == 24
    assert not list(run.glob(".tmp-*"))


def test_accumulation_normalises_by_tokens_across_micro_batches(fx, tmp_path):
    """4 sequences in one micro-batch or in 2 x 2: the same steps (documents vary in length,
    so a mean of per-micro-batch means would differ)."""
    one = tmp_path / "one"
    two = tmp_path / "two"
    common = dict(num_training_steps=4, eval_every=100, save_every=100, optimizer="adamw")
    assert train.main(base_args(fx, one, batch_size=4, **common)) == 0
    assert train.main(base_args(fx, two, batch_size=2, total_batch_size=4, **common)) == 0
    assert losses(one) == pytest.approx(losses(two), rel=1e-5)
    a, b = (load_weights(run / "model_4") for run in (one, two))
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def load_weights(ckpt):
    from safetensors.torch import load_file

    return load_file(Path(ckpt) / "model.safetensors")


@pytest.mark.parametrize(
    "flags",
    [
        dict(batch_size=2, total_batch_size=4),  # accumulation, truncate-and-pad
        dict(packing=True),
        dict(
            optimizer="galore_adamw8bit_per_layer", proj_type="std", batch_size=2, total_batch_size=4, grad_clipping=1.0
        ),
    ],
    ids=["accumulation", "packing", "per_layer"],
)
def test_resume_gives_the_same_run(fx, tmp_path, flags):
    """Train to 8 saving at 4; resume from step 4 into the same directory and train to 8
    again: metrics.jsonl and the final weights are what the uninterrupted run wrote."""
    run = tmp_path / "run"
    argv = base_args(fx, run, keep_checkpoints=0, **flags)
    assert train.main(argv) == 0
    uninterrupted = read_metrics(run)
    final = load_weights(run / "model_8")
    shutil.rmtree(run / "model_8")  # as if the run had died after step 4
    assert train.main(argv + ["--continue_from", str(run / "model_4")]) == 0
    resumed = read_metrics(run)
    assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted]
    for a, b in zip(without_timing(resumed), without_timing(uninterrupted), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key)
    again = load_weights(run / "model_8")
    assert all(torch.allclose(again[k], final[k], rtol=1e-6, atol=1e-8) for k in final)


def test_continue_from_a_save_dir_takes_its_newest_checkpoint(fx, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(base_args(fx, run, num_training_steps=4, save_every=2, eval_every=100)) == 0
    capsys.readouterr()
    assert train.main(base_args(fx, run, num_training_steps=6, save_every=2, eval_every=100, continue_from=run)) == 0
    assert f"resume from {run / 'model_4'}" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 4, 5, 6, 6]


def test_plot_draws_runs(fx, tmp_path):
    run = tmp_path / "run"
    assert train.main(base_args(fx, run, num_training_steps=2, eval_every=1, optimizer="adamw")) == 0
    out = tmp_path / "curves.png"
    assert train.main(["plot", str(run), str(run / "metrics.jsonl"), "-o", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- the real C4 sample

C4 = SHARED_DATA / "c4-sample"
T5 = SHARED_DATA / "tokenizers" / "t5-base"
needs_c4 = pytest.mark.skipif(not (C4.is_dir() and T5.is_dir()), reason="../shared/data not present")


@needs_c4
def test_c4_sample_with_t5_tokenizer(tmp_path):
    """A few steps of a tiny LLaMA (vocab 32000) on real C4 with t5-base: loss falls from
    about ln(32000)."""
    model = tmp_path / "tiny32k.json"
    model.write_text(
        json.dumps(
            dict(
                hidden_size=32,
                intermediate_size=64,
                num_attention_heads=2,
                num_hidden_layers=2,
                max_position_embeddings=64,
            )
        )
    )
    fx = {
        "model": str(model),
        "train": str(C4 / "c4-sample-train.json.gz"),
        "eval": str(C4 / "c4-sample-validation.json.gz"),
        "tokenizer": str(T5),
    }
    run = tmp_path / "run"
    assert (
        train.main(
            base_args(fx, run, num_training_steps=10, eval_every=10, save_every=10, lr=0.02, eval_tokens=2000, rank=16)
        )
        == 0
    )
    values = losses(run)
    assert values[0] == pytest.approx(10.37, abs=0.1)  # ln(32000) at initialisation
    assert values[-1] < values[0] - 1.0


@needs_c4
def test_t5_sentinel_ids_beyond_the_model_vocab_are_refused(tmp_path, capsys):
    """t5-base has 32,100 ids, the configs 32,000: a document holding a sentinel token
    (<extra_id_0> is id 32099) must stop the run with a clear message."""
    from train_fixtures import TINY_MODEL

    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": "a sentinel <extra_id_0> in the text"}) + "\n")
    model = tmp_path / "m.json"
    model.write_text(json.dumps({**TINY_MODEL, "vocab_size": 32000}))
    fx = {"model": str(model), "train": str(data), "eval": str(data), "tokenizer": str(T5)}
    assert train.main(base_args(fx, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "token id 32099 (<extra_id_0>) is outside the model's vocab_size 32000" in err


def test_chunked_loss_equals_the_whole_batch_loss_and_gradients():
    """TokenLoss with chunks (recomputed in backward) gives the whole-batch loss and the
    same gradients, padding included; both are the sum HF's own loss averages."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_MODEL, use_cache=False))
    ids = torch.randint(3, 64, (3, 16))
    labels = ids.clone()
    labels[0, 11:] = -100  # a right-padded sequence
    results = []
    for chunk in (0, 5, 16, 100):
        model.zero_grad()
        loss = train.TokenLoss(model, chunk)(ids, labels)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    whole, grads = results[0]
    for loss, other in results[1:]:
        assert torch.allclose(loss, whole, rtol=1e-6)
        for a, b in zip(other, grads, strict=True):  # fp32 rounding: the sums run in another order
            assert (a - b).abs().max() <= 1e-6 * b.abs().max()
    count = int((labels[:, 1:] != -100).sum())
    assert torch.allclose(whole / count, model(input_ids=ids, labels=labels).loss, rtol=1e-6)


def test_loss_chunk_trains_as_the_whole_batch_does(fx, tmp_path):
    """--loss_chunk changes memory, not the run: the same metrics, per-layer updates too."""
    for flags in (dict(), dict(optimizer="galore_adamw8bit_per_layer", proj_type="std")):
        runs = []
        for chunk in (0, 7):
            run = tmp_path / f"{len(flags)}-{chunk}"
            argv = base_args(fx, run, num_training_steps=4, eval_every=4, save_every=100, loss_chunk=chunk, **flags)
            assert train.main(argv) == 0
            runs.append(without_timing(read_metrics(run)))
        for a, b in zip(*runs, strict=True):
            assert a.keys() == b.keys()
            assert all(a[k] == pytest.approx(b[k], rel=1e-5) for k in a), (a, b)
