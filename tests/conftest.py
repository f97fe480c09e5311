"""Shared fixtures: the reference tensors recorded from the published implementations.

They ship in ``tests/reference`` (a verbatim copy of the project's ``shared/reference``, so that a
clone anywhere runs the tests; ``test_reference_copy.py`` checks the copy against ``shared/`` where
it sits beside the checkout)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
SHARED_REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"  # the source


def reference_file(name: str) -> Path:
    path = REFERENCE_DIR / name
    assert path.exists(), f"reference tensors missing: {path}"
    return path


@pytest.fixture(scope="session")
def tiny_weights_path() -> Path:
    return reference_file("dit_tiny_weights.safetensors")


@pytest.fixture(scope="session")
def reference_outputs() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(reference_file("dit_reference_outputs.safetensors")))


@pytest.fixture(scope="session")
def tiny_config() -> dict:
    from safetensors import safe_open

    with safe_open(str(reference_file("dit_tiny_weights.safetensors")), "pt") as f:
        return json.loads(f.metadata()["config"])


@pytest.fixture()
def tiny_model(tiny_weights_path):
    import ditas

    return ditas.load_dit(tiny_weights_path)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
