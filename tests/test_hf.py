"""osd in the Hugging Face Trainer: optimizers=(opt, None) trains and resumes exactly, the
wrong ways in fail loudly (optimizer_cls_and_kwargs, Layerwise under Trainer clipping), and
param_groups understands GPT-2's Conv1D and tied weights."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import osd

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

VOCAB, SEQ = 64, 16


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: intra-op threads only add synchronisation (milliseconds a matmul on a
    busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PERM = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(1))


class PermutationTokens(torch.utils.data.Dataset):
    """Sequences that follow a fixed permutation (next = PERM[current]) from a random start:
    learnable, so the loss falls within a few dozen steps."""

    def __init__(self, n=64):
        starts = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(0))
        seqs = [starts]
        for _ in range(SEQ - 1):
            seqs.append(PERM[seqs[-1]])
        self.tokens = torch.stack(seqs, dim=1)

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def tiny_llama(seed=0, **config):
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
    )
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **config}))


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=SEQ,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=1,
    )
    return GPT2LMHeadModel(cfg)


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def training_args(out, max_steps, save_steps=None, **kw):
    return TrainingArguments(
        output_dir=str(out),
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=8,
        max_steps=max_steps,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        **kw,
    )


class StopAt(TrainerCallback):
    """Ends training after ``step`` optimizer steps: an interrupted run."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def make_optimizer(model, projector, layerwise):
    opt = osd.AdamW(osd.param_groups(model, rank=4, projector=projector, update_gap=2), lr=1e-2)
    return osd.Layerwise(opt, max_grad_norm=1.0) if layerwise else opt


def train(model, args, optimizer, callbacks=None, resume=None):
    trainer = Trainer(
        model=model, args=args, train_dataset=PermutationTokens(), optimizers=(optimizer, None), callbacks=callbacks
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


# -- optimizers=(opt, None): trains, resumes exactly -----------------------------------------


@pytest.mark.parametrize(
    "arch,projector,layerwise",
    [("llama", "online_pca", False), ("gpt2", "svd", False), ("llama", "random", True)],
)
def test_resume_equals_uninterrupted_run(tmp_path, arch, projector, layerwise):
    n, k = 6, 3
    extra = {"max_grad_norm": 0.0} if layerwise else {}
    full_model = MODELS[arch]()
    full = train(
        full_model, training_args(tmp_path / "full", n, **extra), make_optimizer(full_model, projector, layerwise)
    )

    first = MODELS[arch]()
    train(
        first,
        training_args(tmp_path / "part", n, save_steps=k, **extra),
        make_optimizer(first, projector, layerwise),
        [StopAt(k)],
    )
    resumed_model = MODELS[arch](seed=1)  # other initial weights: the checkpoint must replace them
    resumed = train(
        resumed_model,
        training_args(tmp_path / "part", n, save_steps=k, **extra),
        make_optimizer(resumed_model, projector, layerwise),
        resume=str(tmp_path / "part" / f"checkpoint-{k}"),
    )

    assert resumed.state.global_step == full.state.global_step == n
    for (name, a), b in zip(full_model.named_parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
    # the optimizer state (moments and subspace bases) was restored and carried on identically
    full_state, resumed_state = full.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert full_state["state"].keys() == resumed_state["state"].keys()
    for index, state in full_state["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                torch.testing.assert_close(resumed_state["state"][index][key], value, rtol=1e-6, atol=1e-7)
            else:
                assert resumed_state["state"][index][key] == value
    # the resumed log holds the first k steps from the checkpoint, then its own
    losses = [r["loss"] for r in full.state.log_history if "loss" in r]
    resumed_losses = [r["loss"] for r in resumed.state.log_history if "loss" in r]
    assert len(losses) == n and resumed_losses == pytest.approx(losses, rel=1e-6)


def test_gpt2_trains_through_trainer(tmp_path):
    model = tiny_gpt2()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = osd.AdamW(osd.param_groups(model, rank=4, projector="online_pca", update_gap=10, scale=1.0), lr=1e-2)
    trainer = train(model, training_args(tmp_path, 40), opt)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5, losses
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight"):
        assert not torch.equal(model.get_parameter(name), before[name]), name
    # a Conv1D weight is stored (in, out); side="auto" projects its smaller dimension
    c_attn = model.transformer.h[0].attn.c_attn.weight
    assert c_attn.shape == (32, 96)
    state = opt.state[c_attn]
    assert state["basis_rows"].shape == (32, 4) and "basis_cols" not in state
    assert state["exp_avg"].shape == (4, 96)
    c_proj = model.transformer.h[0].mlp.c_proj.weight  # (128, 32): the other way round
    assert opt.state[c_proj]["basis_cols"].shape == (32, 4)


# -- optimizer_cls_and_kwargs ----------------------------------------------------------------


def test_optimizer_cls_and_kwargs_with_rank_says_how(tmp_path):
    model = tiny_llama()
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, 2),
        train_dataset=PermutationTokens(),
        optimizer_cls_and_kwargs=(osd.AdamW, {"lr": 1e-3, "rank": 8, "update_gap": 50}),
    )
    with pytest.raises(TypeError) as info:
        trainer.create_optimizer()
    message = str(info.value)
    assert "osd.AdamW() got subspace option(s) rank, update_gap as keyword arguments" in message
    assert "osd.param_groups(model, rank=8, update_gap=50)" in message
    assert "Trainer(..., optimizers=(optimizer, None))" in message


def test_optimizer_cls_and_kwargs_plain_warns(tmp_path):
    model = tiny_llama()
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, 2),
        train_dataset=PermutationTokens(),
        optimizer_cls_and_kwargs=(osd.AdamW, {"lr": 1e-3}),
    )
    with pytest.warns(UserWarning) as caught:
        opt = trainer.create_optimizer()
    messages = [str(w.message) for w in caught if "osd.AdamW" in str(w.message)]
    assert len(messages) == 1, messages
    assert "no group has 'rank', so this is a plain full-rank optimizer" in messages[0]
    assert "osd.param_groups(model, rank=...)" in messages[0]
    assert "optimizers=(optimizer, None)" in messages[0]
    assert not any("rank" in g for g in opt.param_groups)


