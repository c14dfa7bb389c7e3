"""Full-rank corrections (osd.corrections): Fira's equals pytorch_optimizer.Fira with the
projector Fira uses (SVD) and Adam, APOLLO's equals its paper (an independent
re-implementation: pytorch_optimizer's APOLLO differs from the paper), and every correction
composes with every projector and rule, keeping the engine's properties (a stack equals its
members one at a time, state in the state dict)."""

import pytest
import torch
from conftest import SHAPES, assert_close_traj, quadratic_problem, run

import osd
import osd.memory

STEPS = 12


def _fira_reference(p, gap, side, wd=0.0):
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    group = {"params": p, "rank": 8, "update_proj_gap": gap, "scale": 0.25, "projection_type": side}
    return pytorch_optimizer.Fira([group], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)


def _ours(w0, batches, weight_decay=0.0, **group):
    """osd.AdamW, lr 1e-2, with one rank-8 SVD-projector group with ``group``'s options."""
    return run(
        lambda p: osd.AdamW(
            [{"params": p, "rank": 8, "projector": "svd", **group}], lr=1e-2, weight_decay=weight_decay
        ),
        w0,
        batches,
    )


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("gap", [1, 100], ids=["refresh-every-step", "one-basis"])
def test_fira_equals_pytorch_optimizer(shape, gap):
    """To 1e-5 over 12 steps: with a refresh at every step (the SVD basis, the norm limiter's
    state across refreshes) and with one basis (moments and limiter over steps).
    pytorch_optimizer refreshes at its 1-based steps 1, T, 2T, ... and we at 0-based 0, T,
    2T, ..., so a gap in between would compare different schedules."""
    w0, batches = quadratic_problem(shape, STEPS)
    ref = run(lambda p: _fira_reference(p, gap, "std"), w0, batches)
    ours = _ours(w0, batches, update_gap=gap, scale=0.25, correction="fira")
    assert_close_traj(ours, ref, 1e-5)
    without = _ours(w0, batches, update_gap=gap, correction="none")
    assert ((without[-1] - ref[-1]).norm() / ref[-1].norm()).item() > 1e-3  # the term matters here


@pytest.mark.parametrize("side,projection_type", [("left", "left"), ("right", "right"), ("both", "full")])
def test_fira_sides_equal_pytorch_optimizer(side, projection_type):
    w0, batches = quadratic_problem((32, 24), STEPS)
    ref = run(lambda p: _fira_reference(p, 100, projection_type), w0, batches)
    ours = _ours(w0, batches, update_gap=100, side=side, correction="fira")
    assert_close_traj(ours, ref, 1e-5)


def test_fira_weight_decay_close_to_pytorch_optimizer():
    """pytorch_optimizer decays after the update, we before (as torch.optim.AdamW): the
    difference per step is lr^2 wd times the update."""
    w0, batches = quadratic_problem((48, 24), STEPS)
    ref = run(lambda p: _fira_reference(p, 100, "std", wd=0.1), w0, batches)
    ours = _ours(w0, batches, weight_decay=0.1, update_gap=100, correction="fira")
    assert_close_traj(ours, ref, 1e-3)  # measured: at most 2.1e-4


@pytest.mark.parametrize("correction", ["fira", "apollo", "apollo_mini"])
@pytest.mark.parametrize("projector", ["online_pca", "svd", "random"])
@pytest.mark.parametrize("cls", [osd.AdamW, osd.AdamW8bit, osd.Lion, osd.Adafactor, osd.SGD])
def test_every_correction_composes_with_every_projector_and_rule(projector, cls, correction):
    """Every correction x projector x rule trains, a stack equals its members one at a
    time, and the limiter's state is one fp32 number per matrix, in the state dict."""
    torch.manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(256, 128) / 16) for _ in range(3)]
    xs = [torch.randn(128, 32) for _ in range(6)]

    def train(params, one_at_a_time):
        group = {"params": params, "rank": 8, "projector": projector, "update_gap": 3, "correction": correction}
        opt = cls([group], lr=1e-3)
        for x in xs:
            opt.zero_grad()
            sum(((w @ x) ** 2).mean() for w in params).backward()
            if one_at_a_time:
                for p in params:
                    opt.update([p], [p.grad])
            else:
                opt.step()
        return opt

    opt = train(ws, False)
    copies = [torch.nn.Parameter(w0.detach().clone()) for w0 in ws]
    torch.manual_seed(0)
    ref_ws = [torch.nn.Parameter(torch.randn(256, 128) / 16) for _ in range(3)]
    train(ref_ws, True)
    for w, ref in zip(ws, ref_ws, strict=True):
        assert torch.isfinite(w).all()
        torch.testing.assert_close(w, ref, rtol=1e-5, atol=1e-6)
    state = opt.state[ws[0]]
    assert state["correction_norm"].shape == () and state["correction_norm"].dtype == torch.float32
    assert "correction_norm" in opt.state_dict()["state"][0]
    del copies


def test_fira_moves_the_residual_directions():
    """Without a correction the update lies in the basis's span; with Fira it does not."""
    torch.manual_seed(0)
    moved = {}
    for correction in ("none", "fira"):
        w = torch.nn.Parameter(torch.zeros(64, 32))
        opt = osd.AdamW([{"params": [w], "rank": 4, "projector": "svd", "correction": correction}], lr=1e-2)
        w.grad = torch.randn(64, 32)
        opt.step()
        basis = opt.state[w]["basis_cols"]
        moved[correction] = (w.detach() - w.detach() @ basis @ basis.T).norm().item()
    assert moved["none"] < 1e-6 < moved["fira"]


