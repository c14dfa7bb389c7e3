"""Projector properties: closed-form PCA gradient = autograd, orthonormal bases, online PCA
tracks a rotating subspace, SVD bases change only at refreshes."""

import pytest
import torch

import osd
from osd import projectors


@pytest.mark.parametrize("orth_reg", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(20, 30), (30, 20)])
def test_pca_grad_equals_autograd(shape, orth_reg):
    x = torch.randn(*shape, dtype=torch.float64)
    basis = torch.randn(shape[0], 5, dtype=torch.float64, requires_grad=True)
    eye = torch.eye(5, dtype=torch.float64)
    loss = ((basis @ basis.T @ x - x) ** 2).sum() + orth_reg * ((basis.T @ basis - eye) ** 2).sum()
    (expected,) = torch.autograd.grad(loss, basis)
    got = projectors.pca_grad(basis.detach(), x, orth_reg=orth_reg)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # the shortcut the optimizer uses: C = B^T X passed in
    got_c = projectors.pca_grad(basis.detach(), x, c=basis.detach().T @ x, orth_reg=orth_reg)
    torch.testing.assert_close(got_c, expected, rtol=1e-10, atol=1e-10)
    # and X given as x_scale * x, with or without C
    for c in (None, basis.detach().T @ x / 4):  # C given for x, not X
        got_s = projectors.pca_grad(basis.detach(), x / 4, c=c, orth_reg=orth_reg, x_scale_sq=16.0)
        torch.testing.assert_close(got_s, expected, rtol=1e-10, atol=1e-10)


def _bases(opt, p):
    state = opt.state[p]
    return [state[k] for k in (projectors.ROWS, projectors.COLS) if k in state]


def _train(projector, shape, steps, side="auto", **kw):
    w = torch.nn.Parameter(torch.randn(*shape))
    opt = osd.AdamW([{"params": [w], "rank": 6, "projector": projector, "side": side, **kw}], lr=1e-3)
    snapshots = []
    for _ in range(steps):
        w.grad = torch.randn(*shape)
        opt.step()
        snapshots.append([b.clone() for b in _bases(opt, w)])
    return opt, w, snapshots


@pytest.mark.parametrize("projector", ["svd", "random", "online_pca"])
@pytest.mark.parametrize("side", ["auto", "left", "right", "both", "reverse_auto"])
def test_bases_orthonormal_and_shaped(projector, side):
    """SVD and random bases are orthonormal at every step; online PCA's at its SVD
    initialisation (afterwards only approximately: see the tracking test)."""
    shape = (24, 40)
    steps = 1 if projector == "online_pca" else 12
    opt, w, _ = _train(projector, shape, steps, side=side, update_gap=5)
    expected = {
        "auto": [(24, 6)],
        "reverse_auto": [(40, 6)],
        "left": [(24, 6)],
        "right": [(40, 6)],
        "both": [(24, 6), (40, 6)],
    }[side]
    bases = _bases(opt, w)
    assert [tuple(b.shape) for b in bases] == expected
    for b in bases:
        assert b.dtype == torch.float32
        err = (b.T @ b - torch.eye(6)).abs().max().item()
        assert err < 1e-5, err


@pytest.mark.parametrize("projector", ["svd", "random"])
def test_refresh_only_every_update_gap(projector):
    _, _, snaps = _train(projector, (16, 24), 12, update_gap=5)
    for step in range(1, 12):
        same = torch.equal(snaps[step][0], snaps[step - 1][0])
        assert same == (step % 5 != 0), step


def test_random_projection_is_deterministic_across_optimizers():
    """Data-parallel ranks build their own optimizers: the random bases must agree."""
    a = _train("random", (16, 24), 7, update_gap=3)[2]
    torch.manual_seed(123)  # a different global RNG state must not matter
    b = _train("random", (16, 24), 7, update_gap=3)[2]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x[0], y[0])


def _principal_angle(basis, target):
    """Largest principal angle (radians) between span(basis) and span(target)."""
    q, _ = torch.linalg.qr(basis)
    s = torch.linalg.svdvals(q.T @ target).clamp(max=1.0)
    return torch.arccos(s.min()).item()


