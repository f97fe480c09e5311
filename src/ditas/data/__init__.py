"""Datasets that ship inside installed wheels (no downloads)."""

from .digits import DigitSplit, load_digits, mnist_5k_path

__all__ = ["DigitSplit", "load_digits", "mnist_5k_path"]
