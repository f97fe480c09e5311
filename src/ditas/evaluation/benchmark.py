"""The paper's experiment as one resumable workflow: ``run_benchmark(plan, out)`` (``ditas benchmark``).

For every recipe (``fp`` and quantized ones, each quantized once, data-free) and every step count,
sample ``plan.num`` images with the same labels and seeds, evaluate them (the ADM protocol against
``plan.ref``, or the digit evaluator for the embedded default model), and write

    DIR/config.json          the settings (and ditas' ownership marker)
    DIR/samples/R_sS.npz     the samples of recipe R at S steps (ADM layout: arr_0 + labels)
    DIR/evals/R_sS.json      their metrics (the ``ditas eval`` JSON layout)
    DIR/grids/R_sS.png       the first images of each row, as a grid
    DIR/ref_cache.npz        the reference batch's Inception features (ADM protocol only)
    DIR/results.json, DIR/results.md   the table: rows recipe x steps; FID, sFID, IS, precision,
                             recall, and the published DiTAS figures for the same setting

Every file is written atomically when it is finished, so a run that stops (killed, out of time)
is resumed by the same call: finished samples and evaluations are kept, a recipe is quantized
only if one of its rows still needs sampling, and a row's sampling itself resumes from its
finished shards (``diffusion.sharded.sample_npz``). Under ``torchrun`` process 0 quantizes each
recipe and sends the model to the others (one model for every image, whatever each process's
rounding), and every process samples its share of each row; process 0 evaluates and writes the tables.

What the kept files depend on is the plan's fingerprint (``settings``), derived from every field of
``BenchmarkPlan`` and every recipe's full ``QuantConfig.to_dict()``, less the few named in
``NOT_RESULTS`` (they change speed or rounding only). Resuming with another value of any of them
(``--lora-dtype``, the model, the number of images, ...) is refused with the changed keys named;
rows of recipes or step counts not yet in the folder may be added.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch

from ..distributed import barrier
from ..errors import DitasError
from ..quantization.config import QuantConfig
from ..readers import Field, read_json

__all__ = ["BenchmarkPlan", "EVAL_K", "LAYOUT", "NOT_RESULTS", "published_fid", "markdown", "read_metrics",
           "run_benchmark", "settings"]

KIND = "ditas-benchmark"
EVAL_K = 3  # neighbours of the precision/recall manifolds in both evaluators
OWN_FILES = ["config.json", "samples", "evals", "grids", "ref_cache.npz", "results.json", "results.md"]
# What a benchmark folder may hold, by kind (``fileio.unexpected_entries``): overwrite deletes the
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
LAYOUT["dirs"][r"\..*"] = _ANY  # hidden top-level entries: overwrite leaves them alone

# DiTAS (W4A8, DiT-XL/2, ImageNet, FID-10K, cfg 1.5), as published; keyed by (image size, steps).
PUBLISHED_DITAS_W4A8_FID = {(256, 50): 9.05, (256, 100): 6.86, (512, 50): 17.92, (512, 100): 13.45}
PUBLISHED_SOURCE = ("DiTAS (Dong and Zhang, WACV 2025), W4A8 DiT-XL/2 on ImageNet, FID-10K, cfg 1.5, as given in "
                    "the project's method notes (docs/method.md)")

_PATH = {"path": True}  # a field holding a file: fingerprinted by its resolved path


@dataclass
class BenchmarkPlan:
    """Everything a benchmark's results depend on. ``recipes``: ``quantization.recipes.parse_recipes``
    rows (label, recipe, w_bits, a_bits); ``configs``: the ``QuantConfig`` of every non-``fp`` label;
    ``domain``: ``inception`` or ``digits`` (``evaluation.protocol.resolve_domain``). A field added
    here is part of the resume fingerprint unless ``NOT_RESULTS`` names it."""

    recipes: list[tuple[str, str, int | None, int | None]]
    configs: dict[str, QuantConfig]
    steps: list[int]
    domain: str
    model: str | None = field(default=None, metadata=_PATH)
    vae: str | None = field(default=None, metadata=_PATH)
    ref: str | None = field(default=None, metadata=_PATH)
    inception: str | None = field(default=None, metadata=_PATH)
    num: int = 10000
    cfg_scale: float = 1.5
    sampler: str = "ddpm"
    seed: int = 0
    batch_size: int = 64  # per-tensor activation scales are shared by a batch: it changes the images
    kernel: str = "auto"
    grid_count: int = 16
    eval_batch_size: int = 50


# Fields that change the speed or the float rounding only, never what a row means. Everything else,
# present or added later, is in the fingerprint (a field forgotten here refuses a resume, it never
# mixes rows). ``recipes`` and ``steps`` name rows (added rows are new files); ``configs`` is
# compared per recipe.
NOT_RESULTS = {"steps": "a row's name holds its step count", "recipes": "a row's name holds its recipe",
               "eval_batch_size": "Inception batches change the rounding only"}
CONFIG_NOT_RESULTS = (("smooth", "search_workers"),)  # threads of the alpha search: the same result


def _config_fingerprint(config: QuantConfig) -> dict:
    """The config's full nested form, less the fields that change the speed only."""
    data = copy.deepcopy(config.to_dict())
    for spec, name in CONFIG_NOT_RESULTS:
        data.get(spec, {}).pop(name, None)
    return data


