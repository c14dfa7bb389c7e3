"""osd optimizers on FSDP2 (``fully_shard``, rows sharded): 2 and 4 CPU processes (gloo).

One launch of tests/fsdp_worker.py per world size trains every case (projector x rule x
storage, the corrections, both-sided projection with retraction and transport) sharded,
beside the same model in one process, and resumes each from every rank's state_dict. See
the worker for what each number is.

Tolerances: gathered weights within 1e-4 relative of one process, state within 1e-3, or
within 10x of what one process gets by summing the gradient in as many pieces as there are
ranks (rounding alone), whichever is larger: online PCA with both sides projected amplifies
rounding to 7e-4 in the weights and 2e-2 in the state after 6 steps in one process alone.
Replicated state is bitwise equal on every rank; a resumed run is bitwise the uninterrupted
one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fsdp_worker import CASES
from launcher import launch

WORKER = Path(__file__).with_name("fsdp_worker.py")
# 4 processes on a 2-core machine: the cases where the 4-way split differs in kind (a rank
# with one row, one with none, 8-bit blocks on 512-row shards)
FOUR_WAY = ["online_pca-adamw", "svd-adamw8bit", "random-lion", "online_pca-fira", "random-apollo_mini"]


PAIRS = [(2, case) for case in CASES] + [(4, case) for case in FOUR_WAY]
_RUNS: dict[int, dict] = {}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """world size -> the worker's results (each world size launched once, when first asked)."""

    def get(world: int) -> dict:
        if world not in _RUNS:
            root = tmp_path_factory.mktemp(f"fsdp{world}")
            cases = list(CASES) if world == 2 else FOUR_WAY
            launch(WORKER, [str(root / "results.json")], world, root, timeout=600, CASES=",".join(cases))
            _RUNS[world] = json.loads((root / "results.json").read_text())
        return _RUNS[world]

    return get


@pytest.mark.parametrize(("world", "case"), PAIRS)
def test_sharded_training_ends_where_one_process_ends(results, world, case):
    r = results(world)[case]
    assert r["weight_error"] <= max(1e-4, 10 * r["noise_weight_error"]), r
    assert r["state_error"] <= max(1e-3, 10 * r["noise_state_error"]), r
    assert r["code_mismatch"] <= 2e-3, r  # 8-bit codes: a value on a rounding boundary
    assert r["replicated_differ"] == [], r


@pytest.mark.parametrize(("world", "case"), PAIRS)
def test_resuming_from_every_ranks_state_dict_is_bitwise(results, world, case):
    assert results(world)[case]["resume_differ"] == []


@pytest.mark.parametrize("world", [2, 4])
def test_what_sharding_cannot_run_is_refused_with_the_reason(results, world):
    refused = results(world)["refused"]
    assert "Adafactor's rule reduces over each whole tensor" in refused["adafactor"]
    assert "use AdamW, AdamW8bit, Lion or SGD" in refused["adafactor"]
    assert "sharded on dim 0 over a 1-D mesh" in refused["columns"]
    assert "Shard(dim=1)" in refused["columns"]