def test_optimizer_cls_and_kwargs_with_params_is_fine(tmp_path):
    """Trainer takes the param groups from a ``params`` entry of the kwargs."""
    model = tiny_llama()
    kwargs = {"params": osd.param_groups(model, rank=4), "lr": 1e-3}
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, 2),
        train_dataset=PermutationTokens(),
        optimizer_cls_and_kwargs=(osd.AdamW, kwargs),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*osd")
        opt = trainer.create_optimizer()
    assert [g.get("rank") for g in opt.param_groups] == [None, 4]


def test_plain_optimizer_outside_trainer_does_not_warn():
    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        osd.AdamW(model.parameters())
        osd.Lion([{"params": list(model.parameters()), "weight_decay": 0.1}])


@pytest.mark.parametrize("cls", [osd.AdamW, osd.AdamW8bit, osd.Lion, osd.Adafactor, osd.SGD])
@pytest.mark.parametrize(
    "options,shown",
    [
        ({"rank": 8}, "rank=8"),
        ({"projector": "svd"}, "rank=..., projector='svd'"),
        ({"scale": 0.5, "rank": 2}, "rank=2, scale=0.5"),
        ({"side": "left", "proj_optimizer": "lion"}, "rank=..., side='left', proj_optimizer='lion'"),
        ({"target_modules": ("attn",)}, "rank=..., target_modules=('attn',)"),
    ],
)
def test_subspace_options_as_constructor_kwargs(cls, options, shown):
    with pytest.raises(TypeError) as info:
        cls([nn.Parameter(torch.zeros(4, 4))], **options)
    message = str(info.value)
    assert message.startswith(f"osd.{cls.__name__}() got subspace option(s) {', '.join(options)} as keyword")
    assert f"osd.param_groups(model, {shown})" in message
    assert "optimizers=(optimizer, None)" in message


def test_other_unknown_kwargs_keep_the_usual_error():
    with pytest.raises(TypeError, match="unexpected keyword argument 'momentum'"):
        osd.AdamW([nn.Parameter(torch.zeros(4, 4))], momentum=0.9)


# -- Layerwise under Trainer -----------------------------------------------------------------


def test_layerwise_refuses_trainer_clipping(tmp_path):
    model = tiny_llama()
    opt = osd.Layerwise(osd.AdamW(osd.param_groups(model, rank=4)))
    trainer = Trainer(
        model=model, args=training_args(tmp_path, 2), train_dataset=PermutationTokens(), optimizers=(opt, None)
    )
    assert trainer.args.max_grad_norm == 1.0  # Trainer's default
    with pytest.raises(ValueError) as info:
        trainer.train()
    message = str(info.value)
    assert "osd.Layerwise under transformers.Trainer with TrainingArguments(max_grad_norm=1.0)" in message
    assert "would silently do nothing" in message
    assert "Pass TrainingArguments(max_grad_norm=0)" in message
    assert "osd.Layerwise(optimizer, max_grad_norm=1.0)" in message


