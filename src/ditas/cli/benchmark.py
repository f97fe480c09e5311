"""``ditas benchmark``: the paper's experiment in one command, resumable.

The workflow (quantize each recipe once, sample every recipe x step-count row, evaluate, tabulate,
resume) is ``ditas.evaluation.benchmark.run_benchmark``; this module parses and checks the
arguments, builds its ``BenchmarkPlan`` and prints. Under ``torchrun --nproc_per_node N -m ditas
benchmark ...`` every process samples its share of each row. Changing a setting that the kept files
depend on (model, number of images, seed, guidance, any quantization option, ...) is refused with a
message, rather than mixing rows made under different settings.
"""

from __future__ import annotations

import argparse

from ..errors import DitasError


def _parse_steps(text: str) -> list[int]:
    try:
        steps = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DitasError(f"--steps must be comma-separated integers, got {text!r}") from None
    if not steps:
        raise DitasError("--steps is empty")
    if len(set(steps)) != len(steps):
        raise DitasError(f"--steps lists a step count twice: {text!r}")
    return steps


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..devices import add_device_argument
    from ..quantization.kernels import add_kernel_argument
    from ._args import add_quant_arguments

    p = sub.add_parser("benchmark", help="the paper's table: quantize, sample and evaluate recipes x step counts",
                       description="Quantizes each recipe once (data-free), samples every (recipe, steps) pair "
                                   "with the same labels and seeds, evaluates each (ADM protocol against --ref, "
                                   "or the digit evaluator), and writes DIR/results.md and DIR/results.json. "
                                   "Resumable: the same command continues a stopped run.")
    p.add_argument("--model", help="DiT checkpoint or folder (default: the embedded default model)")
    p.add_argument("--vae", help="local diffusers AutoencoderKL folder (latent-space models)")
    p.add_argument("--ref", help="reference batch .npz for the ADM protocol (e.g. VIRTUAL_imagenet256_labeled.npz)")
    p.add_argument("--domain", choices=("auto", "digits", "inception"), default="auto",
                   help="evaluation: inception (ADM protocol, needs --ref), digits (the default model's digit "
                        "evaluator); auto: inception with --ref, else digits")
    p.add_argument("--recipes", default="fp,ditas", help="comma-separated recipes, each optionally @wXaY "
                   "(default fp,ditas)")
    add_quant_arguments(p)
    p.add_argument("--num", "--num-samples", dest="num", type=int, default=10000,
                   help="images per row (default 10000: FID-10K); under torchrun write --num-samples")
    p.add_argument("--steps", default="50,100", help="comma-separated sampling step counts (default 50,100)")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="guidance scale (default 1.5, as the paper)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    p.add_argument("--seed", type=int, default=0, help="seed of the labels and noise (the same for every row)")
    p.add_argument("--batch-size", type=int, default=64, help="sampling batch size (per process)")
    add_kernel_argument(p, "the quantized models' layers")
    add_device_argument(p)
    p.add_argument("--inception", metavar="PATH", help="pytorch-fid's pt_inception-2015-12-05 state dict, for IS")
    p.add_argument("--eval-batch-size", type=int, default=50, help="images per Inception batch")
    p.add_argument("--grid-count", type=int, default=16, help="images in each row's grid (default 16)")
    p.add_argument("--overwrite", action="store_true", help="start over in a benchmark folder ditas wrote")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="benchmark folder (created, or continued)")
    return p


def plan_from_args(args: argparse.Namespace):
    """The ``BenchmarkPlan`` of the arguments, every one checked (one-line errors, before any work)."""
    from ..evaluation.benchmark import BenchmarkPlan
    from ..evaluation.protocol import resolve_domain
    from ..quantization.recipes import parse_recipes
    from ..validate import check_sampling_options
    from ._args import config_from_args

    for name in ("num", "batch_size", "eval_batch_size", "grid_count"):
        if getattr(args, name) < 1:
            raise DitasError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    steps = _parse_steps(args.steps)
    for s in steps:
        check_sampling_options(steps=s, cfg_scale=args.cfg_scale, seed=args.seed)
    specs = parse_recipes(args.recipes, args.w_bits, args.a_bits)
    configs = {label: config_from_args(args, recipe, w, a) for label, recipe, w, a in specs if recipe != "fp"}
    return BenchmarkPlan(recipes=specs, configs=configs, steps=steps, domain=resolve_domain(args.domain, args.ref),
                         model=args.model, vae=args.vae, ref=args.ref, inception=args.inception, num=args.num,
                         cfg_scale=args.cfg_scale, sampler=args.sampler, seed=args.seed, batch_size=args.batch_size,
                         kernel=args.kernel, grid_count=args.grid_count, eval_batch_size=args.eval_batch_size)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.benchmark import markdown, run_benchmark

    plan = plan_from_args(args)
    result = run_benchmark(plan, args.out, device=args.device, overwrite=args.overwrite,
                           progress=not args.no_progress, log=lambda line: print(line, flush=True))
    if result is None:  # a torchrun process other than 0: process 0 reports
        return 0
    this = result["this_run"]
    print(markdown(result["rows"], result["domain"]))
    print(f"wrote {args.out}/results.md and {args.out}/results.json ({this['sampled_rows']} rows sampled, "
          f"{this['evaluated_rows']} evaluated this run)")
    return 0
