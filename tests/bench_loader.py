"""A benchmark script of bench/ imported as a module, for the tests of its parts."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path


@contextlib.contextmanager
def bench_module(name: str):
    """bench/<name>.py as the module ``bench_<name>``, registered in ``sys.modules`` while it
    is in use (dataclasses look their module up while it executes)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
