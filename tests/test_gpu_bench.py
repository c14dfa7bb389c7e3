"""bench/throughput.py (the GPU throughput benchmark of bench/gpu.sh) runs end to end on the
CPU in its --dry-run mode and writes the docs/data layout."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "throughput.py"


def test_throughput_dry_run_writes_rows(tmp_path, capsys):
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("bench_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        module.main(
            ["--dry-run", "--methods", "adamw_fused,osd,osd_default", "--profile", "osd", "--out", str(tmp_path)]
        )
    finally:
        sys.modules.pop(spec.name, None)
    data = json.loads((tmp_path / "throughput.json").read_text())
    rows = data["rows"]
    methods = ("adamw_fused", "osd", "osd_default")
    assert {(r["method"], r["accumulation"]) for r in rows} == {(m, a) for m in methods for a in (1, 3)}
    for r in rows:
        assert r["size"] == "llama_9m" and r["batch"] == [2, 32] and r["measured"]["tokens_per_s"] > 0
    assert "kernels_per_step" in next(r for r in rows if r["method"] == "osd" and r["accumulation"] == 1)["profile"]
    table = (tmp_path / "throughput.md").read_text()
    assert "| llama_9m | osd | a: 2 x 32 |" in table and "vs AdamW fused" in table


def test_throughput_refuses_unknown_method(capsys):
    spec = importlib.util.spec_from_file_location("bench_throughput2", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as e:
        module.parse_args(["--dry-run", "--methods", "adamw,nope"])
    assert e.value.code == 2
    assert (
        "unknown method(s) nope; valid: adamw_fused, adamw, galore, osd, adamw8bit, osd8_pl" in capsys.readouterr().err
    )