@pytest.mark.parametrize("proj_optimizer", ["adamw", "sgd", "lion", "adafactor", "adam8bit"])
def test_online_pca_tracks_rotating_subspace(proj_optimizer):
    """Noisy rank-r gradients G = U_t S Z + noise whose column space U_t rotates slowly: P's
    span follows U_t, and P stays close to orthonormal."""
    gen = torch.Generator().manual_seed(0)
    m, n, r, steps = 64, 96, 4, 400
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=gen))
    drift = torch.randn(m, m, generator=gen)
    drift = (drift - drift.T) * 2e-3  # small skew-symmetric generator: a slow rotation
    rotation = torch.linalg.matrix_exp(drift)
    w = torch.nn.Parameter(torch.zeros(m, n))
    opt = osd.AdamW(
        [{"params": [w], "rank": r, "side": "left", "proj_optimizer": proj_optimizer}],
        lr=1e-3,
    )
    # the initial SVD sees a gradient from a different subspace so tracking has to happen
    w.grad = torch.randn(m, n, generator=gen)
    opt.step()
    start = _principal_angle(opt.state[w][projectors.ROWS], u)
    lr = {"sgd": 0.5}.get(proj_optimizer, 0.02)
    opt.param_groups[0]["proj_lr"] = lr
    for _ in range(steps):
        u = rotation @ u
        signal = u @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.5])) @ torch.randn(r, n, generator=gen)
        w.grad = signal + 0.1 * torch.randn(m, n, generator=gen)
        opt.step()
    basis = opt.state[w][projectors.ROWS]
    angle = _principal_angle(basis, u)
    assert start > 1.0, start
    assert angle < 0.35, f"{proj_optimizer}: largest principal angle {angle:.3f} rad after {steps} steps"
    orth = (basis.T @ basis - torch.eye(r)).abs().max().item()
    assert orth < 0.2, f"{proj_optimizer}: max |P^T P - I| = {orth:.3f}"


def test_online_pca_lr_follows_schedule():
    """proj_lr=None means (1/update_gap) * lr_t/lr_0: halving lr halves P's SGD step."""

    def p_step(lr_factor):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(8, 12))
        opt = osd.SGD([{"params": [w], "rank": 2, "proj_optimizer": "sgd", "update_gap": 4}], lr=0.1)
        grads = [torch.randn(8, 12) for _ in range(2)]
        w.grad = grads[0]
        opt.step()
        before = opt.state[w][projectors.ROWS].clone()
        opt.param_groups[0]["lr"] = 0.1 * lr_factor
        w.grad = grads[1]
        opt.step()
        return opt.state[w][projectors.ROWS] - before

    torch.testing.assert_close(p_step(0.5), 0.5 * p_step(1.0))


@pytest.mark.parametrize("side", ["left", "right", "both"])
def test_transport_rotation_within_span(side):
    """If the basis only rotates inside its span (B_new = B_old O), transport maps the first
    moment so that the full-space momentum B M is unchanged, and V as (Q*Q) V."""
    m, n, r = 12, 10, 4
    state = {"exp_avg": torch.randn(m, n), "exp_avg_sq": torch.rand(m, n)}
    old, rot = {}, {}
    for key, on, d in ((projectors.ROWS, side in ("left", "both"), m), (projectors.COLS, side in ("right", "both"), n)):
        if on:
            old[key] = torch.linalg.qr(torch.randn(d, r))[0]
            rot[key] = torch.linalg.qr(torch.randn(r, r))[0]
            state[key] = old[key] @ rot[key]
    state["exp_avg"] = projectors.project(state["exp_avg"], old)
    state["exp_avg_sq"] = projectors.project(state["exp_avg_sq"], old).abs()
    full_before = projectors.project_back(state["exp_avg"], old)
    v_before = state["exp_avg_sq"].clone()
    projectors.transport(state, old, osd.rules.Adam.moments, osd.storage.FP32)
    torch.testing.assert_close(projectors.project_back(state["exp_avg"], state), full_before, atol=1e-5, rtol=1e-5)
    expected_v = v_before.sqrt()
    if projectors.ROWS in rot:
        expected_v = rot[projectors.ROWS].T.abs() @ expected_v
    if projectors.COLS in rot:
        expected_v = expected_v @ rot[projectors.COLS].abs()
    torch.testing.assert_close(state["exp_avg_sq"], expected_v.square())