def test_unknown_correction_is_refused():
    w = torch.nn.Parameter(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="unknown correction 'lora'; valid: none, fira, apollo, apollo_mini"):
        osd.AdamW([{"params": [w], "rank": 2, "correction": "lora"}])


def _apollo_reference(w0, batches, rank, scale, tensor_wise, lr=1e-2, betas=(0.9, 0.999), eps=1e-8):
    """APOLLO as its paper and official code write it (an independent re-implementation):
    Adam on the projected gradient R only estimates, per channel (or per tensor), the ratio
    ||m / (sqrt(v) + eps)|| / ||R||; the update is the whole gradient times that ratio,
    norm-growth limited, times scale and Adam's step size. The basis: the top-r singular
    vectors of the first gradient on the smaller side, kept."""
    from conftest import loss_fn

    w = w0.clone().requires_grad_()
    m = v = basis = previous = None
    traj = []
    for t, batch in enumerate(batches, 1):
        w.grad = None
        loss_fn(w, batch).backward()
        g = w.grad.detach()
        tall = g.shape[0] >= g.shape[1]
        h = g if tall else g.T  # right projection of the tall form
        if basis is None:
            basis = torch.linalg.svd(h, full_matrices=False)[2][:rank].T
            m, v = torch.zeros(h.shape[0], rank), torch.zeros(h.shape[0], rank)
        r = h @ basis
        m.lerp_(r, 1 - betas[0])
        v.mul_(betas[1]).addcmul_(r, r, value=1 - betas[1])
        step_size = lr * (1 - betas[1] ** t) ** 0.5 / (1 - betas[0] ** t)
        direction = m / (v.sqrt() + eps)
        if tensor_wise:
            phi = direction.norm() / (r.norm() + 1e-8)
        else:
            phi = direction.norm(dim=1, keepdim=True) / (r.norm(dim=1, keepdim=True) + 1e-8)
        scaled = h * phi
        norm = scaled.norm()
        if previous is not None:
            limiter = max(norm / (previous + 1e-8), 1.01) / 1.01
            scaled, norm = scaled / limiter, norm / limiter
        previous = norm
        with torch.no_grad():
            w -= step_size * scale * (scaled if tall else scaled.T)
        traj.append(w.detach().clone())
    return traj


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("kind", ["apollo", "apollo_mini"])
def test_apollo_equals_its_paper(shape, kind):
    """With a kept SVD basis (the paper uses a random one; the correction does not care which),
    osd's APOLLO follows the paper's update to 1e-5 over 12 steps, channel-wise and
    tensor-wise (Mini)."""
    w0, batches = quadratic_problem(shape, STEPS)
    scale = 1.0 if kind == "apollo" else 128**0.5
    ref = _apollo_reference(w0, batches, rank=8, scale=scale, tensor_wise=kind == "apollo_mini")
    ours = _ours(w0, batches, update_gap=100, scale=scale, correction=kind)
    assert_close_traj(ours, ref, 1e-5)


def test_apollo_update_is_full_rank_and_leaves_the_gradient_alone():
    """APOLLO's update is the scaled gradient, full rank; the caller's gradient is unchanged."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(64, 32))
    opt = osd.AdamW(
        [{"params": [w], "rank": 4, "projector": "random", "correction": "apollo"}], lr=1e-2, weight_decay=0
    )
    grad = torch.randn(64, 32)
    w.grad = grad.clone()
    opt.step()
    assert torch.equal(w.grad, grad)
    assert torch.linalg.matrix_rank(w.detach()).item() == 32
    # channel-wise: each row of the update is the gradient's row times one positive number
    ratio = w.detach() / -grad
    assert (ratio > 0).all() and torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4)


def test_memory_estimate_counts_the_correction():
    """One fp32 norm per matrix of state (what the optimizer holds) and more step temporaries."""
    base = osd.memory.estimate("llama_60m", optimizer="osd", rank=128)
    fira = osd.memory.estimate("llama_60m", optimizer="osd", rank=128, correction="fira")
    matrices = 8 * 7  # llama_60m: 8 layers of 7 attention/MLP matrices
    assert fira.optimizer_state - base.optimizer_state == 4 * matrices
    assert fira.total > base.total
    with pytest.raises(ValueError, match="unknown correction 'lora'; valid: none, fira, apollo, apollo_mini"):
        osd.memory.estimate("llama_60m", optimizer="osd", rank=128, correction="lora")
    with pytest.raises(ValueError, match="a correction is for galore/osd subspace updates, not adamw"):
        osd.memory.estimate("llama_60m", optimizer="adamw", correction="fira")


@pytest.mark.parametrize("correction", ["fira", "apollo"])
def test_a_zero_learning_rate_step_is_no_step(correction):
    """A warmup's first step has lr 0: the weights stay, nothing is NaN, and later steps train."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 32))
    start = w.detach().clone()
    opt = osd.AdamW([{"params": [w], "rank": 4, "projector": "svd", "correction": correction}], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: t / 3)
    for t in range(4):
        w.grad = torch.randn(64, 32)
        opt.step()
        sched.step()
        if t == 0:
            assert torch.equal(w.detach(), start)
            assert "correction_norm" not in opt.state[w]
    assert torch.isfinite(w).all() and not torch.equal(w.detach(), start)
    assert torch.isfinite(opt.state[w]["correction_norm"])