@pytest.mark.parametrize("inner,outer", [(2, 1), (1, 2)])
def test_layerwise_refuses_mismatched_accumulation(tmp_path, inner, outer):
    model = tiny_llama()
    opt = osd.Layerwise(osd.AdamW(osd.param_groups(model, rank=4)), accumulation_steps=inner)
    args = training_args(tmp_path, 2, max_grad_norm=0.0, gradient_accumulation_steps=outer)
    trainer = Trainer(model=model, args=args, train_dataset=PermutationTokens(), optimizers=(opt, None))
    if inner > outer:  # step() comes too early: the Trainer check names both settings
        match = r"Layerwise\(accumulation_steps=2\) .*TrainingArguments\(gradient_accumulation_steps=1\): set both"
        error = ValueError
    else:  # a second backward before step(): the hook refuses it
        match = r"backward number 2 since the last step\(\) but accumulation_steps=1.*gradient_accumulation_steps"
        error = RuntimeError
    with pytest.raises(error, match=match):
        trainer.train()


def test_layerwise_with_accumulation_under_trainer(tmp_path):
    model = tiny_llama()
    opt = osd.Layerwise(osd.AdamW(osd.param_groups(model, rank=4), lr=1e-2), accumulation_steps=2)
    args = training_args(tmp_path, 3, max_grad_norm=0.0, gradient_accumulation_steps=2)
    trainer = train(model, args, opt)
    assert trainer.state.global_step == 3
    assert opt.state[model.model.layers[0].self_attn.q_proj.weight]["step"] == 3


# -- param_groups: GPT-2 Conv1D, tied weights --------------------------------------------------


def test_param_groups_gpt2_conv1d():
    model = tiny_gpt2()
    plain, sub = osd.param_groups(model, rank=4)
    assert sub["param_names"] == [
        f"transformer.h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert "transformer.wte.weight" in plain["param_names"]  # also the tied lm_head
    assert all(not n.endswith(".weight") or "ln_" in n or "wte" in n or "wpe" in n for n in plain["param_names"])
    covered = [id(p) for g in (plain, sub) for p in g["params"]]
    assert sorted(covered) == sorted(id(p) for p in model.parameters())


def test_param_groups_gpt2_no_match_lists_conv1d():
    with pytest.raises(ValueError, match=r"any of \['q_proj'\]; matrix modules .* \['transformer.h.0.attn.c_attn'"):
        osd.param_groups(tiny_gpt2(), rank=4, target_modules=["q_proj"])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tied_head_goes_to_plain_group(arch):
    model = tiny_llama(tie_word_embeddings=True) if arch == "llama" else tiny_gpt2()
    head = model.lm_head.weight
    assert head is model.get_input_embeddings().weight
    plain, sub = osd.param_groups(model, rank=4, target_modules=("attn", "mlp", "lm_head"))
    assert any(p is head for p in plain["params"]) and not any(p is head for p in sub["params"])
    assert not any("lm_head" in n or "embed" in n or "wte" in n for n in sub["param_names"])
    osd.AdamW([plain, sub])  # valid groups
    assert len(sub["params"]) == {"llama": 14, "gpt2": 8}[arch]


def test_untied_head_can_be_targeted():
    model = tiny_llama(tie_word_embeddings=False)
    _, sub = osd.param_groups(model, rank=4, target_modules=("lm_head",))
    assert sub["param_names"] == ["lm_head.weight"]


def test_only_tied_weights_targeted_says_so():
    model = tiny_gpt2()
    with pytest.raises(ValueError, match=r"every weight of the modules matching \['lm_head'\] is shared with another"):
        osd.param_groups(model, rank=4, target_modules=("lm_head",))


def test_weight_shared_by_two_targeted_linears_stays_in_subspace():
    model = nn.Module()
    model.attn = nn.Linear(8, 8)
    model.mlp = nn.Linear(8, 8)
    model.mlp.weight = model.attn.weight
    _, sub = osd.param_groups(model, rank=2)
    assert sub["param_names"] == ["attn.weight"]


def test_import_osd_does_not_import_transformers():
    code = "import sys, osd; assert 'transformers' not in sys.modules and 'accelerate' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