def settings(plan: BenchmarkPlan) -> dict[str, Any]:
    """The plan's fingerprint, as JSON values: what the kept files depend on (module docstring)."""
    out: dict[str, Any] = {}
    for f in fields(plan):
        if f.name in NOT_RESULTS:
            continue
        value = getattr(plan, f.name)
        if f.name == "configs":
            value = {label: _config_fingerprint(cfg) for label, cfg in value.items()}
        elif f.metadata.get("path"):
            value = str(Path(value).resolve()) if value else None
        out[f.name] = value
    if out["model"] is None:
        out["model"] = "default"
    return json.loads(json.dumps(out))  # tuples as lists: comparable with what config.json gives back


def _changed(old: Any, new: Any, key: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON values (recursing into tables)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [k for name in sorted(set(old) | set(new))
                for k in _changed(old.get(name), new.get(name), f"{key}.{name}" if key else name)]
    return [] if old == new else [key]


def _resume_settings(old: dict, new: dict) -> tuple[dict, list[str]]:
    """(settings to record, changed keys) of a resumed folder: recipes may be added, but a recipe
    already there keeps its config, and every other key its value."""
    old_configs = old.get("configs") if isinstance(old.get("configs"), dict) else {}
    shared = [label for label in old_configs if label in new["configs"]]
    changed = _changed({**old, "configs": {label: old_configs[label] for label in shared}},
                       {**new, "configs": {label: new["configs"][label] for label in shared}})
    return {**new, "configs": {**old_configs, **new["configs"]}}, changed


def _open_folder(out: Path, fingerprint: dict, overwrite: bool) -> None:
    """Creates ``out`` with its marker, or checks that an existing one is ours and made the same way."""
    from ..fileio import MARKER_KEY, atomic_file, json_text, read_marker, refuse_foreign, unexpected_entries

    record = fingerprint
    if out.exists() or out.is_symlink():
        if out.is_symlink() or not out.is_dir():
            raise DitasError(f"--out {out} exists and is not a folder; choose another name")
        marker = read_marker(out)
        if marker is None or marker.get("kind") != KIND:
            raise DitasError(f"--out {out} exists and is not a benchmark folder ditas wrote; choose another name")
        refuse_foreign(out, unexpected_entries(out, LAYOUT))
        old = _read_settings(out)
        if overwrite:
            import shutil

            for name in OWN_FILES[1:]:
                p = out / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        else:
            _check_resume_state(out)
            record, changed = _resume_settings(old, fingerprint)
            if changed:
                raise DitasError(f"--out {out} holds a benchmark made with other settings ({', '.join(changed)}); "
                                 "continue it with the same ones, give --overwrite to start over, or choose "
                                 "another name")
    else:
        out.mkdir()
    for sub in ("samples", "evals", "grids"):
        if (out / sub).is_symlink() or ((out / sub).exists() and not (out / sub).is_dir()):
            raise DitasError(f"--out {out}: {sub} is not a folder; remove it or choose another name")
        (out / sub).mkdir(exist_ok=True)
    with atomic_file(out / "config.json") as tmp:
        tmp.write_text(json_text({MARKER_KEY: {"kind": KIND, "files": OWN_FILES}, "settings": record}))


# ----------------------------------------------------------------------------------------------
#                             Quantizing and sampling (one place each)
# ----------------------------------------------------------------------------------------------


def quantized_copy(model: torch.nn.Module, config, progress: bool, kernel: str) -> tuple[torch.nn.Module, dict]:
    """A quantized copy of the float ``model`` (data-free: the model's own calibration run)."""
    from ..api import quantize_

    qmodel = copy.deepcopy(model)
    report = quantize_(qmodel, config, progress=progress, kernel=kernel)
    return qmodel, report


def sample_row(model: torch.nn.Module, labels: torch.Tensor, steps: int, plan: BenchmarkPlan, vae, path: Path,
               progress: bool) -> None:
    """Samples the row's npz (resumable, sharded over the torchrun processes; sample i's noise
    depends on (seed, i) only, so every recipe sees the same noise)."""
    from ..diffusion.run import SamplingSettings
    from ..diffusion.sharded import sample_npz

    sampling = SamplingSettings(steps=steps, cfg_scale=plan.cfg_scale, sampler=plan.sampler, seed=plan.seed)
    sample_npz(model, labels, path, sampling, batch_size=plan.batch_size, vae=vae, progress=progress,
               shard_dir=path.parent / f".{path.stem}.shards")


# ----------------------------------------------------------------------------------------------
#                                          The table
# ----------------------------------------------------------------------------------------------


def published_fid(model: torch.nn.Module, recipe: str, w_bits, a_bits, steps: int, plan) -> float | None:
    """The DiTAS paper's FID for this row when the setting is the paper's (DiT-XL/2, W4A8, cfg 1.5, 10K);
    ``plan``: anything with ``cfg_scale`` and ``num``."""
    c = model.config
    is_xl2 = (getattr(c, "depth", None), getattr(c, "hidden_size", None), getattr(c, "patch_size", None)) == (28, 1152, 2)
    if not (recipe == "ditas" and (w_bits, a_bits) == (4, 8) and plan.cfg_scale == 1.5 and plan.num == 10000
            and is_xl2 and c.space == "latent"):
        return None
    return PUBLISHED_DITAS_W4A8_FID.get((c.input_size * 8, steps))


def _fmt(v, nd: int = 3) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def markdown(rows: list[dict], domain: str) -> str:
    """The results table in Markdown (``results.md``, and what ``ditas benchmark`` prints)."""
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


def run_benchmark(plan: BenchmarkPlan, out: str | Path, *, device: Any = "auto", overwrite: bool = False,
                  progress: bool = True, log: Callable[[str], None] | None = None) -> dict | None:
    """Runs (or resumes) the benchmark of ``plan`` into the folder ``out``; returns the results
    (``results.json``'s table) on process 0, None on the other torchrun processes. Every check that
    can fail (inputs, sizes, the folder's settings) runs before the long work. ``log``: one line
    per quantized recipe and sampled row (None: silent)."""
    from ..devices import resolve_device
    from ..distributed import init_from_env, leave_together, shutdown
    from ..fileio import check_not_input, check_writable, path_lock
    from ..validate import check_problems, min_samples_problem

    check_problems(min_samples_problem(plan.num, EVAL_K))  # before sampling, not after
    if plan.domain == "inception":  # every process fails here, before any work, on a bad --ref or --inception
        from .protocol import check_inception_inputs

        check_inception_inputs(plan.ref, plan.inception)
    out = check_writable(out)
    check_not_input(out, [plan.model, plan.vae, plan.ref, plan.inception])
    fingerprint = settings(plan)
    rank, world, device = init_from_env(resolve_device(device))
    log = log or (lambda _line: None)
    try:
        model = _load_checked(plan, out, device)
        if rank == 0:
            with path_lock(out):
                _open_folder(out, fingerprint, overwrite)
                barrier()
                result = _benchmark(plan, out, device, rank, model, progress, log)
            return leave_together(result)
        barrier()  # process 0 has checked and opened the folder
        return leave_together(_benchmark(plan, out, device, rank, model, progress, log))
    finally:
        shutdown()


def _pair_name(label: str, steps: int) -> str:
    return f"{label.replace('@', '_')}_s{steps}"


def _load_checked(plan: BenchmarkPlan, out: Path, device) -> torch.nn.Module:
    """The float model, once its sizes show that the run fits, before the folder is opened: every
    recipe's calibration on ``device``, the rows' samples on the disk of ``out``, and (digit
    evaluator) one row's images in RAM."""
    import shutil

    from ..loaders import load_dit
    from ..validate import calibration_memory_problem, check_problems, gib, images_memory_problem

    model = load_dit(plan.model).to(device)
    check_problems(*(calibration_memory_problem(model, cfg, device) for cfg in plan.configs.values()),
                   plan.domain == "digits" and images_memory_problem(model, plan.num, 1, f"the digit evaluator on "
                                                                                         f"--num {plan.num} images"))
    c = model.config
    side = c.input_size * (8 if c.space == "latent" else 1)
    rows = len(plan.recipes) * len(plan.steps)
    need = rows * plan.num * (side * side * 3 + 8)  # uint8 RGB images and int64 labels per row
    kept = out / "samples"  # a resumed run has part of it already
    need -= sum(p.stat().st_size for p in kept.glob("*.npz") if p.is_file()) if kept.is_dir() else 0
    free = shutil.disk_usage(out.parent).free
    if need > free:
        raise DitasError(f"--num {plan.num}: {rows} rows of samples need at least {gib(need)} on disk, but only "
                         f"{gib(free)} are free in {out.parent}")
    return model


def _check_model(plan: BenchmarkPlan, model: torch.nn.Module) -> None:
    """A float model the chosen evaluator fits."""
    if getattr(model, "quant_config", None) is not None:
        raise DitasError("--model is a quantized model: the benchmark starts from a float model")
    if plan.domain == "digits" and (model.config.input_size, model.config.in_channels) != (32, 1):
        raise DitasError("the digit evaluator fits the embedded 32x32 digit model only; give --ref REF.npz for "
                         "the ADM protocol")


def _benchmark(plan: BenchmarkPlan, out: Path, device, rank: int, model, progress: bool, log) -> dict | None:
    """The rows, once the folder is open: quantize what still needs sampling, sample, evaluate, tabulate."""
    from ..diffusion.images import make_grid, save_png
    from ..quantization.checkpoint import broadcast_quantized
    from . import protocol
    from .adm import NpzImages

    progress = progress and rank == 0
    t0 = time.perf_counter()
    _check_model(plan, model)
    evaluator = None
    if plan.domain == "inception" and rank == 0:
        evaluator = protocol.InceptionEvaluator(plan.ref, out / "ref_cache.npz", plan.inception, str(device),
                                                plan.eval_batch_size, progress)  # checks the extra and the files
    vae = None
    if model.config.space == "latent":
        if not plan.vae:
            raise DitasError("this model works in a VAE latent space: give --vae PATH")
        from ..model.vae import load_vae

        vae = load_vae(plan.vae).to(device)
    labels = torch.arange(plan.num) % model.num_classes  # balanced classes, the same for every row
    rows, sampled, evaluated = [], 0, 0
    for label, recipe, w_bits, a_bits in plan.recipes:
        names = {s: _pair_name(label, s) for s in plan.steps}
        todo = [s for s in plan.steps if not _finished_samples(out / "samples" / f"{names[s]}.npz", plan.num)]
        barrier()  # every process has looked before any writes
        qmodel, qreport = model, None
        if todo and recipe != "fp":
            t1 = time.perf_counter()
            if rank == 0:  # quantized once, on process 0, and sent to the others: one model for every image
                qmodel, qreport = quantized_copy(model, plan.configs[label], progress, plan.kernel)
            qmodel = broadcast_quantized(qmodel if rank == 0 else None, plan.kernel, device)
            if rank == 0:
                log(f"{label}: quantized in {time.perf_counter() - t1:.1f}s")
        for s in plan.steps:
            name = names[s]
            npz, ev = out / "samples" / f"{name}.npz", out / "evals" / f"{name}.json"
            if s in todo:
                t1 = time.perf_counter()
                if rank == 0 and ev.exists():
                    ev.unlink()  # made from samples that are no longer there
                sample_row(qmodel, labels, s, plan, vae, npz, progress)
                sampled += 1
                if rank == 0:
                    first = next(NpzImages(npz).batches(plan.grid_count))
                    save_png(make_grid(first), out / "grids" / f"{name}.png")
                    log(f"{label} @ {s} steps: sampled {plan.num} images in {time.perf_counter() - t1:.1f}s")
            if rank != 0:
                continue
            metrics, fresh = _row_metrics(ev, npz, evaluator, label, s, qreport)
            evaluated += fresh
            rows.append({"recipe": label, "steps": s, **{k: metrics.get(k) for k in (
                "fid", "sfid", "is", "precision", "recall", "class_accuracy", "num_samples", "num_ref")},
                "published_fid": published_fid(model, recipe, w_bits, a_bits, s, plan),
                "samples": f"samples/{name}.npz", "grid": f"grids/{name}.png"})
        del qmodel
    barrier()
    if rank != 0:
        return None
    return _write_results(plan, out, rows, {"sampled_rows": sampled, "evaluated_rows": evaluated,
                                            "wall_time_s": round(time.perf_counter() - t0, 1)})


def _row_metrics(ev: Path, npz: Path, evaluator, label: str, steps: int, qreport) -> tuple[dict, int]:
    """(the row's metrics, 1 if evaluated now else 0): kept ones are read back, others computed and kept."""
    from ..fileio import atomic_file, json_text
    from . import protocol

    if ev.exists():
        return read_metrics(ev), 0
    metrics = evaluator(npz) if evaluator is not None else protocol.evaluate_digits(npz)
    metrics.update(recipe=label, steps=steps, quantization=qreport and {
        "mean_rel_output_error": qreport.get("mean_rel_output_error")})
    with atomic_file(ev) as tmp:
        tmp.write_text(json_text(metrics, str(ev)))
    return metrics, 1


def _write_results(plan: BenchmarkPlan, out: Path, rows: list[dict], this_run: dict) -> dict:
    """results.json and results.md, atomically; returns results.json's content."""
    from ..fileio import atomic_file, json_text

    result = {"settings": _read_settings(out), "domain": plan.domain, "rows": rows,
              "published_source": PUBLISHED_SOURCE, "this_run": this_run}
    with atomic_file(out / "results.json") as tmp:
        tmp.write_text(json_text(result, "results.json"))
    with atomic_file(out / "results.md") as tmp:
        tmp.write_text(f"# ditas benchmark\n\n{_describe(plan)}\n\n{markdown(rows, plan.domain)}\n\n"
                       f"Published figures: {PUBLISHED_SOURCE} (shown only for that setting).\n")
    return result


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
    from .adm import NpzImages

    if not path.exists():
        return False
    try:
        return len(NpzImages(path)) == num
    except DitasError:
        return False


def _describe(plan: BenchmarkPlan) -> str:
    evaluation = (f"ADM protocol against {Path(plan.ref).name}" if plan.domain == "inception"
                  else "digit evaluator (domain FID, precision, recall in the digit classifier's feature space)")
    return (f"Model: {plan.model or 'embedded default'}; {plan.num} images per row; cfg {plan.cfg_scale}; "
            f"sampler {plan.sampler}; seed {plan.seed}; evaluation: {evaluation}.")
