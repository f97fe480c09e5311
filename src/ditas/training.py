"""Training a small class-conditional pixel-space DiT on the bundled real digits, as DiT trains.

The recipe of the DiT paper at toy scale: epsilon prediction with a learned variance and the
hybrid loss (``GaussianDiffusion.training_losses``), uniform timesteps of the 1000-step linear
schedule, label dropout 0.1 for classifier-free guidance, AdamW, and an exponential moving average
(EMA) of the weights that is what we ship. Everything random comes from ``seed``, and the run
length is a fixed number of steps, so a run is reproducible (up to the nondeterminism of the
threaded CPU kernels).

Outputs (all written atomically) in ``out``: ``ema/`` and ``raw/`` ditas model folders (written
every ``ckpt_every`` steps and at the end; ``ema/`` is the model to use), ``train_log.jsonl``
(one JSON record per ``log_every`` steps) and ``summary.json``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from .diffusion.gaussian import create_diffusion
from .errors import ConfigError, DitasError
from .fileio import atomic_file, check_not_input, check_writable, foreign_entries, json_text, path_lock
from .model.dit import DiT, DiTConfig
from .model.loading import save_dit


# ----------------------------------------------------------------------------------------------
#                                        Configuration
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """One training run; ``model`` is the DiT to build (its classes must match the data)."""

    model: DiTConfig = field(default_factory=lambda: DiTConfig(
        input_size=32, patch_size=4, in_channels=1, hidden_size=192, depth=6, num_heads=3,
        num_classes=10, learn_sigma=True, class_dropout_prob=0.1))
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1     # cosine decay from lr to lr * min_lr_ratio after warmup
    weight_decay: float = 0.0     # DiT's AdamW setting
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    diffusion_steps: int = 1000
    seed: int = 0
    bf16: bool = False            # bfloat16 autocast for the forward/backward pass (weights stay fp32)
    # std of the label embedding table at init (DiT: 0.02). 0.02 makes the label part of the
    # conditioning ~5 % of the timestep part, and class conditioning was not learned in 2,000
    # CPU-budget steps; N(0, 1) (nn.Embedding's own default) gives each class a distinct direction
    # of the timestep embedding's size from the start. None keeps the model's init.
    label_init_std: float | None = 1.0
    log_every: int = 50
    ckpt_every: int = 500

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = DiTConfig.from_dict(self.model)
        problems = []
        for name in ("steps", "batch_size", "diffusion_steps", "log_every", "ckpt_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                problems.append(f"{name} must be a positive integer, got {v!r}")
        if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            problems.append(f"warmup_steps must be a non-negative integer, got {self.warmup_steps!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be a positive number, got {self.lr!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"ema_decay must lie in [0, 1), got {self.ema_decay!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio!r}")
        if self.label_init_std is not None and not (self.label_init_std > 0 and math.isfinite(self.label_init_std)):
            problems.append(f"label_init_std must be a positive number or None, got {self.label_init_std!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            problems.append("weight_decay and grad_clip must be non-negative")
        if problems:
            raise ConfigError("invalid training config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)


def _load_init(model: DiT, ema: DiT, folder: Path, mc: DiTConfig) -> None:
    """Starts ``model`` and ``ema`` from an earlier run's ``raw/`` and ``ema/``, or both from one
    model folder (e.g. ``r2/raw``, or a shipped model: a folder with its own ``config.json``)."""
    from .loaders import load_dit

    single = (folder / "config.json").is_file()
    if not single and not ((folder / "raw").is_dir() and (folder / "ema").is_dir()):
        raise ConfigError(f"--init {folder}: neither a model folder (config.json) nor a training run's "
                          "output folder (raw/ and ema/)")
    for name, target in (("raw", model), ("ema", ema)):
        path = folder if single else folder / name
        src = load_dit(path)
        if src.config.to_dict() != mc.to_dict():
            raise ConfigError(f"{path}: its model config {src.config.to_json()} differs from "
                              f"the one to train {mc.to_json()}")
        target.load_state_dict(src.state_dict())


# ----------------------------------------------------------------------------------------------
#                                         The loop
# ----------------------------------------------------------------------------------------------


def train_dit(cfg: TrainConfig, images: torch.Tensor, labels: torch.Tensor, out: str | Path,
              progress: bool = True, on_log: Callable[[dict], None] | None = None,
              init: str | Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Trains a DiT on ``images`` (N, C, H, W) in [-1, 1] with ``labels`` (N,); returns the summary.

    ``init``: the output folder of an earlier run to continue from (its ``raw/`` weights start the
    model, its ``ema/`` weights the EMA), or one model folder that starts both; the optimizer state
    starts fresh, hence the warmup. ``out`` must be new or empty; with ``overwrite`` it may hold
    an earlier run's outputs (and nothing else), which this run replaces.
    """
    mc = cfg.model
    if images.ndim != 4 or tuple(images.shape[1:]) != (mc.in_channels, mc.input_size, mc.input_size):
        raise ConfigError(f"training images have shape {tuple(images.shape)}, the model expects "
                          f"(N, {mc.in_channels}, {mc.input_size}, {mc.input_size})")
    if labels.shape != (images.shape[0],) or int(labels.min()) < 0 or int(labels.max()) >= mc.num_classes:
        raise ConfigError(f"labels must be one integer in 0..{mc.num_classes - 1} per image")
    out = Path(out)
    check_run_folder(out, overwrite)
    check_not_input(out, [init])
    with path_lock(out):  # one training run per output folder
        check_run_folder(out, overwrite)
        out.mkdir(parents=True, exist_ok=True)
        return _train(cfg, images, labels, out, progress, on_log, init)


RUN_FILES = ("ema", "raw", "train_log.jsonl", "summary.json")


