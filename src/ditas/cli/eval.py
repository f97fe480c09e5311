"""``ditas eval``: metrics of an ``.npz`` of samples.

Two domains share one JSON layout (``fid``, ``sfid``, ``is``, ``precision``, ``recall``,
``num_samples``, ``num_ref``, ...; a metric a domain cannot give is null):

- ``inception`` (with ``--ref``): the ADM evaluator's protocol against a reference batch, offline
  (``ditas.evaluation.adm`` and ``ditas.evaluation.inception``);
- ``digits`` (the default without ``--ref``): the digit evaluator of the embedded default model.

Both live in ``ditas.evaluation.protocol``; this module parses, checks, prints and writes.
"""

from __future__ import annotations

import argparse

from ..evaluation.protocol import DOMAINS, InceptionEvaluator, evaluate_digits, resolve_domain
from ..fileio import atomic_file, check_new_file, check_not_input, json_text


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
