"""Float DiT files and folders, read without executing code from the file.

Accepted: a published ``.pt`` checkpoint (a state dict, or a dict holding one under ``model``,
``ema`` or ``state_dict``), a ``.safetensors`` state dict, a ditas float model folder
(``config.json`` + ``model.safetensors``), or a diffusers DiT folder (``DiTTransformer2DModel``
or a ``DiTPipeline`` with ``transformer/``). The configuration comes from metadata when present,
otherwise it is inferred from the tensor shapes. Quantized folders are read one layer up
(``ditas.loaders.load_dit`` picks the reader), so this module never imports ``quantization/``.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..validate import check_finite_state, state_config_problem
from .diffusers_convert import read_diffusers_dit
from .dit import DiT, DiTConfig
from .state_files import read_config_json, read_pt, read_safetensors

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_MODEL_DIR = ASSETS / "default_dit"

# head counts of the published sizes (not inferable from shapes); others assume 64-wide heads
_HEADS_BY_HIDDEN = {1152: 16, 1024: 16, 768: 12, 384: 6}


def default_model_path() -> Path:
    """The embedded default model (a small DiT trained on real digits)."""
    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        raise CheckpointError(
            f"the embedded default model is missing from this installation ({DEFAULT_MODEL_DIR}); "
            "give --model PATH")
    return DEFAULT_MODEL_DIR


# ----------------------------------------------------------------------------------------------
#                                  Configuration inference
# ----------------------------------------------------------------------------------------------


def infer_config(state: dict[str, torch.Tensor], source: str = "state dict") -> DiTConfig:
    """The DiT configuration implied by the tensor shapes of a reference-layout state dict."""
    required = ["x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight",
                "final_layer.linear.weight", "blocks.0.mlp.fc1.weight"]
    missing = [k for k in required if k not in state]
    if missing:
        sample = ", ".join(sorted(state)[:5])
        raise CheckpointError(f"{source}: not a DiT state dict in the published layout "
                              f"(missing {', '.join(missing)}; found keys like {sample})")
    pe = state["x_embedder.proj.weight"]
    if pe.ndim != 4 or pe.shape[2] != pe.shape[3]:
        raise CheckpointError(f"{source}: x_embedder.proj.weight has shape {tuple(pe.shape)}, "
                              "expected (hidden, channels, patch, patch)")
    hidden, in_ch, patch = pe.shape[0], pe.shape[1], pe.shape[2]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    num_patches = state["pos_embed"].shape[1]
    grid = int(round(math.sqrt(num_patches)))
    if grid * grid != num_patches:
        raise CheckpointError(f"{source}: pos_embed has {num_patches} positions, not a square grid")
    rows = state["y_embedder.embedding_table.weight"].shape[0]
    out = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    if out not in (in_ch, 2 * in_ch):
        raise CheckpointError(f"{source}: final layer outputs {out} channels for {in_ch} input channels")
    mlp_hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    heads = _HEADS_BY_HIDDEN.get(hidden, max(1, hidden // 64))
    return DiTConfig(input_size=grid * patch, patch_size=patch, in_channels=in_ch, hidden_size=hidden,
                     depth=depth, num_heads=heads, mlp_ratio=mlp_hidden / hidden, class_dropout_prob=0.1,
                     num_classes=rows - 1, learn_sigma=out == 2 * in_ch)


def build_from_state(state: dict[str, torch.Tensor], config: DiTConfig | None, source: str,
                     device: torch.device | str = "cpu") -> DiT:
    """A DiT built on the meta device (no memory) and materialised on ``device`` from ``state``."""
    config = config or infer_config(state, source)
    problem = state_config_problem(config, state)
    if problem:
        raise CheckpointError(f"{source}: {problem}")
    with torch.device("meta"):
        model = DiT(config)
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown keys {unknown[:4]}{' ...' if len(unknown) > 4 else ''}")
        if missing:
            parts.append(f"missing keys {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        raise CheckpointError(f"{source}: does not match a DiT with {config.to_json()}: " + "; ".join(parts))
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: shape mismatch at {k}: file has {tuple(state[k].shape)}, "
                                  f"the config implies {tuple(v.shape)}")
        if not state[k].is_floating_point():
            raise CheckpointError(f"{source}: {k} holds {state[k].dtype}, expected floating point")
    check_finite_state(state, source)
    model = model.to_empty(device=device)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------
#                                    Files and folders
# ----------------------------------------------------------------------------------------------


def _config_from_meta(meta: dict[str, str], source: str) -> DiTConfig | None:
    if "config" not in meta:
        return None
    from ..readers import parse_json

    data = parse_json(meta["config"], source, "config metadata", error=CheckpointError)
    try:
        return DiTConfig.from_dict(data.get("model", data))
    except (ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{source}: bad config metadata ({exc})") from None


def read_folder_config(path: Path) -> tuple[Path, dict[str, Any]]:
    """The folder that holds the model's ``config.json`` (a diffusers pipeline's ``transformer/``)
    and that config, parsed: read once, it tells the caller which reader the folder needs."""
    cfg_file = path / "config.json"
    if (path / "transformer" / "config.json").exists() and not cfg_file.exists():
        path, cfg_file = path / "transformer", path / "transformer" / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: a model folder needs a config.json (none found)")
    return path, read_config_json(cfg_file)


def load_float_dit(path: Path, config: DiTConfig | None, device: torch.device,
                   data: dict[str, Any] | None = None) -> DiT:
    """A float DiT from a file or a folder (``data``: the folder's ``config.json`` when the caller
    has read it already). ``path`` must exist; a quantized folder is refused (``ditas.load_dit``)."""
    if path.is_dir():
        if data is None:
            path, data = read_folder_config(path)
        return _load_folder(path, data, config, device)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        state, meta = read_safetensors(path)
        return build_from_state(state, config or _config_from_meta(meta, str(path)), str(path), device)
    if suffix in (".pt", ".pth", ".ckpt", ".bin"):
        return build_from_state(read_pt(path), config, str(path), device)
    raise CheckpointError(f"{path}: unsupported file type {suffix or '(none)'}; expected a .pt/.pth "
                          "checkpoint, a .safetensors file or a model folder")


def _load_folder(path: Path, data: dict[str, Any], config: DiTConfig | None, device: torch.device) -> DiT:
    cfg_file = path / "config.json"
    if data.get("_class_name") == "DiTTransformer2DModel":
        state, converted = read_diffusers_dit(path, data)
        return build_from_state(state, converted, str(path), device)
    if "quantization" in data:
        raise CheckpointError(f"{path}: a quantized model folder: load it with ditas.load_dit")
    if "model" not in data:
        raise CheckpointError(f"{cfg_file}: not a ditas or diffusers DiT config (no 'model' or '_class_name')")
    try:
        cfg = config or DiTConfig.from_dict(data["model"])
    except (ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{cfg_file}: bad model config ({exc})") from None
    weights = path / "model.safetensors"
    if not weights.exists():
        raise CheckpointError(f"{path}: model.safetensors is missing")
    state, _ = read_safetensors(weights)
    return build_from_state(state, cfg, str(weights), device)


def save_dit(model: DiT, path: str | os.PathLike, extra: dict[str, Any] | None = None,
             overwrite: bool = False) -> Path:
    """Writes a float DiT as a folder: ``config.json`` + ``model.safetensors`` (atomically).

    An existing ``path`` is replaced only with ``overwrite`` and only if ditas wrote it
    (``ditas.fileio.output_dir``).
    """
    from safetensors.torch import save_file

    from ..fileio import json_text, publish_dir
    from ..validate import check_problems, path_problem, type_problem

    check_problems(type_problem(model, DiT, "model", "a ditas DiT"), path_problem(path, "path"),
                   type_problem(overwrite, bool, "overwrite", "True or False"))

    def write(folder: Path) -> None:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"config": model.config.to_json()})
        (folder / "config.json").write_text(json_text({"format": "ditas-dit", "model": model.config.to_dict(),
                                                      **(extra or {})}, "config.json"))

    return publish_dir(path, "ditas-dit", write, overwrite=overwrite)
