"""CUDA: the same optimizer on GPU agrees with the CPU run (skipped without a GPU)."""

import pytest
import torch

import osd

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("projector", ["online_pca", "svd", "random"])
@pytest.mark.parametrize("cls", [osd.AdamW, osd.AdamW8bit, osd.Lion, osd.Adafactor])
def test_cuda_matches_cpu(cls, projector):
    torch.manual_seed(0)
    w0 = torch.randn(256, 128)
    grads = [torch.randn(256, 128) for _ in range(5)]
    results = []
    for device in ("cpu", "cuda"):
        w = torch.nn.Parameter(w0.clone().to(device))
        opt = cls([{"params": [w], "rank": 16, "projector": projector, "update_gap": 3}], lr=1e-3)
        for g in grads:
            w.grad = g.to(device)
            opt.step()
        results.append(w.detach().cpu())
    err = ((results[0] - results[1]).norm() / results[0].norm()).item()
    # Lion's sign(c) turns last-bit differences of near-zero entries into +-lr steps
    assert err < (1e-3 if cls is osd.Lion else 1e-4), err


def test_cuda_bf16_training_step():
    model = torch.nn.Linear(512, 1024).cuda().bfloat16()
    opt = osd.AdamW(osd.param_groups(torch.nn.ModuleDict({"mlp": model}), rank=64))
    x = torch.randn(8, 512, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        opt.zero_grad()
        model(x).float().square().mean().backward()
        opt.step()
    assert torch.isfinite(model.weight).all()


@pytest.mark.parametrize(
    "cls,group",
    [
        (osd.AdamW, {}),
        (osd.AdamW, {"projector": "svd"}),
        (osd.AdamW8bit, {"proj_optimizer": "adam8bit"}),
        (osd.Lion, {"transport": True}),
        (osd.Adafactor, {"proj_dtype": "float32"}),
    ],
)
def test_cuda_steady_state_step_never_synchronises(cls, group):
    """torch.cuda.set_sync_debug_mode('error') raises on any device-to-host synchronisation."""
    torch.manual_seed(0)
    mats = [torch.nn.Parameter(torch.randn(256, 128, device="cuda", dtype=torch.bfloat16)) for _ in range(3)]
    plain = [torch.nn.Parameter(torch.randn(4096, device="cuda", dtype=torch.bfloat16))]
    opt = cls([{"params": plain}, {"params": mats, "rank": 16, "update_gap": 100, **group}], lr=1e-3)
    for p in mats + plain:
        p.grad = torch.randn_like(p)
    opt.step()  # the initial SVD may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p).all() for p in mats + plain)


def test_cuda_bf16_projection_close_to_fp32():
    torch.manual_seed(0)
    w0, grads = torch.randn(512, 256, device="cuda"), [torch.randn(512, 256, device="cuda") for _ in range(20)]
    out = []
    for proj_dtype in ("float32", "bfloat16"):
        w = torch.nn.Parameter(w0.clone())
        opt = osd.AdamW([{"params": [w], "rank": 32, "proj_dtype": proj_dtype}], lr=1e-3)
        for g in grads:
            w.grad = g
            opt.step()
        out.append(w.detach())
    assert ((out[0] - out[1]).norm() / out[0].norm()).item() < 1e-2


def test_cuda_bf16_basis_step_restores_matmul_precision():
    """The online-PCA basis step of bf16 gradients runs its fp32 products with TF32 and
    leaves the global float32 matmul precision as it found it."""
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 128, bias=False).cuda().bfloat16()
    opt = osd.AdamW([{"params": [model.weight], "rank": 16, "update_gap": 2}], lr=1e-3)
    before = torch.get_float32_matmul_precision()
    for _ in range(3):
        model(torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert torch.get_float32_matmul_precision() == before
    assert torch.isfinite(opt.state[model.weight]["basis_rows"]).all()
