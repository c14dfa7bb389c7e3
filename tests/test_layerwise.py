"""Per-layer (in-backward) updates: equal to ordinary stepping, one step per optimizer step
whatever the accumulation, schedulers and checkpoints work, gradients are freed."""

import io

import pytest
import torch
from torch import nn

import osd


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 32)
        self.attn = nn.Linear(32, 64)
        self.mlp = nn.Linear(64, 32)
        self.head = nn.Linear(32, 50)

    def forward(self, tokens):
        h = self.embed(tokens)
        return self.head(self.mlp(torch.relu(self.attn(h))))


PERM = torch.randperm(50, generator=torch.Generator().manual_seed(1))


def batches(n, micro, seed=0):
    """Sequences that follow a fixed permutation (next = PERM[current]): learnable, so the
    loss falls quickly."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        steps = []
        for _ in range(micro):
            seq = [torch.randint(0, 50, (4,), generator=gen)]
            for _ in range(7):
                seq.append(PERM[seq[-1]])
            steps.append(torch.stack(seq, dim=1))
        out.append(steps)
    return out


def loss_of(model, tokens):
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, 50), tokens[:, 1:].reshape(-1))


def make(projector, cls=osd.AdamW, **group):
    model = Net()
    groups = osd.param_groups(model, rank=8, projector=projector, update_gap=3, **group)
    return model, cls(groups, lr=1e-2)


def train(model, opt, data, sched=None):
    lrs = []
    for micro_batches in data:
        opt.zero_grad()
        for tokens in micro_batches:
            (loss_of(model, tokens) / len(micro_batches)).backward()
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
        if sched is not None:
            sched.step()
    return lrs


def rel(a, b):
    return max(((x - y).norm() / y.norm()).item() for x, y in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("projector", ["svd", "random", "online_pca"])
def test_equals_ordinary_stepping_without_accumulation(projector):
    data = batches(8, 1)
    ref_model, ref_opt = make(projector)
    train(ref_model, ref_opt, data)
    model, inner = make(projector)
    train(model, osd.Layerwise(inner), data)
    assert rel(model, ref_model) < 1e-6


@pytest.mark.parametrize("cls", [osd.AdamW, osd.Lion, osd.Adafactor, osd.AdamW8bit])
def test_equals_ordinary_accumulation_random_projection(cls):
    """Random bases need no gradient, so projected accumulation is exact (linearity), where
    no full-rank correction needs the full gradient."""
    data = batches(7, 4)
    ref_model, ref_opt = make("random", cls, correction="none")
    train(ref_model, ref_opt, data)
    model, inner = make("random", cls, correction="none")
    train(model, osd.Layerwise(inner, accumulation_steps=4), data)
    assert rel(model, ref_model) < 1e-5


@pytest.mark.parametrize("correction", ["none", "fira"])
@pytest.mark.parametrize("projector", ["svd", "online_pca"])
def test_close_to_ordinary_accumulation(projector, correction):
    """SVD refreshes use the first micro-batch gradient and the online-PCA step the last,
    so with accumulation 4 training is close to, not equal to, ordinary accumulation:
    without a correction the loss curves agree (measured: at most 0.6% (svd) and 4.1%
    (online_pca) apart at any step) while the weights drift apart slowly (different but
    equally good bases). Fira's residual comes from the last micro-batch, times 4: both
    runs fall to a few percent of the first loss, and the curves stay within 11% of the
    first loss of each other (measured 10.3% and 10.4%; with the last micro-batch's residual
    as it is, the per-layer run ended 8x (svd) and 34x (online_pca) higher)."""
    data = batches(30, 4)
    test = batches(1, 1, seed=9)[0][0]
    curves = []
    for wrap in (False, True):
        model, opt = make(projector, correction=correction)
        if wrap:
            opt = osd.Layerwise(opt, accumulation_steps=4)
        curve = []
        for step in data:
            train(model, opt, [step])
            with torch.no_grad():
                curve.append(loss_of(model, test).item())
        curves.append(curve)
    ordinary, layerwise = curves
    if correction == "none":
        assert ordinary[-1] < 0.6 * ordinary[0]  # it learns
        for a, b in zip(ordinary, layerwise, strict=True):
            assert abs(a - b) / a < 0.05, (a, b)
    else:
        assert max(ordinary[-1], layerwise[-1]) < 0.1 * ordinary[0], (ordinary[-1], layerwise[-1])
        for a, b in zip(ordinary, layerwise, strict=True):
            assert abs(a - b) < 0.11 * ordinary[0], (a, b)


def test_one_update_per_step_and_scheduler_lr():
    data = batches(6, 3)
    model, inner = make("online_pca")
    opt = osd.Layerwise(inner, accumulation_steps=3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    lrs = train(model, opt, data, sched)
    assert lrs == pytest.approx([1e-2 / (1 + s) for s in range(6)])
    assert all(opt.state[p]["step"] == 6 for g in opt.param_groups for p in g["params"])
    assert all(p.grad is None for p in model.parameters())


def test_wrong_number_of_micro_batches():
    model, inner = make("svd")
    opt = osd.Layerwise(inner, accumulation_steps=2)
    loss_of(model, batches(1, 1)[0][0]).backward()
    with pytest.raises(RuntimeError, match=r"step\(\) after \[1\] micro-batch backward\(s\) but accumulation_steps=2"):
        opt.step()


def test_global_clipping_is_refused_and_per_param_clipping_works():
    model, inner = make("svd")
    with pytest.raises(RuntimeError, match="global-norm gradient clipping is impossible"):
        osd.Layerwise(inner).clip_grad_norm_(1.0)
    with pytest.raises(ValueError, match="already wrapped by a Layerwise"):
        osd.Layerwise(inner)
    model, inner = make("svd")
    opt = osd.Layerwise(inner, max_grad_norm=1e-3)
    before = model.embed.weight.detach().clone()
    train(model, opt, batches(1, 1))
    # Adam's first step is ~lr*sign whatever the scale; the check is that it runs and moves
    assert not torch.equal(before, model.embed.weight)
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        osd.Layerwise(make("svd")[1], max_grad_norm=0)
    with pytest.raises(ValueError, match="accumulation_steps must be a positive integer"):
        osd.Layerwise(make("svd")[1], accumulation_steps=0)
    with pytest.raises(TypeError, match="Layerwise wraps an osd optimizer"):
        osd.Layerwise(torch.optim.AdamW(model.parameters()))


def test_lockstep_resume():
    data = batches(10, 2)
    model, inner = make("online_pca")
    opt = osd.Layerwise(inner, accumulation_steps=2)
    train(model, opt, data[:4])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    clone, clone_inner = make("online_pca")
    clone.load_state_dict(model.state_dict())
    clone_opt = osd.Layerwise(clone_inner, accumulation_steps=2)
    clone_opt.load_state_dict(sd)
    assert clone_opt.param_groups is clone_inner.param_groups
    train(model, opt, data[4:])
    train(clone, clone_opt, data[4:])
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)


def _peak_live_grad_bytes(model, opt, data):
    """Largest total of live .grad bytes seen after any gradient is accumulated."""
    peak = 0

    def track(_):
        nonlocal peak
        peak = max(peak, sum(p.grad.nbytes for p in model.parameters() if p.grad is not None))

    handles = [p.register_post_accumulate_grad_hook(track) for p in model.parameters()]
    train(model, opt, data)
    for h in handles:
        h.remove()
    return peak


def test_gradient_memory_drops():
    data = batches(2, 1)
    model, opt = make("online_pca")
    ordinary = _peak_live_grad_bytes(model, opt, data)
    model, inner = make("online_pca")
    layerwise = _peak_live_grad_bytes(model, osd.Layerwise(inner), data)
    total = sum(p.numel() * 4 for p in model.parameters())
    largest = max(p.numel() * 4 for p in model.parameters())
    assert ordinary == total
    # hooks run in registration order: ours frees first, so at most one gradient is alive
    assert layerwise <= largest, (layerwise, largest, total)
