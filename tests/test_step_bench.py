"""bench/step.py's floor rows (``products ...``) do the matrix products of the steps they
stand under, no more and no fewer: their matmul FLOPs equal those of ``osd.AdamW``'s steps
(SVD without a correction: exactly; the OSD paper's online PCA: all but its r x r terms)."""

from __future__ import annotations

import warnings

import pytest
import torch
from bench_loader import bench_module
from torch.utils.flop_counter import FlopCounterMode


@pytest.fixture(scope="module")
def step_bench():
    with bench_module("step") as module:
        yield module


def _step_flops(bench, method: str, shapes, rank: int) -> int:
    params = [torch.nn.Parameter(torch.randn(s, device="meta")) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = bench.build(method, params, rank)
    opt.step()  # the first step: state and the initial bases
    with FlopCounterMode(display=False) as counter:
        opt.step()
    return counter.get_total_flops()


def test_products_floor_matches_the_steps_products(step_bench):
    shapes, rank = step_bench.llama_shapes(64, 160, 2), 8
    mnr = sum(m * n * rank for m, n in shapes)
    svd = _step_flops(step_bench, "products svd", shapes, rank)
    paper = _step_flops(step_bench, "products online_pca paper", shapes, rank)
    assert (svd, paper) == (2 * 2 * mnr, 3 * 2 * mnr)  # 2 FLOPs a multiply-add
    assert _step_flops(step_bench, "osd AdamW svd", shapes, rank) == svd
    r_squared = sum(2 * rank * rank * (min(m, n) + max(m, n)) for m, n in shapes)  # R R^T, B (R R^T) and the like
    osd_paper = _step_flops(step_bench, "osd AdamW online_pca paper", shapes, rank)
    assert paper < osd_paper <= paper + 2 * r_squared
