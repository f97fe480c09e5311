"""Loads a script of ``benchmarks/`` as a module (the folder is not a package; not a test module)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str, module_name: str | None = None):
    """``benchmarks/<name>.py`` as a module, registered in ``sys.modules`` (dataclasses need that),
    loaded once per session."""
    module_name = module_name or name
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[module_name]
