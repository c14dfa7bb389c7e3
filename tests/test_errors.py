"""Bad input gets a clear error naming the parameter (or a single warning for rank clamping)."""

import warnings

import pytest
import torch
from torch import nn

import osd


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.attn = nn.Linear(8, 8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8, bias=False))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10, bias=False)


def test_vector_in_subspace_group_names_parameter():
    model = Tiny()
    with pytest.raises(ValueError, match=r"parameter attn\.bias has shape \(8,\).*plain group"):
        osd.AdamW([{"params": [model.attn.bias], "param_names": ["attn.bias"], "rank": 2}])


def test_scalar_in_subspace_group_without_names():
    with pytest.raises(ValueError, match=r"parameter #0 \(shape \(\)\) has shape \(\)"):
        osd.AdamW([{"params": [nn.Parameter(torch.tensor(1.0))], "rank": 2}])


@pytest.mark.parametrize("rank", [0, -3, 2.5, "8", True])
def test_bad_rank(rank):
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        osd.AdamW([{"params": [nn.Parameter(torch.zeros(4, 4))], "rank": rank}])


@pytest.mark.parametrize(
    "key,value,valid",
    [
        ("projector", "pca", "online_pca, svd, random"),
        ("side", "up", "auto, reverse_auto, left, right, both"),
        ("proj_optimizer", "adam", "adamw, adam8bit, lion, adafactor, sgd"),
    ],
)
def test_unknown_names_list_valid_ones(key, value, valid):
    with pytest.raises(ValueError, match=f"unknown {key} '{value}'; valid: {valid}"):
        osd.Lion([{"params": [nn.Parameter(torch.zeros(4, 4))], "rank": 2, key: value}])


@pytest.mark.parametrize(
    "key,value,message", [("update_gap", 0, "integer >= 1"), ("retract_every", -1, "integer >= 0")]
)
def test_bad_periods(key, value, message):
    with pytest.raises(ValueError, match=f"{key} must be an {message}, got {value}"):
        osd.AdamW([{"params": [nn.Parameter(torch.zeros(4, 4))], "rank": 2, key: value}])


@pytest.mark.parametrize(
    "kwargs,message",
    [({"lr": -1.0}, "invalid learning rate"), ({"betas": (0.9, 1.0)}, "invalid betas"), ({"eps": -1}, "invalid eps")],
)
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        osd.AdamW([nn.Parameter(torch.zeros(2))], **kwargs)


def test_rank_too_large_is_clamped_with_one_warning():
    model = Tiny()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = osd.AdamW(osd.param_groups(model, rank=64))
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "rank 64 >= the projected dimension of 3 parameter(s)" in messages[0]
    assert "attn.weight 8x8" in messages[0]
    model.attn.weight.grad = torch.randn(8, 8)
    opt.step()
    state = opt.state[model.attn.weight]
    assert state["basis_cols"].shape == (8, 8)


def test_param_groups_split():
    model = Tiny()
    plain, sub = osd.param_groups(model, rank=4, update_gap=50, projector="svd")
    assert sub["param_names"] == ["attn.weight", "mlp.0.weight", "mlp.1.weight"]
    assert sub["rank"] == 4 and sub["update_gap"] == 50 and sub["projector"] == "svd"
    assert plain["param_names"] == [
        "embed.weight",
        "attn.bias",
        "mlp.0.bias",
        "norm.weight",
        "norm.bias",
        "head.weight",
    ]
    covered = {id(p) for g in (plain, sub) for p in g["params"]}
    assert covered == {id(p) for p in model.parameters()}


def test_param_groups_tied_weight_counted_once():
    model = Tiny()
    model.head.weight = model.embed.weight  # tied output head
    plain, sub = osd.param_groups(model, rank=4)
    ids = [id(p) for g in (plain, sub) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_param_groups_no_match():
    with pytest.raises(ValueError, match=r"no nn.Linear module name contains any of \['q_proj'\]; .*'attn'"):
        osd.param_groups(Tiny(), rank=4, target_modules=("q_proj",))


def test_sparse_gradients_rejected():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = osd.AdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


def test_works_with_lr_schedulers():
    w = nn.Parameter(torch.randn(6, 6))
    opt = osd.AdamW([{"params": [w], "rank": 2}], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for _ in range(3):
        w.grad = torch.randn(6, 6)
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] < 0.1 and opt.param_groups[0]["initial_lr"] == 0.1
