"""Trains the digit classifier of the domain evaluator and writes it to the package assets.

    .venv/bin/python benchmarks/train_digit_classifier.py [--out src/ditas/assets/digit_classifier]

Trains on the bundled MNIST digits minus the held-out test split (last 50 per class), prints the
train/test accuracy, and saves config.json (with the report) + model.safetensors atomically.
"""

from __future__ import annotations

import argparse
import json

import torch

from ditas.evaluation.digits import DEFAULT_CLASSIFIER_DIR, save_classifier, train_digit_classifier


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True,
                   help=f"new output folder (the shipped classifier is {DEFAULT_CLASSIFIER_DIR}; copy over it by hand)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, report = train_digit_classifier(epochs=args.epochs, seed=args.seed)
    report["threads"] = args.threads
    save_classifier(model, args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
