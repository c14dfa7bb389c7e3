"""Reduces-to-reference: plain groups equal torch/transformers/paper optimizers, SVD mode
equals galore-torch, online PCA equals an independent re-implementation of the reference."""

import math

import pytest
import torch
from conftest import OSD_PAPER, SHAPES, assert_close_traj, loss_fn, quadratic_problem, run

import osd

STEPS = 30


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_plain_adamw_equals_torch(shape):
    w0, batches = quadratic_problem(shape, STEPS)
    ours = run(lambda p: osd.AdamW(p, lr=1e-2, weight_decay=0.1), w0, batches)
    ref = run(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=False), w0, batches)
    assert_close_traj(ours, ref, 1e-6)


def test_adamw_defaults_match_torch():
    ours = osd.AdamW([torch.nn.Parameter(torch.zeros(2))]).defaults
    ref = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))]).defaults
    for key in ("lr", "betas", "eps", "weight_decay"):
        assert ours[key] == ref[key], key


def test_plain_lion_equals_paper():
    w0, batches = quadratic_problem((24, 16), STEPS)
    lr, (b1, b2), wd = 1e-3, (0.9, 0.99), 0.5

    def lion_paper(params):
        class Ref(torch.optim.Optimizer):
            def step(self):
                for p in self.param_groups[0]["params"]:
                    m = self.state[p].setdefault("m", torch.zeros_like(p))
                    update = (b1 * m + (1 - b1) * p.grad).sign()
                    p.data.add_(update + wd * p.data, alpha=-lr)
                    m.mul_(b2).add_(p.grad, alpha=1 - b2)

        return Ref(params, {})

    ours = run(lambda p: osd.Lion(p, lr=lr, betas=(b1, b2), weight_decay=wd), w0, batches)
    assert osd.Lion([torch.nn.Parameter(torch.zeros(2))]).defaults["lr"] == 1e-4
    assert_close_traj(ours, run(lion_paper, w0, batches), 1e-6)


@pytest.mark.parametrize("beta1", [None, 0.9])
@pytest.mark.parametrize("shape", [(24, 16), (40,)], ids=["matrix", "vector"])
def test_plain_adafactor_equals_transformers(shape, beta1):
    from transformers.optimization import Adafactor as HFAdafactor

    w0, batches = quadratic_problem((24, 16), STEPS)
    if len(shape) == 1:  # a vector parameter: unfactored second moment
        w0 = w0[:, 0].clone()
        batches = [(x[:1], y) for x, y in batches]
        w0 = w0.unsqueeze(1)
    kw = dict(lr=1e-2, beta1=beta1, weight_decay=0.01, clip_threshold=1.0, decay_rate=-0.8, eps=(1e-30, 1e-3))
    ref = run(
        lambda p: HFAdafactor(p, relative_step=False, scale_parameter=False, warmup_init=False, **kw),
        w0,
        batches,
    )
    assert_close_traj(run(lambda p: osd.Adafactor(p, **kw), w0, batches), ref, 1e-6)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_svd_adamw_equals_galore_torch(shape):
    galore_torch = pytest.importorskip("galore_torch")
    w0, batches = quadratic_problem(shape, STEPS)
    common = dict(rank=8, scale=0.25)
    ref = run(
        lambda p: galore_torch.GaLoreAdamW(
            [{"params": p, "update_proj_gap": 10, "proj_type": "std", **common}],
            lr=1e-2,
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=0.0,
            no_deprecation_warning=True,
        ),
        w0,
        batches,
    )
    ours = run(
        lambda p: osd.AdamW(
            [{"params": p, "projector": "svd", "update_gap": 10, "side": "auto", "correction": "none", **common}],
            lr=1e-2,
            weight_decay=0.0,
        ),
        w0,
        batches,
    )
    assert_close_traj(ours, ref, 1e-5)