@pytest.mark.parametrize("side", ["left", "right", "both"])
def test_transport_never_raises_the_adam_ratio(side):
    """Whatever the new basis, max |M| / sqrt(V) does not grow (the variance rule (Q*Q) V
    lets it grow up to sqrt(r)-fold per move, which diverged in training), V never shrinks
    below the variance rule, and an unchanged basis leaves the moments alone."""
    m, n, r = 12, 10, 4
    gen = torch.Generator().manual_seed(0)
    old, new = {}, {}
    for key, on, d in ((projectors.ROWS, side in ("left", "both"), m), (projectors.COLS, side in ("right", "both"), n)):
        if on:
            old[key] = torch.linalg.qr(torch.randn(d, r, generator=gen))[0]
            new[key] = old[key] + 0.5 * torch.randn(d, r, generator=gen)  # not orthonormal, as online PCA's
    shape = projectors.project(torch.zeros(m, n), old).shape
    v = torch.rand(shape, generator=gen) + 0.1
    exp_avg = v.sqrt() * torch.sign(torch.randn(shape, generator=gen))  # ratio exactly 1 everywhere
    state = {**new, "exp_avg": exp_avg.clone(), "exp_avg_sq": v.clone()}
    projectors.transport(state, old, osd.rules.Adam.moments, osd.storage.FP32)
    assert (state["exp_avg"].abs() / state["exp_avg_sq"].sqrt()).max() <= 1 + 1e-5
    variance_rule = v
    for key, b in new.items():
        q2 = (b.T @ old[key]).square()
        variance_rule = q2 @ variance_rule if key == projectors.ROWS else variance_rule @ q2.T
    assert (state["exp_avg_sq"] >= variance_rule * (1 - 1e-5)).all()
    same = {**old, "exp_avg": exp_avg.clone(), "exp_avg_sq": v.clone()}
    projectors.transport(same, dict(old), osd.rules.Adam.moments, osd.storage.FP32)
    assert torch.equal(same["exp_avg"], exp_avg) and torch.equal(same["exp_avg_sq"], v)


def test_transport_off_by_default_and_changes_trajectory():
    def final(**kw):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(16, 24))
        opt = osd.AdamW([{"params": [w], "rank": 4, "update_gap": 3, **kw}], lr=1e-2)
        for _ in range(6):
            w.grad = torch.randn(16, 24)
            opt.step()
        return w.detach().clone()

    assert torch.equal(final(), final(transport=False))
    for projector in ("svd", "online_pca"):
        assert not torch.equal(final(projector=projector), final(projector=projector, transport=True))


def test_retraction_restores_orthonormality():
    w = torch.nn.Parameter(torch.randn(24, 40))
    opt = osd.AdamW([{"params": [w], "rank": 6, "retract_every": 4}], lr=1e-3)
    for step in range(1, 13):
        w.grad = torch.randn(24, 40)
        opt.step()
        basis = opt.state[w][projectors.ROWS]
        err = (basis.T @ basis - torch.eye(6)).abs().max().item()
        if (step - 1) % 4 == 0:  # the P step taken at step index 4, 8 (and the SVD at 0)
            assert err < 1e-5, (step, err)


def test_randomized_svd_finds_the_top_subspace():
    """svd_method="randomized" (O(mnr)): on matrices with a decaying spectrum the bases span
    the exact SVD's top-r subspace, the same on every call (a fixed-seed sketch) and for a
    stack as for each matrix alone."""
    gen = torch.Generator().manual_seed(0)
    m, n, r = 96, 160, 8
    spectrum = torch.cat([torch.linspace(10, 5, r), 0.05 * torch.rand(m - r, generator=gen)])
    stack = []
    for _ in range(3):
        u, _ = torch.linalg.qr(torch.randn(m, m, generator=gen))
        v, _ = torch.linalg.qr(torch.randn(n, m, generator=gen))
        stack.append(u @ torch.diag(spectrum) @ v.T)
    g = torch.stack(stack)
    exact = projectors._svd_bases(g, r, True, True)
    fast = projectors._svd_bases(g, r, True, True, "randomized")
    for key in (projectors.ROWS, projectors.COLS):
        overlap = (exact[key].mT @ fast[key]).square().sum(dim=(-2, -1)) / r  # 1: same subspace
        assert (overlap > 0.999).all(), overlap
        torch.testing.assert_close(projectors._svd_bases(g, r, True, True, "randomized")[key], fast[key])
        alone = projectors._svd_bases(g[1:2], r, True, True, "randomized")[key]
        torch.testing.assert_close(alone[0], fast[key][1], rtol=1e-4, atol=1e-5)


def test_svd_method_option_reaches_the_projectors_and_is_checked():
    w = torch.nn.Parameter(torch.randn(64, 96))
    for projector in ("svd", "online_pca"):
        opt = osd.AdamW([{"params": [w], "rank": 4, "projector": projector, "svd_method": "randomized"}])
        assert projectors.from_group(opt.param_groups[0]).svd == "randomized"
        w.grad = torch.randn(64, 96)
        opt.step()
        assert torch.isfinite(opt.state[w][projectors.ROWS]).all()
    with pytest.raises(ValueError, match="unknown svd_method 'fast'; valid: exact, randomized"):
        osd.AdamW([{"params": [w], "rank": 4, "svd_method": "fast"}])