def check_run_folder(out: Path, overwrite: bool) -> None:
    """Refuses an output folder holding anything but an earlier run's outputs (those only with ``overwrite``)."""
    check_writable(out)
    if not out.exists():
        return
    if not out.is_dir() or out.is_symlink():
        raise ConfigError(f"--out {out} exists and is not a folder")
    leftovers = tuple(f".{name}.ditas-" for name in RUN_FILES)  # a killed run's partial or lock entries
    entries = sorted(p.name for p in out.iterdir() if not p.name.startswith(leftovers))
    foreign = [f for e in entries for f in _not_ours(out / e)]
    if foreign:
        raise ConfigError(f"--out {out} holds files a training run did not write ({', '.join(foreign[:4])}); "
                          "choose a new or empty folder")
    if entries and not overwrite:
        raise ConfigError(f"--out {out} holds an earlier training run; give --overwrite to replace it, "
                          "or choose a new folder")


def _not_ours(p: Path) -> list[str]:
    """What in the entry ``p`` a training run did not write: a run writes ``ema/`` and ``raw/`` as
    ditas model folders holding only what ditas wrote (checked down every sub-folder) and the log
    and summary as regular files; anything else is the user's, which --overwrite must not replace."""
    if p.name in ("ema", "raw") and p.is_dir() and not p.is_symlink():
        inside = foreign_entries(p)
        return [p.name] if inside is None else [f"{p.name}/{e}" for e in inside]
    return [] if p.name in RUN_FILES and p.is_file() and not p.is_symlink() else [p.name]


def _train(cfg: TrainConfig, images: torch.Tensor, labels: torch.Tensor, out: Path, progress: bool,
           on_log: Callable[[dict], None] | None, init: str | Path | None) -> dict[str, Any]:
    mc = cfg.model

    torch.manual_seed(cfg.seed)  # model init and label dropout draw from the global generator
    model = DiT(mc)
    if cfg.label_init_std is not None:
        with torch.no_grad():
            model.y_embedder.embedding_table.weight.normal_(0.0, cfg.label_init_std)
    ema = copy.deepcopy(model)
    if init is not None:
        _load_init(model, ema, Path(init), mc)
    model.train()
    ema.eval().requires_grad_(False)
    diffusion = create_diffusion(cfg.diffusion_steps, learn_sigma=mc.learn_sigma,
                                 num_timesteps=cfg.diffusion_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed + 1)  # batches, timesteps, noise

    n = images.shape[0]
    order = torch.randperm(n, generator=g)
    cursor = 0
    log_path = out / "train_log.jsonl"
    log_lines: list[str] = []
    window: dict[str, float] = {"loss": 0.0, "mse": 0.0, "vb": 0.0}
    window_n = 0
    first_loss = last_loss = None
    start = time.perf_counter()

    def write_log() -> None:  # rewritten whole (atomically) so a reader never sees half a line
        with atomic_file(log_path) as tmp:
            tmp.write_text("".join(log_lines))

    def checkpoint(step: int) -> None:
        info = {"training": {"steps_done": step, "config": cfg.to_dict()}}
        save_dit(ema, out / "ema", extra=info, overwrite=True)  # ours: checked at the start
        save_dit(model, out / "raw", extra=info, overwrite=True)
        write_log()

    bar = tqdm(range(cfg.steps), desc="training", unit="step", disable=not progress)
    for step in bar:
        if cursor + cfg.batch_size > n:  # a new epoch: reshuffle, drop the incomplete tail
            order = torch.randperm(n, generator=g)
            cursor = 0
        idx = order[cursor:cursor + cfg.batch_size]
        cursor += cfg.batch_size
        x0, y = images[idx], labels[idx]
        t = torch.randint(0, diffusion.num_timesteps, (len(idx),), generator=g)
        noise = torch.randn(x0.shape, generator=g)

        def model_fn(x_t: torch.Tensor, model_t: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                return model(x_t, model_t, y).float()

        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        terms = diffusion.training_losses(model_fn, x0, t, noise=noise)
        loss = terms["loss"].mean()
        if not torch.isfinite(loss):
            raise DitasError(f"training loss became {loss.item()} at step {step + 1}; the checkpoints written "
                             "so far are kept (try a lower --lr)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        # EMA warm-up (as in many DiT re-implementations): short runs are not dominated by init
        update_ema(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))

        for k in window:
            if k in terms:
                window[k] += float(terms[k].detach().mean())
        window_n += 1
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            rec = {"step": step + 1, "lr": lr_at(cfg, step),
                   "elapsed_s": round(time.perf_counter() - start, 2),
                   **{k: round(v / window_n, 6) for k, v in window.items()}}
            first_loss = rec["loss"] if first_loss is None else first_loss
            last_loss = rec["loss"]
            log_lines.append(json.dumps(rec) + "\n")
            write_log()
            bar.set_postfix(loss=f"{rec['loss']:.4f}", mse=f"{rec['mse']:.4f}")
            if on_log:
                on_log(rec)
            window = {k: 0.0 for k in window}
            window_n = 0
        if (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.steps:
            checkpoint(step + 1)
    bar.close()
    wall = time.perf_counter() - start
    checkpoint(cfg.steps)
    summary = {"steps": cfg.steps, "init": str(init) if init is not None else None, "wall_time_s": round(wall, 1),
               "images_per_s": round(cfg.steps * cfg.batch_size / wall, 1),
               "first_logged_loss": first_loss, "final_logged_loss": last_loss,
               "num_train_images": n, "torch_threads": torch.get_num_threads(),
               "config": cfg.to_dict()}
    with atomic_file(out / "summary.json") as tmp:
        tmp.write_text(json_text(summary, "summary.json"))
    return summary