@pytest.mark.parametrize("side,proj_type", [("left", "left"), ("right", "right"), ("both", "full")])
def test_svd_sides_equal_galore_torch(side, proj_type):
    galore_torch = pytest.importorskip("galore_torch")
    w0, batches = quadratic_problem((32, 24), STEPS)
    ref = run(
        lambda p: galore_torch.GaLoreAdamW(
            [{"params": p, "rank": 8, "update_proj_gap": 10, "scale": 0.25, "proj_type": proj_type}],
            lr=1e-2,
            eps=1e-8,
            weight_decay=0.0,
            no_deprecation_warning=True,
        ),
        w0,
        batches,
    )
    ours = run(
        lambda p: osd.AdamW(
            [{"params": p, "rank": 8, "projector": "svd", "update_gap": 10, "side": side, "correction": "none"}],
            lr=1e-2,
            weight_decay=0.0,
        ),
        w0,
        batches,
    )
    assert_close_traj(ours, ref, 1e-5)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_svd_adafactor_equals_galore_torch(shape):
    galore_torch = pytest.importorskip("galore_torch")
    w0, batches = quadratic_problem(shape, STEPS)
    kw = dict(lr=1e-2, beta1=0.9, weight_decay=0.0)
    ref = run(
        lambda p: galore_torch.GaLoreAdafactor(
            [{"params": p, "rank": 8, "update_proj_gap": 10, "scale": 0.25, "proj_type": "std"}],
            relative_step=False,
            scale_parameter=False,
            warmup_init=False,
            **kw,
        ),
        w0,
        batches,
    )
    ours = run(
        lambda p: osd.Adafactor(
            [{"params": p, "rank": 8, "projector": "svd", "update_gap": 10, "correction": "none"}], **kw
        ),
        w0,
        batches,
    )
    assert_close_traj(ours, ref, 1e-5)


class ReferenceOSD:
    """An independent re-implementation of the reference OSD step (background.md §3): P from
    the SVD of the first gradient; then, every step, GaLore's AdamW update with the current P
    and afterwards one torch.optim.AdamW step on P, whose gradient autograd takes of
    ||P P^T G^ - G^||^2 (left) or ||G^ P^T P - G^||^2 (right), G^ = G/||G||."""

    def __init__(self, w, rank, lr, gap, scale, betas=(0.9, 0.999), eps=1e-8):
        self.w, self.rank, self.lr, self.gap, self.scale = w, rank, lr, gap, scale
        self.betas, self.eps = betas, eps
        self.t = 0
        self.right = w.shape[0] >= w.shape[1]

    def zero_grad(self):
        self.w.grad = None

    @torch.no_grad()
    def step(self):
        g = self.w.grad
        if self.t == 0:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            p0 = vh[: self.rank] if self.right else u[:, : self.rank]
            self.p = p0.clone().requires_grad_(True)
            self.p_opt = torch.optim.AdamW([self.p], lr=1 / self.gap)
        p = self.p.detach()
        r = g @ p.T if self.right else p.T @ g
        if self.t == 0:
            self.m, self.v = torch.zeros_like(r), torch.zeros_like(r)
        self.t += 1
        b1, b2 = self.betas
        self.m.mul_(b1).add_(r, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(r, r, value=1 - b2)
        step_size = self.lr * math.sqrt(1 - b2**self.t) / (1 - b1**self.t)
        d = self.m / (self.v.sqrt() + self.eps)
        back = d @ p if self.right else p @ d
        self.w.add_(back * self.scale, alpha=-step_size)
        if self.t > 1:
            gn = g / g.norm()
            with torch.enable_grad():
                self.p_opt.zero_grad()
                P = self.p
                recon = gn @ P.T @ P if self.right else P @ P.T @ gn
                ((recon - gn) ** 2).sum().backward()
            self.p_opt.step()


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_online_pca_adamw_equals_reference(shape):
    w0, batches = quadratic_problem(shape, STEPS)
    ref = run(lambda p: ReferenceOSD(p[0], rank=8, lr=1e-2, gap=10, scale=0.25), w0, batches)
    ours = run(
        lambda p: osd.AdamW([{"params": p, "rank": 8, "update_gap": 10, **OSD_PAPER}], lr=1e-2, weight_decay=0.0),
        w0,
        batches,
    )
    assert_close_traj(ours, ref, 1e-5)


def test_loss_fn_is_differentiable():
    w0, batches = quadratic_problem((4, 3), 1)
    w = w0.clone().requires_grad_(True)
    loss_fn(w, batches[0]).backward()
    assert w.grad.shape == w.shape
