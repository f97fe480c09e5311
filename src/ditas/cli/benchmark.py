"""``ditas benchmark``: the paper's experiment in one command, resumable.

For every recipe (``fp`` and quantized ones, each quantized once, data-free) and every step count,
sample ``--num`` images with the same labels and seeds, evaluate them (the ADM protocol against
``--ref``, or the digit evaluator for the embedded default model), and write

    DIR/config.json          the settings (and ditas' ownership marker)
    DIR/samples/R_sS.npz     the samples of recipe R at S steps (ADM layout: arr_0 + labels)
    DIR/evals/R_sS.json      their metrics (the ``ditas eval`` JSON layout)
    DIR/grids/R_sS.png       the first images of each row, as a grid
    DIR/ref_cache.npz        the reference batch's Inception features (ADM protocol only)
    DIR/results.json, DIR/results.md   the table: rows recipe x steps; FID, sFID, IS, precision,
                             recall, and the published DiTAS figures for the same setting

Every file is written atomically when it is finished, so a run that stops (killed, out of time)
is resumed by the same command: finished samples and evaluations are kept, a recipe is quantized
only if one of its rows still needs sampling, and a row's sampling itself resumes from its
finished shards (``diffusion.sharded.sample_npz``). Under ``torchrun --nproc_per_node N -m ditas
benchmark ...`` process 0 quantizes each recipe and sends the model to the others (one model for
every image, whatever each process's rounding), and every process samples its share of each row;
process 0 evaluates and writes the tables. Changing a setting that the kept files depend on (model,
number of images, seed, guidance, quantization options, ...) is refused with a message, rather than
mixing rows made under different settings.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import torch

from ..distributed import barrier
from ..errors import DitasError
from ..readers import Field, read_json

KIND = "ditas-benchmark"
EVAL_K = 3  # neighbours of the precision/recall manifolds in both evaluators
OWN_FILES = ["config.json", "samples", "evals", "grids", "ref_cache.npz", "results.json", "results.md"]
# What a benchmark folder may hold, by kind (``fileio.unexpected_entries``): --overwrite deletes the
# sub-folders whole, so a user file in them (or a folder where a file belongs) makes it refuse.
_ROW = r"[A-Za-z0-9_.+-]+_s[0-9]+"
_LEFT = r"\..+\.ditas-(lock|partial-.+)"  # a killed run's partial and lock files
LAYOUT = {"files": [r"config\.json", r"ref_cache\.npz", r"results\.json", r"results\.md", r"\..*"],
          "dirs": {"samples": {"files": [_ROW + r"\.npz", _LEFT],
                               "dirs": {r"\." + _ROW + r"\.shards": {"files": [r"run\.json", r"images-[0-9]+-[0-9]+\.npy",
                                                                           _LEFT]}}},
                   "evals": {"files": [_ROW + r"\.json", _LEFT]},
                   "grids": {"files": [_ROW + r"\.png", _LEFT]}}}
_ANY: dict = {"files": [r".*"]}
_ANY["dirs"] = {r".*": _ANY}
LAYOUT["dirs"][r"\..*"] = _ANY  # hidden top-level entries: --overwrite leaves them alone

# DiTAS (W4A8, DiT-XL/2, ImageNet, FID-10K, cfg 1.5), as published; keyed by (image size, steps).
PUBLISHED_DITAS_W4A8_FID = {(256, 50): 9.05, (256, 100): 6.86, (512, 50): 17.92, (512, 100): 13.45}
PUBLISHED_SOURCE = ("DiTAS (Dong and Zhang, WACV 2025), W4A8 DiT-XL/2 on ImageNet, FID-10K, cfg 1.5, as given in "
                    "the project's method notes (docs/method.md)")


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
    from .quantize import add_quant_arguments

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


# ----------------------------------------------------------------------------------------------
#                                       The run's folder
# ----------------------------------------------------------------------------------------------


def _settings(args: argparse.Namespace, domain: str) -> dict[str, Any]:
    """What the kept files depend on: a rerun must match these to continue a folder."""
    def path(p):
        return str(Path(p).resolve()) if p else None

    quant = {k: getattr(args, k) for k in ("w_bits", "a_bits", "weight_layout", "group_size", "act_granularity",
                                           "calib_labels", "calib_steps", "calib_cfg", "calib_seed", "calib_sampler",
                                           "lora_rank", "lora_rounds", "alpha", "search_weight", "search_shortlist",
                                           "bias_correction", "adaln", "search_tokens") if hasattr(args, k)}
    return {"model": path(args.model) or "default", "vae": path(args.vae), "ref": path(args.ref), "domain": domain,
            "num": args.num, "cfg_scale": args.cfg_scale, "sampler": args.sampler, "seed": args.seed,
            "kernel": args.kernel, "quantization": quant,
            "inception_head": path(args.inception)}


def _open_folder(out: Path, settings: dict, overwrite: bool) -> None:
    """Creates ``out`` with its marker, or checks that an existing one is ours and made the same way."""
    from ..fileio import MARKER_KEY, atomic_file, json_text, read_marker, refuse_foreign, unexpected_entries

    if out.exists() or out.is_symlink():
        if out.is_symlink() or not out.is_dir():
            raise DitasError(f"--out {out} exists and is not a folder; choose another name")
        marker = read_marker(out)
        if marker is None or marker.get("kind") != KIND:
            raise DitasError(f"--out {out} exists and is not a benchmark folder ditas wrote; choose another name")
        refuse_foreign(out, unexpected_entries(out, LAYOUT))
        old = _read_settings(out)
        if not overwrite:
            _check_resume_state(out)
        if overwrite:
            import shutil

            for name in OWN_FILES[1:]:
                p = out / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        elif old != settings:
            changed = sorted(k for k in set(old or {}) | set(settings) if (old or {}).get(k) != settings.get(k))
            raise DitasError(f"--out {out} holds a benchmark made with other settings ({', '.join(changed)}); "
                             "continue it with the same ones, give --overwrite to start over, or choose another name")
    else:
        out.mkdir()
    for sub in ("samples", "evals", "grids"):
        if (out / sub).is_symlink() or ((out / sub).exists() and not (out / sub).is_dir()):
            raise DitasError(f"--out {out}: {sub} is not a folder; remove it or choose another name")
        (out / sub).mkdir(exist_ok=True)
    with atomic_file(out / "config.json") as tmp:
        tmp.write_text(json_text({MARKER_KEY: {"kind": KIND, "files": OWN_FILES}, "settings": settings}))


# ----------------------------------------------------------------------------------------------
#                             Quantizing and sampling (one place each)
# ----------------------------------------------------------------------------------------------


def quantized_copy(model: torch.nn.Module, config, progress: bool, kernel: str) -> tuple[torch.nn.Module, dict]:
    """A quantized copy of the float ``model`` (data-free: the model's own calibration run)."""
    from ..api import quantize_

    qmodel = copy.deepcopy(model)
    report = quantize_(qmodel, config, progress=progress, kernel=kernel)
    return qmodel, report


def sample_row(model: torch.nn.Module, labels: torch.Tensor, steps: int, args: argparse.Namespace, vae,
               path: Path) -> None:
    """Samples the row's npz (resumable, sharded over the torchrun processes; sample i's noise
    depends on (seed, i) only, so every recipe sees the same noise)."""
    from ..diffusion.run import SamplingSettings
    from ..diffusion.sharded import sample_npz

    settings = SamplingSettings(steps=steps, cfg_scale=args.cfg_scale, sampler=args.sampler, seed=args.seed)
    sample_npz(model, labels, path, settings, batch_size=args.batch_size, vae=vae, progress=not args.no_progress,
               shard_dir=path.parent / f".{path.stem}.shards")


# ----------------------------------------------------------------------------------------------
#                                          The table
# ----------------------------------------------------------------------------------------------


def published_fid(model: torch.nn.Module, recipe: str, w_bits, a_bits, steps: int, args) -> float | None:
    """The DiTAS paper's FID for this row when the setting is the paper's (DiT-XL/2, W4A8, cfg 1.5, 10K)."""
    c = model.config
    is_xl2 = (getattr(c, "depth", None), getattr(c, "hidden_size", None), getattr(c, "patch_size", None)) == (28, 1152, 2)
    if not (recipe == "ditas" and (w_bits, a_bits) == (4, 8) and args.cfg_scale == 1.5 and args.num == 10000
            and is_xl2 and c.space == "latent"):
        return None
    return PUBLISHED_DITAS_W4A8_FID.get((c.input_size * 8, steps))


def _fmt(v, nd: int = 3) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def markdown(rows: list[dict], domain: str) -> str:
    fid_name = "FID" if domain == "inception" else "domain FID"
    head = ["recipe", "steps", fid_name, "sFID", "IS", "precision", "recall"]
    if domain == "digits":
        head.append("class acc.")
    head.append("published FID (DiTAS)")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["recipe"], str(r["steps"]), _fmt(r["fid"], 2), _fmt(r["sfid"], 2), _fmt(r["is"], 2),
                 _fmt(r["precision"]), _fmt(r["recall"])]
        if domain == "digits":
            cells.append(_fmt(r.get("class_accuracy")))
        cells.append(f"{r['published_fid']:.2f} (published)" if r.get("published_fid") is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
#                                            The run
# ----------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from ..devices import resolve_device
    from ..distributed import init_from_env, leave_together, shutdown
    from ..fileio import check_not_input, check_writable, path_lock
    from ..validate import check_problems, check_sampling_options, min_samples_problem
    from .compare import parse_recipes
    from .eval import resolve_domain
    from .quantize import config_from_args

    for name in ("num", "batch_size", "eval_batch_size", "grid_count"):
        if getattr(args, name) < 1:
            raise DitasError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    check_problems(min_samples_problem(args.num, EVAL_K))  # before sampling, not after
    steps_list = _parse_steps(args.steps)
    for s in steps_list:
        check_sampling_options(steps=s, cfg_scale=args.cfg_scale, seed=args.seed)
    specs = parse_recipes(args.recipes, args.w_bits, args.a_bits)
    configs = {label: config_from_args(args, recipe, w, a) for label, recipe, w, a in specs if recipe != "fp"}
    domain = resolve_domain(args.domain, args.ref)
    if domain == "inception":  # every process fails here, before any work, on a bad --ref or --inception
        from ..evaluation.adm import NpzImages
        from ..evaluation.inception import inception_path, load_logits_weight

        NpzImages(args.ref)
        inception_path()
        if args.inception:
            load_logits_weight(args.inception)
    out = check_writable(args.out)
    check_not_input(out, [args.model, args.vae, args.ref, args.inception])
    settings = _settings(args, domain)
    rank, world, device = init_from_env(resolve_device(args.device))
    try:
        model = _load_checked(args, out, configs, len(specs) * len(steps_list), domain, device)
        if rank == 0:
            with path_lock(out):
                _open_folder(out, settings, args.overwrite)
                barrier()
                rc = _benchmark(args, out, specs, configs, steps_list, domain, device, rank, model)
            return leave_together(rc)
        barrier()  # process 0 has checked and opened the folder
        return leave_together(_benchmark(args, out, specs, configs, steps_list, domain, device, rank, model))
    finally:
        shutdown()


def _pair_name(label: str, steps: int) -> str:
    return f"{label.replace('@', '_')}_s{steps}"


def _load_checked(args, out: Path, configs, rows: int, domain: str, device) -> torch.nn.Module:
    """The float model, once its sizes show that the run fits, before the folder is opened: every
    recipe's calibration on ``device``, the rows' samples on the disk of ``out``, and (digit
    evaluator) one row's images in RAM."""
    import shutil

    from ..loaders import load_dit
    from ..validate import calibration_memory_problem, check_problems, gib, images_memory_problem

    model = load_dit(args.model).to(device)
    check_problems(*(calibration_memory_problem(model, cfg, device) for cfg in configs.values()),
                   domain == "digits" and images_memory_problem(model, args.num, 1, f"the digit evaluator on "
                                                                                     f"--num {args.num} images"))
    c = model.config
    side = c.input_size * (8 if c.space == "latent" else 1)
    need = rows * args.num * (side * side * 3 + 8)  # uint8 RGB images and int64 labels per row
    kept = out / "samples"  # a resumed run has part of it already
    need -= sum(p.stat().st_size for p in kept.glob("*.npz") if p.is_file()) if kept.is_dir() else 0
    free = shutil.disk_usage(out.parent).free
    if need > free:
        raise DitasError(f"--num {args.num}: {rows} rows of samples need at least {gib(need)} on disk, but only "
                         f"{gib(free)} are free in {out.parent}")
    return model


def _benchmark(args, out: Path, specs, configs, steps_list, domain, device, rank, model) -> int:
    from ..diffusion.images import make_grid, save_png
    from ..evaluation.adm import NpzImages
    from ..fileio import atomic_file, json_text
    from ..quantization.checkpoint import broadcast_quantized
    from .eval import InceptionEvaluator, evaluate_digits

    progress = not args.no_progress and rank == 0
    t0 = time.perf_counter()
    if getattr(model, "quant_config", None) is not None:
        raise DitasError("--model is a quantized model: the benchmark starts from a float model")
    if domain == "digits" and (model.config.input_size, model.config.in_channels) != (32, 1):
        raise DitasError("the digit evaluator fits the embedded 32x32 digit model only; give --ref REF.npz for "
                         "the ADM protocol")
    evaluator = None
    if domain == "inception" and rank == 0:
        evaluator = InceptionEvaluator(args.ref, out / "ref_cache.npz", args.inception, str(device),
                                       args.eval_batch_size, progress)  # checks the extra and the files first
    vae = None
    if model.config.space == "latent":
        if not args.vae:
            raise DitasError("this model works in a VAE latent space: give --vae PATH")
        from ..model.vae import load_vae

        vae = load_vae(args.vae).to(device)
    labels = torch.arange(args.num) % model.num_classes  # balanced classes, the same for every row
    rows, sampled, evaluated = [], 0, 0
    for label, recipe, w_bits, a_bits in specs:
        names = {s: _pair_name(label, s) for s in steps_list}
        todo = [s for s in steps_list if not _finished_samples(out / "samples" / f"{names[s]}.npz", args.num)]
        barrier()  # every process has looked before any writes
        qmodel, qreport = model, None
        if todo and recipe != "fp":
            t1 = time.perf_counter()
            if rank == 0:  # quantized once, on process 0, and sent to the others: one model for every image
                qmodel, qreport = quantized_copy(model, configs[label], progress, args.kernel)
            qmodel = broadcast_quantized(qmodel if rank == 0 else None, args.kernel, device)
            if rank == 0:
                print(f"{label}: quantized in {time.perf_counter() - t1:.1f}s", flush=True)
        for s in steps_list:
            name = names[s]
            npz, ev = out / "samples" / f"{name}.npz", out / "evals" / f"{name}.json"
            if s in todo:
                t1 = time.perf_counter()
                if rank == 0 and ev.exists():
                    ev.unlink()  # made from samples that are no longer there
                sample_row(qmodel, labels, s, args, vae, npz)
                sampled += 1
                if rank == 0:
                    first = next(NpzImages(npz).batches(args.grid_count))
                    save_png(make_grid(first), out / "grids" / f"{name}.png")
                    print(f"{label} @ {s} steps: sampled {args.num} images in {time.perf_counter() - t1:.1f}s",
                          flush=True)
            if rank != 0:
                continue
            if ev.exists():
                metrics = read_metrics(ev)
            else:
                metrics = evaluator(npz) if evaluator is not None else evaluate_digits(npz)
                metrics.update(recipe=label, steps=s, quantization=qreport and {
                    "mean_rel_output_error": qreport.get("mean_rel_output_error")})
                with atomic_file(ev) as tmp:
                    tmp.write_text(json_text(metrics, str(ev)))
                evaluated += 1
            rows.append({"recipe": label, "steps": s, **{k: metrics.get(k) for k in (
                "fid", "sfid", "is", "precision", "recall", "class_accuracy", "num_samples", "num_ref")},
                "published_fid": published_fid(model, recipe, w_bits, a_bits, s, args),
                "samples": f"samples/{name}.npz", "grid": f"grids/{name}.png"})
        del qmodel
    barrier()
    if rank != 0:
        return 0
    table = markdown(rows, domain)
    result = {"settings": _read_settings(out), "domain": domain,
              "rows": rows, "published_source": PUBLISHED_SOURCE,
              "this_run": {"sampled_rows": sampled, "evaluated_rows": evaluated,
                           "wall_time_s": round(time.perf_counter() - t0, 1)}}
    with atomic_file(out / "results.json") as tmp:
        tmp.write_text(json_text(result, "results.json"))
    with atomic_file(out / "results.md") as tmp:
        tmp.write_text(f"# ditas benchmark\n\n{_describe(args, domain)}\n\n{table}\n\n"
                       f"Published figures: {PUBLISHED_SOURCE} (shown only for that setting).\n")
    print(table)
    print(f"wrote {out}/results.md and {out}/results.json ({sampled} rows sampled, {evaluated} evaluated this run)")
    return 0


_SCORE = Field((float, type(None)), required=False, lo=0.0)
_FRACTION = Field((float, type(None)), required=False, lo=0.0, hi=1.0)
METRICS_SCHEMA = {"fid": _SCORE, "sfid": _SCORE, "is": _SCORE, "precision": _FRACTION, "recall": _FRACTION,
                  "class_accuracy": _FRACTION, "num_samples": Field(int, lo=1),
                  "num_ref": Field((int, type(None)), required=False, lo=1)}


def read_metrics(path: Path) -> dict:
    """A row's metrics from an earlier run, every field the table uses checked (a hand-edited or
    corrupted file is one error naming it, not a traceback or a wrong table)."""
    try:
        return read_json(path, "benchmark metrics", METRICS_SCHEMA)
    except DitasError as exc:
        raise DitasError(f"{exc}; delete it to evaluate that row again") from None


def _read_settings(out: Path) -> dict:
    """The settings a benchmark folder was made with (its config.json, checked)."""
    return read_json(out / "config.json", "benchmark config", {"settings": Field(dict)})["settings"]


def _check_resume_state(out: Path) -> None:
    """What a resumed benchmark will read, checked before any work: every stored row's metrics."""
    if (out / "evals").is_dir() and not (out / "evals").is_symlink():
        for ev in sorted((out / "evals").glob("*.json")):
            read_metrics(ev)


def _finished_samples(path: Path, num: int) -> bool:
    """A row's npz is finished when it is there with ``num`` images (it is written atomically)."""
    from ..evaluation.adm import NpzImages

    if not path.exists():
        return False
    try:
        return len(NpzImages(path)) == num
    except DitasError:
        return False


def _describe(args, domain: str) -> str:
    evaluation = (f"ADM protocol against {Path(args.ref).name}" if domain == "inception"
                  else "digit evaluator (domain FID, precision, recall in the digit classifier's feature space)")
    return (f"Model: {args.model or 'embedded default'}; {args.num} images per row; cfg {args.cfg_scale}; "
            f"sampler {args.sampler}; seed {args.seed}; evaluation: {evaluation}.")
