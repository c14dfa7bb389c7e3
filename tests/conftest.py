import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SHAPES = {"tall": (48, 24), "wide": (24, 48), "square": (32, 32)}
# The subspace options of the OSD paper and its reference code (AdamW on P, no full-rank
# correction); the library's defaults are SGD on P and Fira's correction (README).
OSD_PAPER = {"proj_optimizer": "adamw", "correction": "none"}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def quadratic_problem(shape, steps, seed=0, dtype=torch.float32):
    """A fixed stream of (X, Y) batches for the loss ||W X - Y||^2 / batch: every optimizer
    under comparison sees the same gradients as a function of W."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    w0 = torch.randn(m, n, generator=gen, dtype=dtype) / n**0.5
    batches = [(torch.randn(n, 64, generator=gen), torch.randn(m, 64, generator=gen)) for _ in range(steps)]
    return w0, batches


def loss_fn(w, batch):
    x, y = batch
    return ((w.float() @ x - y) ** 2).sum() / x.shape[1]


def run(make_opt, w0, batches, params_per_opt=1):
    """Train copies of ``w0`` with the optimizer that ``make_opt([param])`` returns;
    return the list of parameter snapshots after each step."""
    w = torch.nn.Parameter(w0.clone())
    opt = make_opt([w])
    traj = []
    for batch in batches:
        opt.zero_grad()
        loss_fn(w, batch).backward()
        opt.step()
        traj.append(w.detach().clone())
    return traj


def assert_close_traj(a, b, rtol):
    for step, (x, y) in enumerate(zip(a, b, strict=True)):
        err = ((x - y).norm() / y.norm()).item()
        assert err <= rtol, f"step {step}: relative difference {err:.2e} > {rtol:.0e}"
