"""Checkpointing: tensor-only state, weights_only load, lockstep resume; bf16; state bytes."""

import io
import itertools

import pytest
import torch

import osd
from osd import projectors

OPTIMIZERS = {"adamw": osd.AdamW, "adamw8bit": osd.AdamW8bit, "lion": osd.Lion, "adafactor": osd.Adafactor}
SUBSPACES = [("svd", "adamw"), ("random", "adamw")] + [("online_pca", n) for n in osd.PROJ_OPTIMIZERS]


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    # shapes with >= 4096-element state so 8-bit storage is really exercised
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 96), torch.nn.LayerNorm(96)
    ).to(dtype)


def make_opt(model, opt_name, projector, proj_optimizer, side="auto"):
    plain = [p for p in model.parameters() if p.dim() < 2]
    mats = [p for p in model.parameters() if p.dim() == 2]
    group = {"params": mats, "rank": 32, "projector": projector, "update_gap": 4, "side": side}
    group["proj_optimizer"] = proj_optimizer
    return OPTIMIZERS[opt_name]([{"params": plain}, group], lr=1e-3)


def train(model, opt, steps, seed, width=64):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, width, generator=gen).to(next(model.parameters()).dtype)
        opt.zero_grad()
        model(x).float().square().mean().backward()
        opt.step()


def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_tensor_only(obj, path="state_dict"):
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, (str, int)), f"{path}: key {k!r}"
            assert_tensor_only(v, f"{path}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            assert_tensor_only(v, f"{path}[{i}]")
    else:
        ok = obj is None or isinstance(obj, (bool, int, float, str)) or type(obj) is torch.Tensor
        assert ok, f"{path} is a {type(obj).__name__}"


CASES = [(o, p, po) for o, (p, po) in itertools.product(OPTIMIZERS, SUBSPACES)]


@pytest.mark.parametrize("opt_name,projector,proj_optimizer", CASES)
def test_lockstep_resume(opt_name, projector, proj_optimizer):
    """Save after 7 steps (the next step, 8, is a refresh with update_gap=4), load into a
    fresh model + optimizer, then step both: bitwise equal for 10 steps."""
    model = make_model()
    opt = make_opt(model, opt_name, projector, proj_optimizer)
    train(model, opt, 7, seed=1)
    sd = opt.state_dict()
    assert_tensor_only(sd)
    sd = roundtrip(sd)

    clone = make_model(seed=5)
    clone.load_state_dict(model.state_dict())
    clone_opt = make_opt(clone, opt_name, projector, proj_optimizer)
    clone_opt.load_state_dict(sd)
    assert clone_opt.state_bytes() == opt.state_bytes()

    train(model, opt, 10, seed=2)
    train(clone, clone_opt, 10, seed=2)
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)


def test_bf16_parameters_keep_fp32_subspace_state():
    model = make_model(dtype=torch.bfloat16)
    opt = make_opt(model, "adamw", "online_pca", "adamw")
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, 5, seed=0)
    for p, b in zip(model.parameters(), before, strict=True):
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
        if p.dim() == 2:  # (a LayerNorm weight of 1.0 does not move by 1e-3 in bf16)
            assert not torch.equal(p, b)
    mat = model[0].weight
    assert all(v.dtype == torch.float32 for v in opt.state[mat].values() if torch.is_tensor(v))
    assert opt.state[model[3].weight]["exp_avg"].dtype == torch.bfloat16  # plain: param dtype
    # state dtypes survive a checkpoint (torch would cast them to bf16)
    clone_opt = make_opt(model, "adamw", "online_pca", "adamw")
    clone_opt.load_state_dict(roundtrip(opt.state_dict()))
    loaded = clone_opt.state[clone_opt.param_groups[1]["params"][0]]
    assert loaded[projectors.COLS].dtype == torch.float32 and loaded["exp_avg"].dtype == torch.float32


def test_tall_conv_weight_viewed_as_matrix():
    conv = torch.nn.Conv2d(8, 16, 3)
    opt = osd.AdamW([{"params": [conv.weight], "rank": 4}])
    conv.weight.grad = torch.randn_like(conv.weight)
    opt.step()
    state = opt.state[conv.weight]
    # 16 x 72 matrix: wide, so the left side: basis 16 x 4, moments 4 x 72
    assert state[projectors.ROWS].shape == (16, 4) and state["exp_avg"].shape == (4, 72)


@pytest.mark.parametrize(
    "proj_optimizer,basis_opt_elems",
    [("adamw", 2), ("lion", 1), ("sgd", 0)],
)
@pytest.mark.parametrize("shape", [(96, 40), (40, 96)])
def test_state_bytes_formula(shape, proj_optimizer, basis_opt_elems):
    """background.md §1: 2*max(m,n)*r + min(m,n)*r fp32, plus the basis optimizer's state
    (AdamW 2*min*r, Lion min*r, SGD none), plus one fp32 norm with a full-rank correction
    (Fira's, the default)."""
    m, n = shape
    r = 8
    w = torch.nn.Parameter(torch.randn(m, n))
    for correction, norm in (("none", 0), ("fira", 1)):
        opt = osd.AdamW([{"params": [w], "rank": r, "proj_optimizer": proj_optimizer, "correction": correction}])
        w.grad = torch.randn(m, n)
        opt.step()
        expected = 4 * (2 * max(m, n) * r + min(m, n) * r + basis_opt_elems * min(m, n) * r + norm)
        assert opt.state_bytes() == expected
        assert opt.state_bytes(0) == expected
    svd = osd.AdamW([{"params": [w], "rank": r, "projector": "svd", "correction": "none"}])
    svd.step()
    assert svd.state_bytes() == 4 * (2 * max(m, n) * r + min(m, n) * r)
    full = osd.AdamW([w])
    full.step()
    assert full.state_bytes() == 4 * 2 * m * n


def test_8bit_state_is_a_quarter():
    model = make_model()
    mats = [model[0].weight, model[2].weight]
    opt32, opt8 = osd.AdamW(mats), osd.AdamW8bit(mats)
    for p in mats:
        p.grad = torch.randn_like(p)
    opt32.step()
    opt8.step()
    ratio = opt8.state_bytes() / opt32.state_bytes()
    # 1 byte per element + one fp32 scale per 256 elements
    assert abs(ratio - (1 + 4 / 256) / 4) < 1e-3, ratio


@pytest.mark.parametrize("projector", ["random", "svd"])
def test_lockstep_resume_of_a_stack(projector):
    """Two matrices of one shape (one stack): a resumed run is bitwise the uninterrupted
    one. (Random bases came from QR in column-major layout while loaded ones are
    row-major, and the stacked products then rounded differently.)"""

    def build(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(48, 48), torch.nn.Tanh(), torch.nn.Linear(48, 48))
        mats = [model[0].weight, model[2].weight]
        plain = [model[0].bias, model[2].bias]
        group = {"params": mats, "rank": 8, "projector": projector, "update_gap": 4}
        return model, osd.AdamW([{"params": plain}, group], lr=1e-3)

    model, opt = build(0)
    train(model, opt, 7, 1, width=48)
    clone, clone_opt = build(5)
    clone.load_state_dict(model.state_dict())
    clone_opt.load_state_dict(roundtrip(opt.state_dict()))
    train(model, opt, 6, 2, width=48)
    train(clone, clone_opt, 6, 2, width=48)
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)
