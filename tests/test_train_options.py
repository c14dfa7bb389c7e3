"""Trainer command line: string mapping, schedule, config files, and bad input (one-line
error, exit code 2, nothing written)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from train_fixtures import base_args, make_fixture

import osd
from osd import cli_options, models, train


@pytest.fixture(scope="session")
def fx(tmp_path_factory):
    return make_fixture(tmp_path_factory.mktemp("train_fixture"))


@pytest.fixture
def model(fx):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(models.model_config(fx["model"]))


def build(model, optimizer, proj_type="std", **overrides):
    args = train.parse_args(
        [
            "--model_config",
            "x",
            "--batch_size",
            "1",
            "--optimizer",
            optimizer,
            "--proj_type",
            proj_type,
            "--rank",
            "8",
            "--gradient_accumulation",
            "1",
        ]
    )
    vars(args).update(overrides)
    return cli_options.build_optimizer(model, args)


EXPECTED_PROJ = {
    "std": ("svd", "auto", None),
    "reverse_std": ("svd", "reverse_auto", None),
    "left": ("svd", "left", None),
    "right": ("svd", "right", None),
    "full": ("svd", "both", None),
    "random": ("random", "auto", None),
    "continuous": ("online_pca", "auto", "adamw"),
    "continuous_adam8bit": ("online_pca", "auto", "adam8bit"),
    "continuous_lion": ("online_pca", "auto", "lion"),
    "continuous_adafactor": ("online_pca", "auto", "adafactor"),
    "continuous_sgd": ("online_pca", "auto", "sgd"),
}


def test_every_proj_type_maps_to_group_options(model):
    assert set(EXPECTED_PROJ) == set(cli_options.PROJ_TYPES)
    for proj_type, (projector, side, proj_optimizer) in EXPECTED_PROJ.items():
        opt = build(model, "galore_adamw", proj_type, update_proj_gap=7, galore_scale=0.5)
        plain, sub = opt.param_groups
        assert "rank" not in plain and sub["rank"] == 8
        assert (sub["projector"], sub["side"], sub["update_gap"], sub["scale"]) == (projector, side, 7, 0.5)
        if proj_optimizer:
            assert sub["proj_optimizer"] == proj_optimizer
        # attention and MLP matrices only; embeddings, norms and the head stay plain
        assert all(".self_attn." in n or ".mlp." in n for n in sub["param_names"])
        assert "lm_head.weight" in plain["param_names"]


def test_transport_and_retract_every_reach_the_subspace_group(model):
    args = train.parse_args(["--model_config", "x", "--batch_size", "1"])
    assert (args.transport, args.retract_every) == (False, 0)  # off unless asked for
    _, sub = build(model, "galore_adamw", "continuous").param_groups
    assert (sub["transport"], sub["retract_every"]) == (False, 0)
    args = train.parse_args(["--model_config", "x", "--batch_size", "1", "--transport", "--retract_every", "10"])
    _, sub = build(model, "galore_adamw", "continuous", transport=args.transport, retract_every=10).param_groups
    assert (sub["transport"], sub["retract_every"]) == (True, 10)
    _, sub = build(model, "galore_adamw", "std", transport=True).param_groups
    assert sub["transport"] is True and sub["projector"] == "svd"


def test_build_optimizer_hook_replaces_the_cli_optimizer(fx, tmp_path):
    import torch

    seen = {}

    def factory(model, args):
        seen["args"] = args
        return torch.optim.SGD(model.parameters(), lr=args.lr)

    model, optimizer = train.run(
        base_args(fx, tmp_path / "run", optimizer="adamw", num_training_steps=2, lr=0.05), build_optimizer=factory
    )
    assert type(optimizer) is torch.optim.SGD and seen["args"].lr == 0.05
    lrs = [json.loads(line).get("lr") for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [lr for lr in lrs if lr is not None] == [0.0, 0.025]  # the trainer's warmup drives it


@pytest.mark.parametrize("name", cli_options.optimizer_names())
def test_every_optimizer_name_builds_its_osd_class(model, name):
    choice = cli_options.parse_optimizer(name)
    opt = build(model, name, proj_type="continuous", gradient_accumulation=3, grad_clipping=1.0)
    if choice.per_layer:
        assert type(opt) is osd.Layerwise
        assert (opt.accumulation_steps, opt.max_grad_norm) == (3, 1.0)
        opt.remove_hooks()
        opt = opt.optimizer
    assert type(opt) is getattr(osd, choice.class_name)
    assert any("rank" in g for g in opt.param_groups) == choice.subspace
    expected = {
        "adam": "AdamW",
        "adamw": "AdamW",
        "adam8bit": "AdamW8bit",
        "adamw8bit": "AdamW8bit",
        "lion": "Lion",
        "adafactor": "Adafactor",
        "sgd": "SGD",
    }
    assert choice.class_name == expected[name.removeprefix("galore_").removesuffix("_per_layer")]


def test_per_layer_grad_clipping_clips_each_parameter_on_its_own(model):
    """--grad_clipping with a *_per_layer optimizer is osd.Layerwise(max_grad_norm=...):
    each gradient is scaled to norm <= the limit by itself (a global norm would need all
    gradients at once). With SGD (no momentum) at lr 1 a parameter moves by its clipped
    gradient, so each one moves by min(its gradient norm, limit)."""
    import copy

    import torch

    ids = torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = copy.deepcopy(model)
    reference(input_ids=ids, labels=ids).loss.backward()
    norms = {n: p.grad.norm().item() for n, p in reference.named_parameters()}
    limit = sorted(norms.values())[len(norms) // 2]  # about half the parameters get clipped
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build(model, "sgd_per_layer", grad_clipping=limit, lr=1.0)
    model(input_ids=ids, labels=ids).loss.backward()  # the updates happen here
    opt.step()
    for n, p in model.named_parameters():
        moved = (p.detach() - before[n]).norm().item()
        assert moved == pytest.approx(min(norms[n], limit), rel=1e-4), n
    assert sum(norms[n] > limit for n in norms) >= len(norms) // 3


def test_seed_optimizer_names_are_accepted():
    seed = [
        "adam",
        "adamw",
        "sgd",
        "lion",
        "adafactor",
        "adam8bit",
        "galore_adamw",
        "galore_adafactor",
        "galore_lion",
        "galore_adamw8bit",
        "galore_adamw8bit_per_layer",
        "Adam",
    ]
    for name in seed:
        cli_options.parse_optimizer(name)


def test_adafactor_beta1_zero_means_none(model):
    opt = build(model, "galore_adafactor", beta1=0.0)
    assert all(g["beta1"] is None for g in opt.param_groups)
    opt = build(model, "adafactor", beta1=0.9)
    assert opt.param_groups[0]["beta1"] == 0.9


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedule_warms_up_then_decays_to_min_ratio(kind):
    f = lambda s: train.lr_lambda(s, warmup=10, total=100, min_ratio=0.1, kind=kind)  # noqa: E731
    assert f(0) == 0 and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.55)  # the midpoint of the decay, both shapes
    assert f(100) == pytest.approx(0.1) and f(150) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_config_file_sets_defaults_and_flags_override(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        'model_config = "llama_20m"\nbatch_size = 4\nlr = 1\nactivation_checkpointing = true\nmax_train_tokens = "1M"\n'
    )
    args = train.parse_args(["--config", str(cfg), "--batch_size", "8", "--no-activation_checkpointing"])
    assert (args.model_config, args.batch_size, args.lr) == ("llama_20m", 8, 1.0)
    assert args.activation_checkpointing is False and args.max_train_tokens == 1_000_000
    args = train.resolve(args, world_size=1)
    assert args.num_training_steps == 1_000_000 // (8 * 256)


def test_shipped_configs_resolve():
    root = Path(__file__).resolve().parents[1] / "configs"
    names = sorted(p.stem for p in root.glob("*.toml"))
    assert {"quickstart", *models.SIZES} <= set(names)
    for name in names:
        args = train.resolve(
            train.parse_args(
                ["--config", str(root / f"{name}.toml"), "--dataset", "d.jsonl", "--eval_dataset", "e.jsonl"]
            ),
            1,
        )
        assert args.total_batch_size == args.batch_size * args.gradient_accumulation
        cli_options.parse_optimizer(args.optimizer)


def test_seed_batch_arithmetic():
    args = train.resolve(
        train.parse_args(
            [
                "--model_config",
                "llama_60m",
                "--batch_size",
                "256",
                "--total_batch_size",
                "512",
                "--dataset",
                "d.json",
                "--eval_dataset",
                "e.json",
            ]
        ),
        world_size=1,
    )
    assert args.gradient_accumulation == 2
    args = train.resolve(
        train.parse_args(
            [
                "--model_config",
                "llama_60m",
                "--batch_size",
                "64",
                "--total_batch_size",
                "512",
                "--dataset",
                "d.json",
                "--eval_dataset",
                "e.json",
            ]
        ),
        world_size=4,
    )
    assert args.gradient_accumulation == 2


def test_seed_model_config_path_falls_back_to_the_size_table():
    assert models.resolve("configs/llama_60m.json")["hidden_size"] == 512
    assert models.resolve("llama_7b")["max_position_embeddings"] == 2048


# ---------------------------------------------------------------- bad input


def bad_cases(fx, tmp):
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    garbage = tmp / "garbage.json.gz"
    garbage.write_bytes(b"not gzip at all")
    not_ckpt = tmp / "not_a_checkpoint"
    not_ckpt.mkdir()
    (not_ckpt / "something.txt").write_text("x")
    bad_toml = tmp / "bad.toml"
    bad_toml.write_text("lr = = 1\n")
    unknown_key = tmp / "unknown.toml"
    unknown_key.write_text("learning_rate = 1\n")
    small_vocab = tmp / "small_vocab.json"
    small_vocab.write_text(json.dumps({**json.loads(Path(fx["model"]).read_text()), "vocab_size": 16}))
    return {
        "missing config": (dict(config=tmp / "nope.toml"), "nope.toml"),
        "malformed config": (dict(config=bad_toml), "not valid TOML"),
        "unknown config key": (dict(config=unknown_key), "unknown key 'learning_rate'"),
        "unknown optimizer": (dict(optimizer="galore_adamz"), "valid: adam, adam_per_layer"),
        "unknown proj_type": (dict(proj_type="continous"), "valid: std, reverse_std"),
        "batch does not divide": (dict(batch_size=4, total_batch_size=10), "not divisible"),
        "accumulation mismatch": (dict(batch_size=4, total_batch_size=12, gradient_accumulation=2), "!="),
        "unknown model": (dict(model_config="llama_5m"), "unknown model config"),
        "float16": (dict(dtype="float16"), "float16 is not supported"),
        "ids beyond vocab": (dict(model_config=small_vocab), "outside the model's vocab_size 16"),
        "empty dataset": (dict(dataset=empty), "empty"),
        "unreadable dataset": (dict(dataset=garbage), "unreadable"),
        "missing dataset": (dict(dataset=tmp / "missing.jsonl"), "not a readable file"),
        "no eval dataset": (dict(eval_dataset=None), "--eval_dataset is required"),
        "not a checkpoint": (dict(continue_from=not_ckpt), "not an osd-train checkpoint"),
        "bad number": (dict(lr="fast"), "invalid float value"),
        "lr nan": (dict(lr="nan"), "--lr must be a finite number, got nan"),
        "lr inf": (dict(lr="inf"), "--lr must be a finite number, got inf"),
        "lr zero": (dict(lr=0), "--lr must be in (0, inf), got 0.0"),
        "negative weight decay": (dict(weight_decay=-0.1), "--weight_decay must be in [0, inf), got -0.1"),
        "negative clipping": (dict(grad_clipping=-1), "--grad_clipping must be in [0, inf), got -1.0"),
        "negative loss chunk": (dict(loss_chunk=-1), "--loss_chunk must be in [0, inf), got -1"),
        "negative scale": (dict(galore_scale=-1), "--galore_scale must be in (0, inf), got -1.0"),
        "nan scale": (dict(galore_scale="nan"), "--galore_scale must be a finite number"),
        "negative proj_lr": (dict(proj_lr=-1), "--proj_lr must be in (0, inf), got -1.0"),
        "nan proj_lr": (dict(proj_lr="nan"), "--proj_lr must be a finite number"),
        "negative orth_reg": (dict(orth_reg=-0.1), "--orth_reg must be in [0, inf), got -0.1"),
        "beta1 one": (dict(optimizer="adafactor", beta1=1), "--beta1 must be in [0, 1), got 1.0"),
        "eval_tokens 0": (dict(eval_tokens=0), "--eval_tokens must be in (0, inf), got 0"),
        "negative keep": (dict(keep_checkpoints=-1), "--keep_checkpoints must be in [0, inf), got -1"),
        "min_lr_ratio 0": (dict(min_lr_ratio=0), "--min_lr_ratio must be in (0, 1], got 0.0"),
    }


def test_bad_input_gives_one_line_error_and_writes_nothing(fx, tmp_path, capsys):
    for case, (overrides, message) in bad_cases(fx, tmp_path).items():
        save_dir = tmp_path / "run" / case.replace(" ", "_")
        code = train.main(base_args(fx, save_dir, **overrides))
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, case
        assert len(lines) == 1 and lines[0].startswith("osd-train: error: "), (case, err)
        assert message in lines[0], (case, lines[0])
        assert not save_dir.exists(), case


def test_checkpoint_of_another_model_is_refused(fx, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(base_args(fx, run, num_training_steps=1, optimizer="adamw")) == 0
    bigger = tmp_path / "bigger.json"
    bigger.write_text(json.dumps({**json.loads(Path(fx["model"]).read_text()), "hidden_size": 48}))
    capsys.readouterr()
    before = sorted(p.name for p in run.rglob("*"))
    assert train.main(base_args(fx, run, model_config=bigger, optimizer="adamw", continue_from=run)) == 2
    err = capsys.readouterr().err.strip()
    assert "belongs to another model: hidden_size 32 (checkpoint) vs 48" in err and "\n" not in err
    assert sorted(p.name for p in run.rglob("*")) == before
    assert train.main(base_args(fx, run, optimizer="lion", continue_from=run)) == 2
    assert "optimizer 'adamw' there, 'lion' here" in capsys.readouterr().err


def test_rank_too_large_warns_and_clamps(fx, tmp_path):
    with pytest.warns(UserWarning, match="rank 1000 >= the projected dimension") as record:
        assert train.main(base_args(fx, tmp_path / "run", rank=1000, num_training_steps=1)) == 0
    # what the user sees on stderr (pytest captures warnings itself): one line
    shown = warnings.formatwarning(record[0].message, record[0].category, record[0].filename, record[0].lineno)
    assert shown.startswith("osd-train: warning: rank 1000") and shown.count("\n") == 1


def test_cli_process_error_is_one_line_with_exit_code_2(fx, tmp_path):
    """The real entry point, with its imports: only the error line reaches stderr."""
    small_vocab = tmp_path / "small_vocab.json"
    small_vocab.write_text(json.dumps({**json.loads(Path(fx["model"]).read_text()), "vocab_size": 16}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    argv = base_args(fx, tmp_path / "run", model_config=small_vocab)
    proc = subprocess.run([sys.executable, "-m", "osd.train", *argv], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("osd-train: error: dataset: token id ") and "vocab_size 16" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("flag", "default", "value", "bad"),
    [("proj_dtype", "auto", "float32", "fp8"), ("basis_dtype", "float32", "bfloat16", "float16")],
)
def test_dtype_flags_reach_the_subspace_group(model, flag, default, value, bad):
    _, sub = build(model, "galore_adamw", "continuous").param_groups
    assert sub[flag] == default
    args = train.parse_args(["--model_config", "x", "--batch_size", "1", f"--{flag}", value])
    _, sub = build(model, "galore_adamw", "continuous", **{flag: getattr(args, flag)}).param_groups
    assert sub[flag] == value
    with pytest.raises(train.UsageError, match=rf"argument --{flag}: invalid choice: '{bad}' \(choose from"):
        train.parse_args(["--model_config", "x", "--batch_size", "1", f"--{flag}", bad])


def test_svd_method_reaches_the_subspace_group(model):
    _, sub = build(model, "galore_adamw", "continuous").param_groups
    assert sub["svd_method"] == "exact"
    _, sub = build(model, "galore_adamw", "std", svd_method="randomized").param_groups
    assert sub["svd_method"] == "randomized"


def test_correction_flag_reaches_the_subspace_group(model):
    args = train.parse_args(["--model_config", "x", "--batch_size", "1"])
    assert args.correction == "none"
    _, sub = build(model, "galore_adamw", "continuous").param_groups
    assert sub["correction"] == "none"
    args = train.parse_args(["--model_config", "x", "--batch_size", "1", "--correction", "fira"])
    _, sub = build(model, "galore_adamw8bit", "std", correction=args.correction).param_groups
    assert sub["correction"] == "fira"
