"""``ditas eval``: domain metrics of class-conditional digit samples from an ``.npz`` file."""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

import numpy as np

from ..errors import DitasError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="class accuracy, domain FID, precision and recall of digit samples",
        description="Evaluates class-conditional digit samples (an .npz with uint8 NHWC images under "
                    "'arr_0' and int labels under 'labels', as 'ditas sample --npz' writes) with the "
                    "shipped digit classifier: accuracy of the requested class, Fréchet distance in the "
                    "classifier's feature space against real held-out digits, and k-NN precision/recall.")
    p.add_argument("samples", help="samples .npz file")
    p.add_argument("--out", help="also write the metrics as JSON to this (new) file")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--reference", choices=("test", "all"), default="test",
                   help="real digits to compare with: the 500 held-out digits (default) or all 5,000")
    p.add_argument("--classifier", help="a digit classifier folder (default: the shipped one)")
    p.add_argument("-k", type=int, default=3, help="neighbours of the precision/recall manifolds (default 3)")
    return p


def read_samples(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    path = Path(path)
    if not path.exists():
        raise DitasError(f"{path}: no such file")
    if path.is_dir():
        raise DitasError(f"{path}: is a folder, expected an .npz file")
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            missing = [k for k in ("arr_0", "labels") if k not in keys]
            if missing:
                raise DitasError(f"{path}: missing key(s) {', '.join(missing)} (found: "
                                 f"{', '.join(sorted(keys)) or 'none'}); expected 'arr_0' images and 'labels'")
            images, labels = data["arr_0"], data["labels"]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise DitasError(f"{path}: not a readable .npz file ({exc})") from None
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DitasError(f"{path}: 'arr_0' has shape {images.shape}; expected (N, H, W, 3) uint8 images")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DitasError(f"{path}: 'labels' has shape {labels.shape}; expected ({len(images)},), one per image")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DitasError(f"{path}: 'labels' must be integers, got {labels.dtype}")
    return images, labels


def format_table(metrics: dict) -> str:
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


def run(args: argparse.Namespace) -> int:
    from ..evaluation.digits import evaluate_digit_samples, load_classifier
    from ..fileio import atomic_file, check_new_file, json_text

    if args.out:
        check_new_file(args.out, args.overwrite)  # fail before the work
    if args.k < 1:
        raise DitasError(f"-k must be at least 1, got {args.k}")
    images, labels = read_samples(args.samples)
    if len(images) <= args.k:
        raise DitasError(f"{args.samples}: {len(images)} samples; precision/recall with -k {args.k} need more than "
                         f"{args.k}")
    classifier = load_classifier(args.classifier)
    metrics = evaluate_digit_samples(images, labels, classifier=classifier, reference=args.reference, k=args.k)
    metrics["samples_file"] = str(args.samples)
    print(format_table(metrics))
    if args.out:
        with atomic_file(args.out) as tmp:
            tmp.write_text(json_text(metrics, str(args.out)))
        print(f"metrics written to {args.out}")
    return 0
